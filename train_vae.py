"""Stage 1: train the image autoencoder on the same data stream, with the PaddleNLP Trainer.

The loss is CompVis' for the LDM paper's KL autoencoders without the perceptual term: L1 + KL and,
after --disc_start steps, a patch-GAN discriminator (hinge loss, adaptive weight); see
ldm/autoencoder.py for how its training fits the Trainer. Defaults follow CompVis' KL-f8 run:
Adam betas (0.5, 0.9), no gradient clipping, kl_weight 1e-6, disc_start 50001, disc_weight 0.5,
and --learning_rate 4.5e-6 --scale_lr reproduces its learning-rate rule.
"""
import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import paddle
from paddlenlp.trainer import set_seed
from paddlenlp.utils.log import logger

from ldm.training.args import DataArguments, LDMTrainingArguments, parse_args
from ldm.training.stage1 import AutoencoderTrainer, AutoencoderTrainingModel, ReconstructionValidator
from ldm.models.autoencoder import build_autoencoder
from ldm.data.stream import TextImageStream
from ldm.data.progress import as_paddle_dataset
from ldm.data.filelists import read_file_list
from ldm.models.discriminator import NLayerDiscriminator
from ldm.training.ema import maybe_applied
from ldm.training.checkpoint import checkpoint_to_resume
from ldm.training.runtime import exit_on_bad_input, log_parameter_checksum, log_startup, require_writable_dir, set_cpu_threads
from ldm.core.files import safetensors_as_umask_allows
from ldm.training.validation import fixed_log_batch
from ldm.core.process import leave_imports_out_of_gc


@dataclass
class AutoencoderArguments:
    vae_config_file: str = field(default="config/ldm_32l/vae.json", metadata={"help": "AutoencoderKL config JSON (config/<preset>/vae.json)."})
    kl_weight: float = field(default=1e-6, metadata={"help": "Weight of the per-pixel KL term against the per-pixel L1 reconstruction loss."})
    disc_start: int = field(default=50001, metadata={"help": "Optimizer steps before the discriminator comes in (the autoencoder first learns to reconstruct); CompVis' KL-f8 used 50001."})
    disc_weight: float = field(default=0.5, metadata={"help": "Scale of the adversarial term on top of its adaptive weight (0.5 in CompVis' KL-f8 config); 0 trains without a discriminator."})
    disc_channels: int = field(default=64, metadata={"help": "Channels of the discriminator's first layer (doubling per layer, at most 8x); 64 as CompVis."})
    disc_num_layers: int = field(default=3, metadata={"help": "Stride-2 layers of the patch-GAN discriminator (3: each logit sees a 70x70 patch), as CompVis."})
    scale_lr: bool = field(default=False, metadata={"help": "Multiply --learning_rate by processes x per-device batch x accumulation, as CompVis' main.py does with its base_learning_rate 4.5e-6."})
    trust_pickle: bool = field(default=False, metadata={"help": "Resume an old checkpoint whose files are Paddle pickles (they can run code while they load): only for checkpoints you wrote yourself."})
    scaling_batches: int = field(default=8, metadata={"help": "Batches encoded after training to measure the latents' std for scaling_factor."})

    def __post_init__(self):
        if self.disc_start < 0 or self.disc_weight < 0 or self.disc_channels < 1 or self.disc_num_layers < 1:
            raise ValueError("--disc_start and --disc_weight must be >= 0, --disc_channels and --disc_num_layers >= 1")


@dataclass
class AutoencoderTrainingArguments(LDMTrainingArguments):
    # CompVis' autoencoder settings as defaults (the Trainer's own are 0.9, 0.999 and clipping at 1.0).
    adam_beta1: float = field(default=0.5, metadata={"help": "Adam's first-moment decay, for the autoencoder and the discriminator; 0.5 as CompVis' GAN-trained autoencoders."})
    adam_beta2: float = field(default=0.9, metadata={"help": "Adam's second-moment decay, for both networks; 0.9 as CompVis."})
    max_grad_norm: float = field(default=-1.0, metadata={"help": "Clip the global gradient norm (autoencoder and discriminator together) to this; -1 (default, as CompVis) does not clip."})


def main():
    leave_imports_out_of_gc()  # the collector's full passes skip the libraries imported above
    # Parse arguments:
    ae_args, data_args, training_args = parse_args(AutoencoderArguments, DataArguments, AutoencoderTrainingArguments)
    threads = set_cpu_threads(training_args.num_threads, training_args.dataloader_num_workers)  # the cores the data workers leave
    set_seed(training_args.seed)
    if ae_args.scale_lr:
        # CompVis main.py: learning_rate = accumulate_grad_batches * ngpu * batch_size * base_learning_rate.
        batch = training_args.world_size * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        logger.info(f"--scale_lr: learning rate {training_args.learning_rate:g} x {batch} images per step = {training_args.learning_rate * batch:g}")
        training_args.learning_rate *= batch

    # Create model and data:
    try:
        require_writable_dir(training_args.output_dir)
        vae = build_autoencoder(ae_args.vae_config_file)  # first: the same initial autoencoder with or without a discriminator
        discriminator = NLayerDiscriminator(3, ae_args.disc_channels, ae_args.disc_num_layers) if ae_args.disc_weight > 0 else None
        model = AutoencoderTrainingModel(vae, ae_args.kl_weight, discriminator, ae_args.disc_start, ae_args.disc_weight)
        stream = TextImageStream(data_args.file_list, data_args.resolution, buffer_size=data_args.shuffle_buffer, seed=training_args.seed,
                                 parts_per_window=data_args.parts_per_window, max_aspect_ratio=data_args.max_aspect_ratio,
                                 allow_missing_parts=data_args.allow_missing_parts)
    except ValueError as e:
        exit_on_bad_input(e)
    log_startup(model, training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps,
                training_args.world_size, training_args.dataloader_num_workers, threads, stream)
    logger.info(f"Autoencoder {sum(p.size for p in model.vae.parameters()) / 1e6:.2f}M parameters; "
                + (f"discriminator {sum(p.size for p in discriminator.parameters() if not p.stop_gradient) / 1e6:.2f}M, in after {ae_args.disc_start} steps"
                   if discriminator is not None else "no discriminator (--disc_weight 0)"))
    # Held-out images for the reconstruction PSNR (rank 0 measures it):
    rank0 = training_args.process_index <= 0
    validator = None
    if data_args.eval_file_list and rank0:
        try:
            validator = ReconstructionValidator(model, data_args.eval_file_list, data_args.eval_records, data_args.resolution,
                                                training_args.per_device_train_batch_size, training_args.seed)
            warn_if_trained_on(data_args.eval_file_list, data_args.file_list)
        except ValueError as e:
            exit_on_bad_input(e)

    # Train (re-running the same command continues from the newest checkpoint):
    try:
        resume = checkpoint_to_resume(training_args)
        log_batch = fixed_log_batch(data_args.eval_file_list or data_args.file_list, data_args.resolution, 8, seed=training_args.seed) if training_args.image_logging_steps > 0 and rank0 else None
        trainer = AutoencoderTrainer(model=model, args=training_args, train_dataset=as_paddle_dataset(stream), resume_from=resume, trust_pickle=ae_args.trust_pickle,
                                     image_logging_steps=training_args.image_logging_steps, log_batch=log_batch, validator=validator,
                                     run_args={**dataclasses.asdict(ae_args), **dataclasses.asdict(data_args), **training_args.to_dict()})
    except ValueError as e:
        exit_on_bad_input(e)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted:
        logger.info(f"Preempted: saved checkpoint-{trainer.state.global_step} in {training_args.output_dir}; re-run the same command to continue")
        return
    log_parameter_checksum(model, max(0, trainer.args.process_index))  # equal on every rank: the ranks stayed in sync

    # Measure the latent scale and save an AutoencoderKL directory (the EMA weights with --use_ema):
    if trainer.is_world_process_zero():
        # A fresh single-shard pass over the data (not the training stream's position).
        fresh = TextImageStream(data_args.file_list, data_args.resolution, buffer_size=data_args.shuffle_buffer, seed=training_args.seed, rank=0, world_size=1,
                                max_aspect_ratio=data_args.max_aspect_ratio, allow_missing_parts=data_args.allow_missing_parts)
        images = (paddle.to_tensor(r["pixel_values"][None]) for r in fresh.records(fresh.shard_stream(0, 1)))
        batches = [paddle.concat(list(itertools.islice(images, training_args.per_device_train_batch_size))) for _ in range(ae_args.scaling_batches)]
        with maybe_applied(trainer.ema):
            scaling = model.measure_scaling_factor(batches)
            model.vae.register_to_config(scaling_factor=scaling)
            model.vae.save_pretrained(training_args.output_dir)
            safetensors_as_umask_allows(training_args.output_dir)
            psnr = validator.measure()["psnr"] if validator is not None else None
        logger.info(f"Saved AutoencoderKL to {training_args.output_dir} (scaling_factor {scaling:.5f})")
        # The one number to compare autoencoders by (printed, not only logged):
        if psnr is not None:
            print(f"reconstruction PSNR on {len(psnr)} held-out images: {psnr.mean():.2f} dB", flush=True)
        else:
            print("reconstruction PSNR not measured: pass --eval_file_list with records held out of --file_list (python -m ldm.split makes both)", flush=True)


def warn_if_trained_on(eval_file_list: str, file_list: str) -> None:
    """A PSNR on training records flatters the autoencoder: say so when the two lists share parts."""
    trained = {os.path.realpath(p) for e in read_file_list(file_list) for p in e.parts}
    shared = [p for e in read_file_list(eval_file_list) for p in e.parts if os.path.realpath(p) in trained]
    if shared:
        logger.warning(f"--eval_file_list shares {len(shared)} part(s) with --file_list (e.g. {shared[0]}): the PSNR is then not on held-out images")


if __name__ == "__main__":
    main()
