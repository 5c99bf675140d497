"""Training on the PaddleNLP Trainer: the loss is the model's, everything else is logged beside it.

Where the stock Trainer falls short and what we add (each in one small method):
  * `__init__`: resumes the data stream from the checkpoint's saved position (instead of the
    Trainer replaying batches) and restores the RNG before the first step;
  * `get_train_dataloader`: our stream shards itself by rank and worker, so it must not be
    wrapped again in the Trainer's `IterableDatasetShard` (which would drop 1 - 1/world of it);
  * `training_step`: EMA update after each optimizer step, and skipping a step whose loss is
    non-finite on any rank;
  * `compute_loss`: records the stream's bookkeeping (`skips`, `worker`, `position`) and strips
    it before the model sees the batch;
  * `log`: adds images/s, skipped non-finite steps and the data skips summed over workers and ranks;
  * `_save_checkpoint`: atomic (staged, then renamed), with the EMA and every rank's data
    position, rotated by step;
  * `_maybe_log_save_evaluate`: SIGTERM -> save and stop; the last step is always saved; at
    `--image_logging_steps`, reconstructions and DDIM samples go to VisualDL (the stock VisualDL
    callback logs scalars only).
"""
import contextlib
import json
import os
import shutil
from typing import Dict, Optional

import paddle
import paddle.distributed as dist
from paddle.io import DataLoader
from paddlenlp.trainer import Trainer
from paddlenlp.utils.log import logger
from safetensors.numpy import load_file, save_file

from ldm.checkpoint import STAGING_DIR, data_position_file, latest_checkpoint, load_data_position, rotate_checkpoints
from ldm.data import StreamProgress
from ldm.ema import EMA
from ldm.logger import RunLogger
from ldm.runtime import NonFiniteGuard, Preemption


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
        self.preemption = Preemption()
        self.preempted = False
        self.guard = NonFiniteGuard(getattr(self.args, "max_nonfinite_steps", 10))
        self._micro = 0
        self._skip_step = False
        # A checkpoint is saved right after an optimizer step, before that step's EMA update.
        self._step_pending = bool(resume_from)
        # EMA of the trained weights, updated right after each optimizer step (see training_step).
        self.ema = EMA(self.model, self.args.ema_decay) if getattr(self.args, "use_ema", False) else None
        if self.ema is not None and resume_from and os.path.isfile(os.path.join(resume_from, "ema.safetensors")):
            self.ema.load_numpy(load_file(os.path.join(resume_from, "ema.safetensors")))

    def get_train_dataloader(self):
        return DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            num_workers=self.args.dataloader_num_workers,
            drop_last=True,
        )

    def training_step(self, model, inputs):
        """One micro-batch. Where the stock loop leaves no hook, the step-level work happens here:
        at the first micro-batch of a step, the previous optimizer step is complete, so the EMA
        takes it in (the last step's update happens in `train`); a non-finite loss on any rank
        drops the step's gradients (grads of None make AdamW leave every weight untouched)."""
        if self._step_pending:
            self._finish_optimizer_step()
        if self._rng_checkpoint is not None:
            self._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None
        self._micro += 1
        # After this micro-batch the Trainer runs the optimizer step; finish it at the next call.
        self._step_pending = self._micro % self.args.gradient_accumulation_steps == 0
        if self._skip_step:
            return paddle.zeros([])
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.autocast_smart_context_manager():
            loss = self.compute_loss(model, inputs)
        if not self.guard.is_finite(loss):
            self._skip_step = True
            self.optimizer.clear_grad(set_to_zero=False)
            logger.warning(f"step {self.state.global_step + 1}: non-finite loss, skipping this optimizer step")
            return paddle.zeros([])
        if self.args.gradient_accumulation_steps > 1:
            loss = loss / self.args.gradient_accumulation_steps
        if self.do_grad_scaling:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return loss.detach()

    def _finish_optimizer_step(self) -> None:
        if self.ema is not None and not self._skip_step:
            self.ema.update()
        self.guard.step_done(self._skip_step)
        self._skip_step = False
        self._step_pending = False

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self._step_pending:
            self._finish_optimizer_step()
        return output

    def compute_loss(self, model, inputs, return_outputs=False):
        self.progress.update(inputs)
        self._last_batch = inputs
        loss = model(**inputs)
        return (loss, None) if return_outputs else loss

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "interval_samples_per_second" in logs:
            logs["images_per_second"] = logs["interval_samples_per_second"]
            logs["nonfinite_steps_skipped"] = self.guard.skipped
            logs.update(self.progress.skip_totals())
        super().log(logs, **kwargs)

    def _save_checkpoint(self, model, metrics=None):
        """The stock save, made atomic: it writes into a staging directory, we add the EMA and
        every rank's data position, and rank 0 renames the result to checkpoint-N."""
        final_root = self.args.output_dir
        staging_root = os.path.join(final_root, STAGING_DIR)
        name = f"checkpoint-{self.state.global_step}"
        staged = os.path.join(staging_root, name)
        self.args.output_dir = staging_root  # the stock method writes to <output_dir>/checkpoint-N
        try:
            super()._save_checkpoint(model, metrics=metrics)
        except OSError as e:
            shutil.rmtree(staged, ignore_errors=True)
            raise SystemExit(f"error: could not write {name} in {final_root}: {e.strerror or e}; the newest complete "
                             f"checkpoint is {latest_checkpoint(final_root) or 'none'} and is untouched. Free space or fix the directory, then re-run")
        finally:
            self.args.output_dir = final_root
        os.makedirs(staged, exist_ok=True)
        if self.ema is not None and self.is_world_process_zero():
            # Saved before this step's EMA update, which the resumed run's first micro-batch performs.
            save_file(self.ema.state_numpy(), os.path.join(staged, "ema.safetensors"))
        with open(data_position_file(staged, max(0, dist.get_rank())), "w") as f:
            json.dump(self.progress.state_dict(), f)
        if dist.get_world_size() > 1:
            dist.barrier()
        if self.is_world_process_zero():
            final = os.path.join(final_root, name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staged, final)
            with contextlib.suppress(OSError):
                os.rmdir(staging_root)  # only if empty
            # The stock Trainer rotates only when local_rank == 0 (never in a single process) and
            # by modification time; rotate by step, now that this checkpoint is complete.
            rotate_checkpoints(final_root, self.args.save_total_limit)
        if dist.get_world_size() > 1:
            dist.barrier()

    def _maybe_log_save_evaluate(self, tr_loss, model, epoch, ignore_keys_for_eval, **kwargs):
        # SIGTERM on any rank: save now and stop after this step (every rank agrees on the step).
        if self.preemption.agreed():
            self.control.should_save = True
            self.control.should_training_stop = True
            self.preempted = True
        # The last step is always checkpointed (as in the explicit loop), so re-running a finished command is a no-op.
        if self.state.global_step == self.args.max_steps:
            self.control.should_save = True
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
