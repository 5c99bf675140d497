"""Training on the PaddleNLP Trainer: the loss is the model's, everything else is logged beside it.

Where the stock Trainer falls short and what we add (each in one small method):
  * `get_train_dataloader`: our stream shards itself by rank and worker, so it must not be
    wrapped again in the Trainer's `IterableDatasetShard` (which would drop 1 - 1/world of it);
  * `compute_loss`: strips the stream's bookkeeping (`skips`, `worker`) before the model sees it;
  * `log`: adds images/s and the data skips summed over workers and ranks;
  * `_maybe_log_save_evaluate`: at `--image_logging_steps`, reconstructions and DDIM samples
    go to VisualDL (the stock VisualDL callback logs scalars only).
"""
import json
import os
from typing import Dict, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.io import DataLoader
from paddlenlp.trainer import Trainer
from paddlenlp.utils.log import logger

from ldm.checkpoint import data_position_file, load_data_position
from ldm.data import StreamProgress
from ldm.logger import RunLogger


def _unwrap(model):
    return model._layers if isinstance(model, paddle.DataParallel) else model


class StreamTrainer(Trainer):
    """Trainer for any model here whose forward(**batch) returns the loss and has log_images(batch, steps)."""

    def __init__(self, *args, image_logging_steps: int = 0, num_inference_steps: int = 50, resume_from: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_logging_steps = image_logging_steps
        self.num_inference_steps = num_inference_steps
        self._last_batch = None
        self._image_writer = None
        # Resume the data stream from the checkpoint's saved position, not by replaying
        # batches: tell the Trainer not to skip any (ignore_data_skip), and restore the
        # RNG state ourselves before the first step (the Trainer only does so when it skips).
        rank = max(0, dist.get_rank())
        saved = load_data_position(resume_from, rank) if resume_from and not self.args.ignore_data_skip else None
        if saved is not None:
            self.train_dataset.stream.resume(saved, self.args.dataloader_num_workers)
            self.args.ignore_data_skip = True
            logger.info(f"Data stream resumes at the position saved in {data_position_file(resume_from, rank)}")
        self.progress = StreamProgress(self.train_dataset.stream.world_size, self.args.dataloader_num_workers, saved)
        self._rng_checkpoint = resume_from if saved is not None else None

    def get_train_dataloader(self):
        return DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            num_workers=self.args.dataloader_num_workers,
            drop_last=True,
        )

    def training_step(self, model, inputs):
        if self._rng_checkpoint is not None:
            self._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None
        return super().training_step(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False):
        self.progress.update(inputs.pop("skips"), inputs.pop("worker"), inputs.pop("position"))
        self._last_batch = inputs
        loss = model(**inputs)
        return (loss, None) if return_outputs else loss

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "interval_samples_per_second" in logs:
            logs["images_per_second"] = logs["interval_samples_per_second"]
            logs.update(self.progress.skip_totals())
        super().log(logs, **kwargs)

    def _save_checkpoint(self, model, metrics=None):
        super()._save_checkpoint(model, metrics=metrics)
        # Every rank saves its own workers' data position beside the Trainer's files.
        checkpoint_dir = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        os.makedirs(checkpoint_dir, exist_ok=True)
        with open(data_position_file(checkpoint_dir, max(0, dist.get_rank())), "w") as f:
            json.dump(self.progress.state_dict(), f)

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
            self._image_writer = RunLogger(self.args.logging_dir, file_name="vdlrecords.images.log")
        self._image_writer.images(_unwrap(self.model).log_images(batch, self.num_inference_steps), step)
        logger.info(f"step {step}: logged reconstructions and DDIM samples to {self.args.logging_dir}")
