"""Training on the PaddleNLP Trainer: the loss is the model's, everything else is logged beside it.

Where the stock Trainer falls short and what we add (each in one small method):
  * `__init__`: gives every rank its own RNG stream for the training draws; resumes the data
    stream from the checkpoint's saved position (instead of the Trainer replaying batches) and
    the EMA with its warm-up counter;
  * `get_train_dataloader`: our stream shards itself by rank and worker, so it must not be
    wrapped again in the Trainer's `IterableDatasetShard` (which would drop 1 - 1/world of it);
  * `training_step`: notes non-finite losses on the device and, at the last micro-batch of a
    step, agrees with the other ranks in one all-reduce on skipping the step (non-finite loss),
    stopping (SIGTERM) or failing (dead data stream): the step's only host sync;
  * `compute_loss`: hands the stream's bookkeeping to `StreamProgress` before the model sees the batch;
  * `_maybe_log_save_evaluate` (the stock hook right after each optimizer step): EMA update,
    SIGTERM -> save and stop, the last step always saved, images at `--image_logging_steps`;
  * `log`: adds images/s (in all and per device), achieved TFLOP/s per device (from the FLOPs per image
    counted at start-up, ldm.flops), skipped non-finite steps and the data skips summed over workers and ranks;
  * `_save_checkpoint`: our checkpoint layout (ldm.checkpoint: safetensors and JSON, nothing pickled,
    manifest.json last) on every rank through `ldm.checkpoint.save_atomically` (staged, agreed
    across ranks, checked finite, renamed, rotated by step);
  * `_load_from_checkpoint`, `_load_optimizer_and_scheduler`, `_load_rng_state`: read those files
    (the stock ones `paddle.load` pickles); an old pickled checkpoint only with --trust_pickle;
  * `_set_state_dict_in_model`: a saved weight of another shape stops the run, naming it.
"""
import os
from typing import Dict, Optional

import paddle
import paddle.distributed as dist
from paddle.io import DataLoader
from paddlenlp.trainer import Trainer
from paddlenlp.trainer.trainer import TRAINER_STATE_NAME
from paddlenlp.trainer.utils.helper import broadcast_dp_optimizer
from paddlenlp.utils.log import logger
from safetensors.numpy import load_file

from ldm.training.checkpoint import (CheckpointWriteError, checkpoint_weights, load_optimizer_state, load_rng_state, load_small_state, load_weights,
                                     require_good_checkpoint, save_atomically, set_weights, write_args, write_weights)
from ldm.training.data_position import data_position_file, resume_data_stream
from ldm.models.ldm import check_state_shapes
from ldm.training.checkpoint_io import encode, restore_stock_rng, rng_to_json, write_file, write_json, write_state
from ldm.data.progress import StreamProgress, init_worker
from ldm.training.ema import EMA, maybe_applied
from ldm.training.logger import RunLogger
from ldm.training.runtime import StepAgreement, exit_on_bad_input, seed_rank_streams, skip_warning
from ldm.core.rng import preserved_rng
from ldm.core.safeload import load_pickle


def _unwrap(model):
    return model._layers if isinstance(model, paddle.DataParallel) else model


class StreamTrainer(Trainer):
    """Trainer for any model here whose forward(**batch) returns the loss and has log_images(batch, steps)."""

    def __init__(self, *args, image_logging_steps: int = 0, num_inference_steps: int = 50, resume_from: Optional[str] = None,
                 run_args: Optional[dict] = None, log_batch: Optional[dict] = None, validator=None, flops_per_image: float = 0.0,
                 trust_pickle: bool = False, **kwargs):
        super().__init__(*args, **kwargs)  # (calls paddlenlp's set_seed(--seed): the same on every rank)
        rank = max(0, dist.get_rank())
        self.trust_pickle = trust_pickle  # read an old checkpoint's pickles (--trust_pickle)
        if resume_from:
            # Before anything is read from it: the manifest must check out, an old pickled checkpoint needs --trust_pickle.
            require_good_checkpoint(resume_from, trust_pickle)
        seed_rank_streams(self.args.seed, rank)
        self.image_logging_steps = image_logging_steps
        self.num_inference_steps = num_inference_steps
        self.run_args = run_args or {}
        self.log_batch = log_batch  # fixed images and prompts for the logged reconstructions and samples
        self.validator = validator  # ldm.validation.Validator on rank 0 with --eval_file_list, else None
        self.flops_per_image = flops_per_image  # counted at start-up (ldm.flops): the logged tflops_per_device
        self.eval_every = self.args.eval_steps or self.args.logging_steps
        self._image_writer = None
        # Resume the data stream from the checkpoint's saved position, not by replaying
        # batches: tell the Trainer not to skip any (ignore_data_skip), and restore the
        # RNG state ourselves before the first step (the Trainer only does so when it skips).
        stream = self.train_dataset.stream
        saved = resume_data_stream(stream, resume_from, rank, self.args.dataloader_num_workers, self.args.ignore_data_skip) if resume_from else None
        if saved is not None:
            logger.info(f"Data stream resumes at the position saved in {data_position_file(resume_from, rank)}")
        self.args.ignore_data_skip = True
        self.progress = StreamProgress(stream.world_size, self.args.dataloader_num_workers, saved, stream=stream)
        self._rng_checkpoint = resume_from
        self.agreement = StepAgreement(getattr(self.args, "max_nonfinite_steps", 10))
        self.preempted = False
        self._micro = 0
        self._skip_step = False
        self._ema_step = None  # the last step the EMA took in
        self._saved_at = None  # the last step checkpointed
        self._logged_images_at = None
        self._validated_at = None
        # EMA of the trained weights, updated right after each optimizer step (_maybe_log_save_evaluate).
        self.ema = EMA(self.model, self.args.ema_decay) if getattr(self.args, "use_ema", False) else None
        if self.ema is not None and resume_from and os.path.isfile(os.path.join(resume_from, "ema.safetensors")):
            self.ema.load_numpy(load_file(os.path.join(resume_from, "ema.safetensors")))

    def get_train_dataloader(self):
        return DataLoader(
            self.train_dataset,
            batch_size=self.train_dataset.stream.loader_batch_size(self.args.per_device_train_batch_size),  # None: the stream yields whole (bucketed) batches
            num_workers=self.args.dataloader_num_workers,
            worker_init_fn=init_worker,  # one thread per worker; the training process has the cores left
            drop_last=True,
        )

    def training_step(self, model, inputs):
        """One micro-batch: forward and backward, with the non-finite check kept on the device.
        At the step's last micro-batch the ranks agree on the step (see ldm.runtime.StepAgreement);
        a step to skip loses its gradients (grads of None make AdamW leave every weight untouched)."""
        if self._rng_checkpoint is not None:
            self._load_rng_state(self._rng_checkpoint)
            self._rng_checkpoint = None
        self._micro += 1
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.autocast_smart_context_manager():
            loss = self.compute_loss(model, inputs)
        self.agreement.observe(loss)
        if self.args.gradient_accumulation_steps > 1:
            loss = loss / self.args.gradient_accumulation_steps
        if self.do_grad_scaling:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self._micro % self.args.gradient_accumulation_steps == 0:
            if not self.do_grad_scaling:  # (the loss scaler skips infinite gradients itself)
                self.agreement.observe_gradients(model.parameters())
            verdict = self.agreement.finish_step(self.progress.fatal)
            self._skip_step = verdict.skip
            self.preempted = self.preempted or verdict.preempt
            if verdict.skip:
                self.optimizer.clear_grad(set_to_zero=False)
                logger.warning(skip_warning(self.state.global_step + 1, verdict))
        # A non-finite loss must not poison the logged mean (the step is skipped anyway).
        return paddle.nan_to_num(loss.detach(), nan=0.0, posinf=0.0, neginf=0.0)

    def compute_loss(self, model, inputs, return_outputs=False):
        self.progress.update(inputs)
        loss = model(**inputs)
        return (loss, None) if return_outputs else loss

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "interval_samples_per_second" in logs:
            logs["images_per_second"] = logs["interval_samples_per_second"]
            # The Trainer's rate counts every device's images; the devices step in lock-step, so each one's is this share.
            logs["images_per_second_per_device"] = logs["images_per_second"] / self.args.world_size
            if self.flops_per_image:
                logs["tflops_per_device"] = logs["images_per_second_per_device"] * self.flops_per_image / 1e12
            logs["nonfinite_steps_skipped"] = self.agreement.skipped
            logs.update(self.progress.skip_totals())
        super().log(logs, **kwargs)

    def _maybe_log_save_evaluate(self, tr_loss, model, epoch, ignore_keys_for_eval, **kwargs):
        # The stock loop calls this right after each optimizer step (and once more at the end):
        # the step is complete, so the EMA takes it in, once per step.
        step = self.state.global_step
        if self.ema is not None and self._ema_step != step and not self._skip_step:
            self.ema.update()
        self._ema_step = step
        # A skipped step changed no weight: its --save_steps checkpoint would only repeat the last
        # one under a new number and rotate an older good one out, so it is not written.
        if self._skip_step:
            self.control.should_save = False
        # SIGTERM on any rank (agreed in training_step): save now (after a skipped step too: the
        # weights are the last good ones) and stop after this step.
        if self.preempted:
            self.control.should_save = self._saved_at != step
            self.control.should_training_stop = True
        # The last step is always checkpointed (as in the explicit loop), so re-running a finished command is a no-op.
        if step == self.args.max_steps and self._saved_at != step:
            self.control.should_save = True
        super()._maybe_log_save_evaluate(tr_loss, model, epoch, ignore_keys_for_eval, **kwargs)
        if self.image_logging_steps > 0 and step % self.image_logging_steps == 0 and self._logged_images_at != step:
            self.log_images(step)
        if self.validator is not None and step % self.eval_every == 0 and self._validated_at != step:
            self.validate(step)

    def validate(self, step: int) -> None:
        """The fixed validation loss (ldm.validation.Validator), from the exported weights, to VisualDL."""
        self._validated_at = step
        with maybe_applied(self.ema):
            losses = self.validator.losses()
        self._writer().scalars(losses, step)
        logger.info(f"step {step}: validation loss {losses['validation/loss']:.5f}")

    def _writer(self) -> RunLogger:
        if self._image_writer is None:
            self._image_writer = RunLogger(self.args.logging_dir, file_name="vdlrecords.ldm.log")
        return self._image_writer

    def log_images(self, step: int) -> None:
        """The model's `log_images` (reconstructions, samples) for the fixed log batch, to VisualDL,
        from the weights that are exported (the EMA with --use_ema), without touching the training RNG."""
        self._logged_images_at = step
        if not self.is_world_process_zero() or self.log_batch is None:
            return
        with preserved_rng(), maybe_applied(self.ema):
            images = _unwrap(self.model).log_images(self.log_batch, self.num_inference_steps)
        self._writer().images(images, step)
        logger.info(f"step {step}: logged reconstructions and samples to {self.args.logging_dir}")

    def _save_checkpoint(self, model, metrics=None):
        """Our checkpoint layout (ldm.checkpoint: safetensors and JSON, manifest last), written
        atomically on every rank through ldm.checkpoint.save_atomically. The stock Trainer's
        pickles (model_state.pdparams, optimizer.pdopt, rng_state.pth, training_args.bin) are not
        written; the loaders below read ours."""
        step = self.state.global_step
        self._saved_at = step
        weights = checkpoint_weights(_unwrap(self.model))
        # DataParallel: rank 0 writes the optimizer state (every rank's is the same). --sharding:
        # each shard's first data-parallel rank writes its shard, named as the stock Trainer names it.
        sharded = self.args.use_hybrid_parallel and self.args.sharding_parallel_degree > 1
        write_optimizer = self.args.data_parallel_rank == 0 if sharded else self.args.should_save

        def write_files(tmp, rank):
            files = {}
            if write_optimizer:
                files.update(write_state(tmp, self._optimizer_stem(), self.optimizer.state_dict()))
            if self.args.should_save:
                files.update(write_weights(tmp, weights, self.ema))
                files["scheduler.json"] = write_json(os.path.join(tmp, "scheduler.json"), encode(self.lr_scheduler.state_dict()))
                if self.do_grad_scaling:
                    files["scaler.json"] = write_json(os.path.join(tmp, "scaler.json"), encode(self.scaler.state_dict()))
                files["args.json"] = write_args(tmp, self.run_args)
                files[TRAINER_STATE_NAME] = write_file(os.path.join(tmp, TRAINER_STATE_NAME), self.state.save_to_json)
            files[f"rng_state_rank{rank}.json"] = write_json(os.path.join(tmp, f"rng_state_rank{rank}.json"), rng_to_json(self.args.use_hybrid_parallel))
            files[os.path.basename(data_position_file(tmp, rank))] = write_json(data_position_file(tmp, rank), self.progress.state_dict())
            return files

        check = {**weights, **({f"ema:{k}": v for k, v in self.ema.shadow.items()} if self.ema is not None else {})}
        try:
            save_atomically(self.args.output_dir, step, write_files, self.args.save_total_limit, check_finite=check)
        except CheckpointWriteError as e:
            raise SystemExit(f"error: {e}")

    def _optimizer_stem(self) -> str:
        suffix = self.args.optimizer_name_suffix
        return f"optimizer.{suffix}" if suffix else "optimizer"

    # The stock loaders `paddle.load` the stock pickles; these read our files instead (an old
    # pickled checkpoint only with --trust_pickle, checked in __init__ before anything is read).
    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        if not resume_from_checkpoint:
            return
        model = _unwrap(self.model)
        try:
            weights = load_weights(resume_from_checkpoint, model, self.trust_pickle)
        except ValueError as e:
            exit_on_bad_input(e)
        logger.info(f"Loading model from {resume_from_checkpoint}")
        set_weights(model, weights)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or self.args.ignore_load_lr_and_optim:  # (the stock flag: fresh optimizer and schedule)
            return
        if self.args.should_load_sharding_stage1_model:
            exit_on_bad_input(ValueError("--load_sharded_model (PaddleNLP's resharding load) reads pickles; resume without it: each "
                                         "shard's rank reads its own optimizer.shardNN files"))
        # As the stock loader: the first data-parallel rank reads, the others receive it (not 32 reads of 11.6 GB).
        state = load_optimizer_state(checkpoint, self._optimizer_stem(), self.trust_pickle) if self.args.data_parallel_rank == 0 else None
        if self.args.local_rank != -1:
            dist.barrier()
        self.optimizer.set_state_dict(broadcast_dp_optimizer(state))
        self.lr_scheduler.set_state_dict(load_small_state(checkpoint, "scheduler", self.trust_pickle))
        if self.do_grad_scaling:
            scaler = load_small_state(checkpoint, "scaler", self.trust_pickle, return_numpy=True)
            if scaler is not None:
                self.scaler.load_state_dict(scaler)

    def _load_rng_state(self, checkpoint):
        if checkpoint is None:
            return
        rank = max(0, self.args.process_index)
        if load_rng_state(checkpoint, rank, self.trust_pickle):
            return
        old = os.path.join(checkpoint, f"rng_state_{self.args.world_size}.pth" if self.args.world_size > 1 else "rng_state.pth")
        if os.path.isfile(old):  # an old Trainer checkpoint (the stock layout: every rank's state in one pickle)
            states = load_pickle(old, self.trust_pickle, return_numpy=True)
            restore_stock_rng(states[rank] if self.args.world_size > 1 else states)
            return
        logger.info(f"{checkpoint} has no RNG state for rank {rank} (saved with fewer ranks?): it keeps its own seed")

    def _set_state_dict_in_model(self, state_dict):
        try:
            check_state_shapes(self.model, state_dict, "the checkpoint being resumed")
        except ValueError as e:
            exit_on_bad_input(e)
        return super()._set_state_dict_in_model(state_dict)
