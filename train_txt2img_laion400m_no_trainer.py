"""Stage 2 as an explicit loop: the same training as train_txt2img_laion400m_trainer.py,
written out top to bottom (AdamW, schedule, accumulation, clipping, AMP, EMA, logging,
checkpoints) for readers who want to see every step. Runs alone or under
`python -m paddle.distributed.launch`."""
import contextlib
import dataclasses
import os
import sys
import time

import paddle
import paddle.distributed as dist
from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients
from paddle.io import DataLoader
from paddlenlp.trainer import set_seed
from paddlenlp.utils.log import logger
from ppdiffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm.training.args import DataArguments, LoopArguments, ModelArguments, RecipeArguments, flags_passed, parse_args
from ldm.training.checkpoint import CheckpointWriteError, checkpoint_to_resume, load_checkpoint, save_checkpoint
from ldm.training.data_position import resume_data_stream
from ldm.evaluation.export import save_final
from ldm.data.progress import StreamProgress, as_paddle_dataset, init_worker
from ldm.training.ema import EMA, maybe_applied
from ldm.models.flops import flops_per_training_image
from ldm.training.logger import RunLogger
from ldm.training.build import create_model, create_stream, decay_parameter_names
from ldm.training.runtime import (StepAgreement, exit_on_bad_input, log_parameter_checksum, log_startup, require_writable_dir, seed_rank_streams,
                                  set_cpu_threads, skip_warning)
from ldm.core.rng import preserved_rng
from ldm.training.validation import Validator, fixed_log_batch
from ldm.core.process import leave_imports_out_of_gc


def main():
    leave_imports_out_of_gc()  # the collector's full passes skip the libraries imported above
    # Parse arguments (the Trainer script's --model_name_or_path is --pretrained_model_name_or_path here):
    model_args, data_args, recipe_args, args = parse_args(ModelArguments, DataArguments, RecipeArguments, LoopArguments)
    model_args.model_name_or_path = model_args.model_name_or_path or args.pretrained_model_name_or_path

    # Distributed setup: one process per device; gradients are averaged by DataParallel.
    world_size, rank = dist.get_world_size(), max(0, dist.get_rank())
    if world_size > 1:
        dist.init_parallel_env()
    threads = set_cpu_threads(args.num_threads, args.num_workers)  # the cores the data workers leave
    set_seed(args.seed)  # the same on every rank: identical initial weights

    # Create model and data (bad paths stop here, before any training):
    try:
        require_writable_dir(args.output_dir)
        # A continued model keeps the prediction type and noise schedule it was trained with:
        model = create_model(model_args, data_args.resolution, args.seed, args.recompute, recipe_args.recipe(),
                             flags_passed(ModelArguments, DataArguments, RecipeArguments, LoopArguments))
        recipe_args.keep(model.recipe)
        stream = create_stream(model, model_args, data_args, args.seed, args.train_batch_size)
        # FLOPs per image, counted once on the modules before any compiling, for the logged tflops_per_device:
        flops_per_image = flops_per_training_image(model, data_args.resolution, stream.latent_cache is not None, args.recompute)
        if args.to_static:
            model.compile_static()  # UNet and LDMBert through paddle.jit.to_static
    except ValueError as e:
        exit_on_bad_input(e)
    log_startup(model, args.train_batch_size, args.gradient_accumulation_steps, world_size, args.num_workers, threads, stream)
    # Fixed inputs for the logged samples and the validation loss (rank 0 logs them):
    log_batch = fixed_log_batch(data_args.eval_file_list or data_args.file_list, data_args.resolution, 8, model.tokenizer,
                                model.tokenizer.model_max_length, data_args.validation_prompts, args.seed) if args.image_logging_steps > 0 and rank == 0 else None
    try:
        validator = Validator(model, data_args.eval_file_list, data_args.eval_records, data_args.resolution, args.train_batch_size,
                              args.seed) if data_args.eval_file_list and rank == 0 else None
    except ValueError as e:
        exit_on_bad_input(e)

    # Optimizer and learning-rate schedule, as the Trainer makes them: biases and norms are not
    # decayed; the schedule advances once per optimizer step the loss scaler did not skip.
    lr_scheduler = get_scheduler(args.lr_scheduler, learning_rate=args.learning_rate,
                                 num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps)
    decay = decay_parameter_names(model)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=lr_scheduler, parameters=model.trainable_parameters(),
        beta1=args.adam_beta1, beta2=args.adam_beta2, epsilon=args.adam_epsilon, weight_decay=args.adam_weight_decay,
        apply_decay_param_fun=lambda name: name in decay,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(args.max_grad_norm) if args.max_grad_norm > 0 else None,
    )
    scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if args.fp16 else None
    amp_dtype = "bfloat16" if args.bf16 else "float16"
    ema = EMA(model, args.ema_decay) if args.use_ema else None

    # Resume from the newest complete checkpoint, data position included; then every rank draws
    # its own noise and timesteps (a resumed run restores each rank's saved RNG state instead):
    seed_rank_streams(args.seed, rank)
    step, saved = 0, None
    try:
        resume = checkpoint_to_resume(args)
        if resume:
            step = load_checkpoint(resume, model, optimizer, lr_scheduler, ema, scaler, model_args.trust_pickle)
            saved = resume_data_stream(stream, resume, rank, args.num_workers, args.ignore_data_skip)
    except ValueError as e:
        exit_on_bad_input(e)
    progress = StreamProgress(world_size, args.num_workers, saved, resolution=data_args.resolution, stream=stream)
    train_model = paddle.DataParallel(model) if world_size > 1 else model
    loader = DataLoader(as_paddle_dataset(stream), batch_size=stream.loader_batch_size(args.train_batch_size), num_workers=args.num_workers,
                        drop_last=True, worker_init_fn=init_worker)
    vdl = RunLogger(os.path.join(args.output_dir, "runs"))

    # Train: an endless stream, counted in optimizer steps.
    agreement = StepAgreement(args.max_nonfinite_steps)
    bar = tqdm(total=args.max_train_steps, initial=step, desc="train", disable=rank > 0)
    micro, loss_sum, interval_start, interval_images = 0, paddle.zeros([1]), time.time(), 0
    step_loss = paddle.zeros([1])
    for batch in loader:
        if step >= args.max_train_steps:
            break
        progress.update(batch)
        micro += 1
        # Train mode (LDMBert's dropout on) for every step, as the Trainer's training_step: from_pretrained
        # returns eval modules, and only sampling would have switched them (ldm.model.evaluating).
        train_model.train()
        last_micro = micro % args.gradient_accumulation_steps == 0
        # DataParallel all-reduces gradients during backward unless inside no_sync, which must
        # hold the forward too (it decides in the forward). Accumulating micro-batches stay
        # local; with --recompute every micro-batch stays local and we all-reduce once below
        # (Paddle's recompute cannot overlap DataParallel's hooks; PaddleNLP's Trainer does the same).
        local_only = world_size > 1 and (args.recompute or not last_micro)
        with train_model.no_sync() if local_only else contextlib.nullcontext():
            with paddle.amp.auto_cast(enable=args.fp16 or args.bf16, level="O1", dtype=amp_dtype):
                loss = train_model(**batch)
            agreement.observe(loss)  # on the device: no host sync
            scaled = loss / args.gradient_accumulation_steps
            (scaler.scale(scaled) if scaler else scaled).backward()
        step_loss = step_loss + paddle.nan_to_num(loss.detach().astype("float32"), nan=0.0, posinf=0.0, neginf=0.0)
        interval_images += batch["input_ids"].shape[0] * world_size
        if not last_micro:
            continue
        if world_size > 1 and args.recompute:
            fused_allreduce_gradients(model.trainable_parameters(), None)

        # The ranks agree on the step (skip it? stop after it?): the step's one host sync.
        if scaler is None:  # (the loss scaler skips infinite gradients itself)
            agreement.observe_gradients(model.trainable_parameters())
        verdict = agreement.finish_step(progress.fatal)
        # Optimizer step (dynamic loss scaling with --fp16), schedule, EMA:
        scaler_skipped = False
        if verdict.skip:
            logger.warning(skip_warning(step + 1, verdict))
        elif scaler:
            scaler.step(optimizer)
            scaler.update()
            scaler_skipped = bool(scaler._cache_found_inf)  # a Python bool set by scaler.step, as the Trainer reads it
        else:
            optimizer.step()
        optimizer.clear_grad(set_to_zero=False)
        if not scaler_skipped:  # as the Trainer: only a loss-scaler skip holds the schedule back
            lr_scheduler.step()
        if ema is not None and not verdict.skip:
            ema.update()
        if not verdict.skip:
            loss_sum = loss_sum + step_loss
        step_loss = paddle.zeros([1])
        step += 1
        bar.update(1)

        # Log, sample, save:
        if step % args.logging_steps == 0:
            elapsed = time.time() - interval_start
            mean_loss = loss_sum / (args.logging_steps * args.gradient_accumulation_steps)
            if world_size > 1:
                dist.all_reduce(mean_loss)  # the loss of all ranks' batches, not just rank 0's
            per_device = interval_images / world_size / elapsed  # (this rank's own images per second: ranks step in lock-step)
            scalars = {"loss": float(mean_loss) / world_size,
                       "learning_rate": lr_scheduler.get_lr(), "images_per_second": interval_images / elapsed,
                       "images_per_second_per_device": per_device, "tflops_per_device": per_device * flops_per_image / 1e12,
                       "nonfinite_steps_skipped": agreement.skipped, **progress.skip_totals()}
            vdl.scalars(scalars, step)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['learning_rate']:.2e}")
            loss_sum, interval_start, interval_images = paddle.zeros([1]), time.time(), 0
        if args.image_logging_steps > 0 and step % args.image_logging_steps == 0 and log_batch is not None:
            # The exported weights (EMA with --use_ema), fixed inputs and noise, training RNG untouched.
            with preserved_rng(), maybe_applied(ema):
                vdl.images(model.log_images(log_batch, model_args.num_inference_steps), step)
        if validator is not None and step % (args.eval_steps or args.logging_steps) == 0:
            with maybe_applied(ema):
                losses = validator.losses()
            vdl.scalars(losses, step)
            logger.info(f"step {step}: validation loss {losses['validation/loss']:.5f}")
        # A skipped step changed no weight: its --save_steps checkpoint would only repeat the last one
        # under a new number and rotate an older good one out. SIGTERM and the last step still save.
        if (step % args.save_steps == 0 and not verdict.skip) or step == args.max_train_steps or verdict.preempt:
            try:
                save_checkpoint(args.output_dir, step, model, optimizer, lr_scheduler, progress.state_dict(),
                                {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **dataclasses.asdict(recipe_args), **dataclasses.asdict(args)},
                                ema, scaler, args.save_total_limit)
            except CheckpointWriteError as e:
                raise SystemExit(f"error: {e}")
        if verdict.preempt:
            logger.info(f"Preempted: saved checkpoint-{step} in {args.output_dir}; re-run the same command to continue")
            return
    bar.close()
    vdl.close()
    log_parameter_checksum(model, rank)

    # Save the final model (EMA weights with --use_ema) in --export_format, with its model card:
    if rank == 0:
        with maybe_applied(ema):
            written = save_final(model, args.output_dir, model_args.export_format, "EMA" if ema is not None else "raw", sys.argv)
        logger.info(f"Saved LDMTextToImagePipeline ({model_args.export_format} layout) to {', '.join(written)}")


if __name__ == "__main__":
    main()
