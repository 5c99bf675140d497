"""Exponential moving average of the trained weights, updated by the training loop after each optimizer step.

The decay warms up as in CompVis' `LitEma` (and diffusers' EMAModel, and the reference example):
decay_n = min(decay, (1 + n) / (10 + n)) at the n-th update. Without it, a 0.9999 EMA still
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
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    def decay(self) -> float:
        """The decay of the next update (warm-up, then the configured value)."""
        n = self.num_updates
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

    @paddle.no_grad()
    def _swap(self) -> None:
        # One tensor's worth of temporary memory at a time (not a third copy of the model).
        for name, param in self.params.items():
            shadow = self.shadow[name]
            tmp = param.detach().clone()
            param.set_value(shadow)
            shadow.set_value(tmp)
            del tmp

    @contextlib.contextmanager
    def applied(self):
        """Inside the block the model holds the EMA weights (swapped in place); the trained ones come back after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

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
            s.set_value(paddle.to_tensor(state[n]).astype(s.dtype))
        # An EMA saved before the warm-up existed has no counter: treat it as fully warmed up.
        self.num_updates = int(state[COUNTER_KEY][0]) if COUNTER_KEY in state else 10**9


def maybe_applied(ema):
    """`ema.applied()` when EMA is on, else a no-op context: what logging and export both use."""
    return ema.applied() if ema is not None else contextlib.nullcontext()
