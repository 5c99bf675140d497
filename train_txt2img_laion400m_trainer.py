"""Stage 2: train LDMBert + UNet on a frozen autoencoder's latents with the PaddleNLP Trainer."""
import dataclasses
import sys

from paddlenlp.trainer import set_seed
from paddlenlp.utils.log import logger

from ldm.training.args import DataArguments, LDMTrainingArguments, ModelArguments, RecipeArguments, flags_passed, parse_args
from ldm.data.progress import as_paddle_dataset
from ldm.training.ema import maybe_applied
from ldm.models.flops import flops_per_training_image
from ldm.training.build import create_model, create_stream
from ldm.training.checkpoint import checkpoint_to_resume
from ldm.evaluation.export import save_final
from ldm.training.runtime import exit_on_bad_input, log_parameter_checksum, log_startup, require_writable_dir, set_cpu_threads
from ldm.training.trainer import StreamTrainer
from ldm.training.validation import Validator, fixed_log_batch
from ldm.core.process import leave_imports_out_of_gc


def main():
    leave_imports_out_of_gc()  # the collector's full passes skip the libraries imported above
    # Parse arguments:
    model_args, data_args, recipe_args, training_args = parse_args(ModelArguments, DataArguments, RecipeArguments, LDMTrainingArguments)
    threads = set_cpu_threads(training_args.num_threads, training_args.dataloader_num_workers)  # the cores the data workers leave
    set_seed(training_args.seed)

    # Create model and data (bad paths stop here, before any training):
    try:
        require_writable_dir(training_args.output_dir)
        # A continued model keeps the prediction type and noise schedule it was trained with:
        model = create_model(model_args, data_args.resolution, training_args.seed, training_args.recompute, recipe_args.recipe(),
                             flags_passed(ModelArguments, DataArguments, RecipeArguments, LDMTrainingArguments))
        recipe_args.keep(model.recipe)
        stream = create_stream(model, model_args, data_args, training_args.seed, training_args.per_device_train_batch_size)
        # FLOPs per image, counted once on the modules before any compiling, for the logged tflops_per_device:
        flops_per_image = flops_per_training_image(model, data_args.resolution, stream.latent_cache is not None, training_args.recompute)
        if training_args.to_static:
            # UNet and LDMBert only: the Trainer's own --to_static would convert the whole step
            # (frozen encoder, random draws) as one graph, so it is told not to.
            model.compile_static()
            training_args.to_static = False
    except ValueError as e:
        exit_on_bad_input(e)
    log_startup(model, training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps,
                training_args.world_size, training_args.dataloader_num_workers, threads, stream)
    # Fixed inputs for the logged samples and the validation loss (rank 0 logs them):
    rank0 = training_args.process_index <= 0
    log_batch = fixed_log_batch(data_args.eval_file_list or data_args.file_list, data_args.resolution, 8, model.tokenizer,
                                model.tokenizer.model_max_length, data_args.validation_prompts, training_args.seed) if training_args.image_logging_steps > 0 and rank0 else None
    try:
        validator = Validator(model, data_args.eval_file_list, data_args.eval_records, data_args.resolution,
                              training_args.per_device_train_batch_size, training_args.seed) if data_args.eval_file_list and rank0 else None
    except ValueError as e:
        exit_on_bad_input(e)

    # Train (re-running the same command continues from the newest checkpoint):
    try:
        resume = checkpoint_to_resume(training_args)
        trainer = StreamTrainer(
            model=model, args=training_args, train_dataset=as_paddle_dataset(stream), resume_from=resume,
            image_logging_steps=training_args.image_logging_steps, num_inference_steps=model_args.num_inference_steps,
            run_args={**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **dataclasses.asdict(recipe_args), **training_args.to_dict()}, log_batch=log_batch, validator=validator,
            flops_per_image=flops_per_image, trust_pickle=model_args.trust_pickle,
        )
    except ValueError as e:
        exit_on_bad_input(e)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted:
        logger.info(f"Preempted: saved checkpoint-{trainer.state.global_step} in {training_args.output_dir}; re-run the same command to continue")
        return
    log_parameter_checksum(model, max(0, trainer.args.process_index))

    # Save the final model (EMA weights with --use_ema) in --export_format, with its model card:
    if trainer.is_world_process_zero():
        with maybe_applied(trainer.ema):
            written = save_final(model, training_args.output_dir, model_args.export_format, "EMA" if trainer.ema is not None else "raw", sys.argv)
        logger.info(f"Saved LDMTextToImagePipeline ({model_args.export_format} layout) to {', '.join(written)}")


if __name__ == "__main__":
    main()
