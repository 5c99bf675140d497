"""Stage 2: train LDMBert + UNet on a frozen autoencoder's latents with the PaddleNLP Trainer."""
from paddlenlp.trainer import PdArgumentParser, set_seed
from paddlenlp.utils.log import logger

from ldm.args import DataArguments, LDMTrainingArguments, ModelArguments, resolve_tokenizer
from ldm.data import TextImageStream, as_paddle_dataset
from ldm.model import LatentDiffusionModel
from ldm.runtime import exit_on_bad_input, last_checkpoint, set_cpu_threads
from ldm.trainer import StreamTrainer


def main():
    # Parse arguments:
    parser = PdArgumentParser((ModelArguments, DataArguments, LDMTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    threads = set_cpu_threads(training_args.num_threads)
    set_seed(training_args.seed)

    # Create model and data (bad paths stop here, before any training):
    try:
        tokenizer_dir = resolve_tokenizer(model_args)
        if model_args.model_name_or_path:
            model = LatentDiffusionModel.from_pipeline_dir(model_args.model_name_or_path, model_args.model_max_length)
        else:
            model = LatentDiffusionModel.from_scratch(
                model_args.vae_name_or_path, model_args.text_encoder_config_file, model_args.unet_config_file,
                tokenizer_dir, model_args.model_max_length, seed=training_args.seed,
            )
        stream = TextImageStream(
            data_args.file_list, data_args.resolution, model.tokenizer, model_args.model_max_length,
            model_args.caption_dropout, data_args.shuffle_buffer, training_args.seed,
        )
    except ValueError as e:
        exit_on_bad_input(e)
    if training_args.recompute:
        model.enable_recompute()
    latent = data_args.resolution // model.vae_scale
    if model.unet.config.sample_size != latent:
        # The UNet config's sample_size is what samplers use to size latents; keep it true.
        model.unet.register_to_config(sample_size=latent)
    logger.info(
        f"Trainable parameters: {sum(p.size for p in model.trainable_parameters()) / 1e6:.1f}M; "
        f"latents {model.unet.config.in_channels}x{latent}x{latent}; CPU threads {threads}; "
        f"total train batch size (per device x accumulation x world) = "
        f"{training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size}"
    )

    # Train (re-running the same command continues from the newest checkpoint):
    trainer = StreamTrainer(
        model=model, args=training_args, train_dataset=as_paddle_dataset(stream),
        image_logging_steps=training_args.image_logging_steps, num_inference_steps=model_args.num_inference_steps,
    )
    resume = training_args.resume_from_checkpoint
    if resume is None and not training_args.overwrite_output_dir:
        resume = last_checkpoint(training_args.output_dir)
        if resume:
            logger.info(f"Resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)

    # Save the final model as a ppdiffusers pipeline directory:
    if trainer.is_world_process_zero():
        model.save_pipeline(training_args.output_dir)
        logger.info(f"Saved LDMTextToImagePipeline to {training_args.output_dir}")


if __name__ == "__main__":
    main()
