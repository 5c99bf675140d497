"""Exponential moving average of the trained weights, updated by the training loop after each optimizer step."""
import contextlib
from typing import Dict

import numpy as np
import paddle


class EMA:
    def __init__(self, model: paddle.nn.Layer, decay: float = 0.9999):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if not p.stop_gradient}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @paddle.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            shadow = self.shadow[name]
            shadow.set_value(shadow * self.decay + param.astype(shadow.dtype) * (1.0 - self.decay))

    @contextlib.contextmanager
    def applied(self):
        """Inside the block the model holds the EMA weights; the trained ones come back after."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with paddle.no_grad():
            for n, p in self.params.items():
                p.set_value(self.shadow[n])
        try:
            yield
        finally:
            with paddle.no_grad():
                for n, p in self.params.items():
                    p.set_value(backup[n])

    def state_numpy(self) -> Dict[str, np.ndarray]:
        return {n: s.numpy() for n, s in self.shadow.items()}

    def load_numpy(self, state: Dict[str, np.ndarray]) -> None:
        for n, s in self.shadow.items():
            s.set_value(paddle.to_tensor(state[n]))
