"""Training on the PaddleNLP Trainer: the loss is the model's, everything else is logged beside it.

Where the stock Trainer falls short and what we add (each in one small method):
  * `get_train_dataloader`: our stream shards itself by rank and worker, so it must not be
    wrapped again in the Trainer's `IterableDatasetShard` (which would drop 1 - 1/world of it);
  * `compute_loss`: strips the stream's bookkeeping (`skips`, `worker`) before the model sees it;
  * `log`: adds images/s and the data skips summed over workers and ranks;
  * `_maybe_log_save_evaluate`: at `--image_logging_steps`, reconstructions and DDIM samples
    go to VisualDL (the stock VisualDL callback logs scalars only).
"""
from typing import Dict, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.io import DataLoader
from paddlenlp.trainer import Trainer
from paddlenlp.utils.log import logger

from ldm.data import SKIP_REASONS


def _unwrap(model):
    return model._layers if isinstance(model, paddle.DataParallel) else model


class SkipTally:
    """Latest cumulative skip counts per dataloader worker, summed over workers and ranks on demand."""

    def __init__(self):
        self.per_worker: Dict[int, np.ndarray] = {}

    def update(self, skips: paddle.Tensor, worker: paddle.Tensor) -> None:
        skips, worker = skips.numpy(), worker.numpy()
        for w in np.unique(worker):
            latest = skips[worker == w].max(axis=0)
            self.per_worker[int(w)] = np.maximum(self.per_worker.get(int(w), latest), latest)

    def totals(self) -> Dict[str, int]:
        local = sum(self.per_worker.values()) if self.per_worker else np.zeros(len(SKIP_REASONS), "int64")
        total = paddle.to_tensor(np.asarray(local, dtype="int64"))
        if dist.get_world_size() > 1:
            dist.all_reduce(total)
        return {f"skipped_{r}": int(v) for r, v in zip(SKIP_REASONS, total.numpy())}


class StreamTrainer(Trainer):
    """Trainer for any model here whose forward(**batch) returns the loss and has log_images(batch, steps)."""

    def __init__(self, *args, image_logging_steps: int = 0, num_inference_steps: int = 50, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_logging_steps = image_logging_steps
        self.num_inference_steps = num_inference_steps
        self.skip_tally = SkipTally()
        self._last_batch = None
        self._image_writer = None

    def get_train_dataloader(self):
        return DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            num_workers=self.args.dataloader_num_workers,
            drop_last=True,
        )

    def compute_loss(self, model, inputs, return_outputs=False):
        self.skip_tally.update(inputs.pop("skips"), inputs.pop("worker"))
        self._last_batch = inputs
        loss = model(**inputs)
        return (loss, None) if return_outputs else loss

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "interval_samples_per_second" in logs:
            logs["images_per_second"] = logs["interval_samples_per_second"]
            logs.update(self.skip_tally.totals())
        super().log(logs, **kwargs)

    def _maybe_log_save_evaluate(self, tr_loss, model, epoch, ignore_keys_for_eval, **kwargs):
        super()._maybe_log_save_evaluate(tr_loss, model, epoch, ignore_keys_for_eval, **kwargs)
        step = self.state.global_step
        if self.image_logging_steps > 0 and step % self.image_logging_steps == 0 and self._last_batch is not None:
            self.log_images(step)

    def log_images(self, step: int) -> None:
        """The model's `log_images` (reconstructions, samples) for the last batch, to VisualDL."""
        if not self.is_world_process_zero():
            return
        batch = {k: v[:8] for k, v in self._last_batch.items()}
        if self._image_writer is None:
            from visualdl import LogWriter

            self._image_writer = LogWriter(logdir=self.args.logging_dir, file_name="vdlrecords.images.log")
        images = _unwrap(self.model).log_images(batch, self.num_inference_steps)
        for tag, array in images.items():
            self._image_writer.add_image(tag, grid(array), step)
        self._image_writer.flush()
        logger.info(f"step {step}: logged reconstructions and DDIM samples to {self.args.logging_dir}")


def grid(images: np.ndarray, columns: Optional[int] = None) -> np.ndarray:
    """NHWC uint8 images tiled into one HWC image (VisualDL's add_image takes one image)."""
    n, h, w, c = images.shape
    columns = columns or n
    rows = -(-n // columns)
    out = np.zeros((rows * h, columns * w, c), dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        out[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return out
