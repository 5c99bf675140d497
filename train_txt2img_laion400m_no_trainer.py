"""Stage 2 as an explicit loop: the same training as train_txt2img_laion400m_trainer.py,
written out top to bottom (AdamW, schedule, accumulation, clipping, AMP, EMA, logging,
checkpoints) for readers who want to see every step. Runs alone or under
`python -m paddle.distributed.launch`."""
import contextlib
import dataclasses
import os
import time

import paddle
import paddle.distributed as dist
from paddle.io import DataLoader
from paddlenlp.trainer import PdArgumentParser, set_seed
from paddlenlp.utils.log import logger
from ppdiffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ldm.args import DataArguments, LoopArguments, ModelArguments
from ldm.checkpoint import CheckpointWriteError, load_checkpoint, load_data_position, save_checkpoint
from ldm.data import StreamProgress, TextImageStream, as_paddle_dataset
from ldm.ema import EMA
from ldm.logger import RunLogger
from ldm.model import create_model
from ldm.runtime import (NonFiniteGuard, Preemption, checkpoint_to_resume, exit_on_bad_input, log_parameter_checksum,
                         log_startup, require_writable_dir, set_cpu_threads)


def main():
    # Parse arguments (the Trainer script's --model_name_or_path is --pretrained_model_name_or_path here):
    parser = PdArgumentParser((ModelArguments, DataArguments, LoopArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses()
    model_args.model_name_or_path = model_args.model_name_or_path or args.pretrained_model_name_or_path

    # Distributed setup: one process per device; gradients are averaged by DataParallel.
    world_size, rank = dist.get_world_size(), max(0, dist.get_rank())
    if world_size > 1:
        dist.init_parallel_env()
    threads = set_cpu_threads(args.num_threads)
    set_seed(args.seed)

    # Create model and data (bad paths stop here, before any training):
    try:
        require_writable_dir(args.output_dir)
        model = create_model(model_args, data_args.resolution, args.seed, args.recompute)
        stream = TextImageStream(data_args.file_list, data_args.resolution, model.tokenizer, model.tokenizer.model_max_length,
                                 model_args.caption_dropout, data_args.shuffle_buffer, args.seed)
    except ValueError as e:
        exit_on_bad_input(e)
    log_startup(model, args.train_batch_size, args.gradient_accumulation_steps, world_size, args.num_workers, threads, stream)

    # Optimizer and learning-rate schedule (stepped once per optimizer step):
    lr_scheduler = get_scheduler(args.lr_scheduler, learning_rate=args.learning_rate,
                                 num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=lr_scheduler, parameters=model.trainable_parameters(),
        beta1=args.adam_beta1, beta2=args.adam_beta2, epsilon=args.adam_epsilon, weight_decay=args.adam_weight_decay,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(args.max_grad_norm) if args.max_grad_norm > 0 else None,
    )
    scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if args.fp16 else None
    ema = EMA(model, args.ema_decay) if args.use_ema else None

    # Resume from the newest complete checkpoint, data position included:
    step, saved = 0, None
    try:
        resume = checkpoint_to_resume(args)
    except ValueError as e:
        exit_on_bad_input(e)
    if resume:
        step = load_checkpoint(resume, model, optimizer, lr_scheduler, ema, scaler)
        saved = load_data_position(resume, rank)
        if saved is not None:
            try:
                stream.resume(saved, args.num_workers)
            except ValueError as e:
                exit_on_bad_input(e)
    progress = StreamProgress(world_size, args.num_workers, saved)
    train_model = paddle.DataParallel(model) if world_size > 1 else model
    loader = DataLoader(as_paddle_dataset(stream), batch_size=args.train_batch_size, num_workers=args.num_workers, drop_last=True)
    vdl = RunLogger(os.path.join(args.output_dir, "runs"))

    # Train: an endless stream, counted in optimizer steps.
    preemption, guard = Preemption(), NonFiniteGuard(args.max_nonfinite_steps)
    bar = tqdm(total=args.max_train_steps, initial=step, desc="train", disable=rank > 0)
    micro, skip_step, loss_sum, interval_start, interval_images = 0, False, 0.0, time.time(), 0
    for batch in loader:
        if step >= args.max_train_steps:
            break
        progress.update(batch)
        micro += 1
        sync_now = micro % args.gradient_accumulation_steps == 0
        with paddle.amp.auto_cast(enable=args.fp16, level="O1"):
            loss = train_model(**batch)
        # A non-finite loss (on any rank) skips the whole optimizer step: no backward, no update.
        if skip_step or not guard.is_finite(loss):
            skip_step = True
        else:
            # Accumulating: only the last micro-batch of a step all-reduces gradients.
            with train_model.no_sync() if world_size > 1 and not sync_now else contextlib.nullcontext():
                scaled = loss / args.gradient_accumulation_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += float(loss)
        interval_images += batch["pixel_values"].shape[0] * world_size
        if not sync_now:
            continue

        # Optimizer step (dynamic loss scaling with --fp16), schedule, EMA:
        if skip_step:
            optimizer.clear_grad()
        elif scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.clear_grad()
        lr_scheduler.step()
        if ema is not None and not skip_step:
            ema.update()
        guard.step_done(skip_step)
        skip_step = False
        step += 1
        bar.update(1)

        # Log, sample, save:
        if step % args.logging_steps == 0:
            elapsed = time.time() - interval_start
            mean_loss = paddle.to_tensor(loss_sum / (args.logging_steps * args.gradient_accumulation_steps))
            if world_size > 1:
                dist.all_reduce(mean_loss)  # the loss of all ranks' batches, not just rank 0's
            scalars = {"loss": float(mean_loss) / world_size,
                       "learning_rate": lr_scheduler.get_lr(), "images_per_second": interval_images / elapsed,
                       "nonfinite_steps_skipped": guard.skipped, **progress.skip_totals()}
            vdl.scalars(scalars, step)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['learning_rate']:.2e}")
            loss_sum, interval_start, interval_images = 0.0, time.time(), 0
        if args.image_logging_steps > 0 and step % args.image_logging_steps == 0 and rank == 0:
            with ema.applied() if ema is not None else contextlib.nullcontext():
                vdl.images(model.log_images({k: v[:8] for k, v in batch.items()}, model_args.num_inference_steps), step)
        preempted = preemption.agreed()
        if step % args.save_steps == 0 or step == args.max_train_steps or preempted:
            try:
                save_checkpoint(args.output_dir, step, model, optimizer, lr_scheduler, progress.state_dict(),
                                {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **dataclasses.asdict(args)},
                                ema, scaler, args.save_total_limit)
            except CheckpointWriteError as e:
                raise SystemExit(f"error: {e}")
        if preempted:
            logger.info(f"Preempted: saved checkpoint-{step} in {args.output_dir}; re-run the same command to continue")
            return
    bar.close()
    vdl.close()
    log_parameter_checksum(model, rank)

    # Save the final model (EMA weights with --use_ema) as a ppdiffusers pipeline directory:
    if rank == 0:
        with ema.applied() if ema is not None else contextlib.nullcontext():
            model.save_pipeline(args.output_dir)
        logger.info(f"Saved LDMTextToImagePipeline to {args.output_dir}")


if __name__ == "__main__":
    main()
