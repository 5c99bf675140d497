"""Stage 1: train the image autoencoder on the same data stream, with the PaddleNLP Trainer."""
import dataclasses
import itertools
from dataclasses import dataclass, field

import paddle
from paddlenlp.trainer import set_seed
from paddlenlp.utils.log import logger

from ldm.args import DataArguments, LDMTrainingArguments, parse_args
from ldm.autoencoder import AutoencoderTrainingModel, build_autoencoder
from ldm.data import TextImageStream, as_paddle_dataset
from ldm.ema import maybe_applied
from ldm.runtime import checkpoint_to_resume, exit_on_bad_input, require_writable_dir, set_cpu_threads
from ldm.trainer import StreamTrainer
from ldm.validation import fixed_log_batch


@dataclass
class AutoencoderArguments:
    vae_config_file: str = field(default="config/ldm_32l/vae.json", metadata={"help": "AutoencoderKL config JSON (config/<preset>/vae.json)."})
    kl_weight: float = field(default=1e-6, metadata={"help": "Weight of the per-pixel KL term against the per-pixel L1 reconstruction loss."})
    scaling_batches: int = field(default=8, metadata={"help": "Batches encoded after training to measure the latents' std for scaling_factor."})


def main():
    # Parse arguments:
    ae_args, data_args, training_args = parse_args(AutoencoderArguments, DataArguments, LDMTrainingArguments)
    set_cpu_threads(training_args.num_threads)
    set_seed(training_args.seed)

    # Create model and data:
    try:
        require_writable_dir(training_args.output_dir)
        model = AutoencoderTrainingModel(build_autoencoder(ae_args.vae_config_file), ae_args.kl_weight)
        stream = TextImageStream(data_args.file_list, data_args.resolution, buffer_size=data_args.shuffle_buffer, seed=training_args.seed,
                                 parts_per_window=data_args.parts_per_window, max_aspect_ratio=data_args.max_aspect_ratio)
    except ValueError as e:
        exit_on_bad_input(e)
    logger.info(f"Autoencoder parameters: {sum(p.size for p in model.parameters()) / 1e6:.2f}M")

    # Train:
    try:
        resume = checkpoint_to_resume(training_args)
        log_batch = fixed_log_batch(data_args.file_list, data_args.resolution, 8, seed=training_args.seed) if training_args.image_logging_steps > 0 else None
        trainer = StreamTrainer(model=model, args=training_args, train_dataset=as_paddle_dataset(stream), resume_from=resume,
                                image_logging_steps=training_args.image_logging_steps, log_batch=log_batch,
                                run_args={**dataclasses.asdict(ae_args), **dataclasses.asdict(data_args), **training_args.to_dict()})
    except ValueError as e:
        exit_on_bad_input(e)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted:
        logger.info(f"Preempted: saved checkpoint-{trainer.state.global_step} in {training_args.output_dir}; re-run the same command to continue")
        return

    # Measure the latent scale and save an AutoencoderKL directory (the EMA weights with --use_ema):
    if trainer.is_world_process_zero():
        # A fresh single-shard pass over the data (not the training stream's position).
        fresh = TextImageStream(data_args.file_list, data_args.resolution, buffer_size=data_args.shuffle_buffer, seed=training_args.seed, rank=0, world_size=1,
                                max_aspect_ratio=data_args.max_aspect_ratio)
        images = (paddle.to_tensor(r["pixel_values"][None]) for r in fresh.records(fresh.shard_stream(0, 1)))
        batches = [paddle.concat(list(itertools.islice(images, training_args.per_device_train_batch_size))) for _ in range(ae_args.scaling_batches)]
        with maybe_applied(trainer.ema):
            scaling = model.measure_scaling_factor(batches)
            model.vae.register_to_config(scaling_factor=scaling)
            model.vae.save_pretrained(training_args.output_dir)
        logger.info(f"Saved AutoencoderKL to {training_args.output_dir} (scaling_factor {scaling:.5f})")


if __name__ == "__main__":
    main()
