"""Exponential moving average of the trained weights, updated by the training loop after each optimizer step.

The decay warms up as in CompVis' `LitEma` (the reference example's, ppdiffusers.models.ema.LitEma):
decay_n = min(decay, (1 + n) / (10 + n)) at the n-th update, n = 1, 2, ... (LitEma counts the update
before computing the decay: the first uses 2/11). Without it, a 0.9999 EMA still
holds 0.9999**10000 = 37% of the random initialisation after 10k steps, and the exported
pipeline (which is the EMA) is mostly noise for the first tens of thousands of steps.
The update counter is part of the state, so a resumed run continues the same warm-up.
"""
import contextlib
from typing import Dict

import numpy as np
import paddle

# Key of the update counter beside the weights in ema.safetensors (not a parameter name:
# parameter names never start with "__").
COUNTER_KEY = "__ema_num_updates__"


class EMA:
    def __init__(self, model: paddle.nn.Layer, decay: float = 0.9999):
        self.max_decay = decay
        self.num_updates = 0
        self.params = {n: p for n, p in model.named_parameters() if not p.stop_gradient}
        # The shadow is float32 whatever the parameters are: under O2 they are bf16/fp16, whose
        # 8-bit (bf16) mantissa cannot hold a 0.9999 decay's updates (1e-4 of a weight rounds away).
        self.shadow = {n: p.detach().astype("float32").clone() for n, p in self.params.items()}  # astype to the same dtype is no copy

    def decay(self) -> float:
        """The decay of the next update, the (num_updates + 1)-th (warm-up, then the configured value)."""
        n = self.num_updates + 1
        return min(self.max_decay, (1 + n) / (10 + n))

    @paddle.no_grad()
    def update(self) -> None:
        d = self.decay()
        for name, param in self.params.items():
            shadow = self.shadow[name]
            # In place: shadow = d * shadow + (1 - d) * param, with no extra copy of the model.
            shadow.scale_(d)
            shadow.add_(param.detach().astype(shadow.dtype) * (1.0 - d))
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self):
        """Inside the block the model holds the EMA weights; the trained ones come back after.

        float32 parameters swap with their shadow in place (one tensor's worth of temporary
        memory, not a third copy of the model). 16-bit parameters (O2) cannot take the float32
        shadow on a round trip without rounding it, so they are set from it and the trained
        16-bit values are kept aside (a half-size copy of those parameters) and put back."""
        kept = {}
        with paddle.no_grad():
            for name, param in self.params.items():
                shadow = self.shadow[name]
                if param.dtype == shadow.dtype:
                    self._swap_one(param, shadow)
                else:
                    kept[name] = param.detach().clone()
                    param.set_value(shadow.astype(param.dtype))
        try:
            yield
        finally:
            with paddle.no_grad():
                for name, param in self.params.items():
                    if name in kept:
                        param.set_value(kept.pop(name))
                    else:
                        self._swap_one(param, self.shadow[name])

    @staticmethod
    def _swap_one(param, shadow):
        tmp = param.detach().clone()
        param.set_value(shadow)
        shadow.set_value(tmp)
        del tmp

    def state_numpy(self) -> Dict[str, np.ndarray]:
        state = {n: s.numpy() for n, s in self.shadow.items()}
        state[COUNTER_KEY] = np.array([self.num_updates], dtype="int64")
        return state

    def load_numpy(self, state: Dict[str, np.ndarray]) -> None:
        for n, s in self.shadow.items():
            if n not in state:
                raise ValueError(f"the saved EMA lacks {n}; it belongs to a different model")
            if tuple(state[n].shape) != tuple(s.shape):
                raise ValueError(f"the saved EMA's {n} has shape {list(state[n].shape)}, the model's has {list(s.shape)}")
            s.set_value(paddle.to_tensor(state[n]).astype("float32"))
        # An EMA saved before the warm-up existed has no counter: treat it as fully warmed up.
        self.num_updates = int(state[COUNTER_KEY][0]) if COUNTER_KEY in state else 10**9


def maybe_applied(ema):
    """`ema.applied()` when EMA is on, else a no-op context: what logging and export both use."""
    return ema.applied() if ema is not None else contextlib.nullcontext()
