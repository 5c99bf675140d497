"""VisualDL logging decided once per process: on ranks other than 0 every call is a no-op (STYLE 10)."""
from typing import Dict, Optional

import numpy as np


class RunLogger:
    def __init__(self, logdir: str, file_name: str = "", enabled: Optional[bool] = None):
        import paddle.distributed as dist

        self.enabled = dist.get_rank() <= 0 if enabled is None else enabled
        self.writer = None
        if self.enabled:
            from visualdl import LogWriter

            self.writer = LogWriter(logdir=logdir, file_name=file_name)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def images(self, images: Dict[str, np.ndarray], step: int) -> None:
        """Each NHWC uint8 batch is tiled into one image (VisualDL's add_image takes one)."""
        if self.writer is None:
            return
        for tag, batch in images.items():
            self.writer.add_image(tag, grid(batch), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def grid(images: np.ndarray, columns: Optional[int] = None) -> np.ndarray:
    """NHWC uint8 images tiled into one HWC image."""
    n, h, w, c = images.shape
    columns = columns or n
    rows = -(-n // columns)
    out = np.zeros((rows * h, columns * w, c), dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        out[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return out
