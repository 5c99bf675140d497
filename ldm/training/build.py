"""The one place that composes data and models: arguments -> the model both training scripts
train, and the stream it trains on.
"""
from typing import Collection, Optional

from ldm.models.recipe import Recipe
from ldm.models.ldm import LatentDiffusionModel


def decay_parameter_names(model) -> set:
    """Names (paddle's `param.name`) of the weights AdamW decays: all but biases and norms,
    the rule of PaddleNLP's Trainer.create_optimizer, which the explicit loop follows too."""
    return {p.name for n, p in model.named_parameters() if not any(nd in n for nd in ("bias", "norm"))}


def create_stream(model: "LatentDiffusionModel", model_args, data_args, seed: int, batch_size: int):
    """The data stream both stage-2 scripts train on (ldm.data.TextImageStream), for this model:
    latents from the moments ldm.cache_latents put in the parts when they fit this autoencoder and
    resolution (the start-up log says which), else images the model encodes."""
    from ldm.training.cache_latents import latent_cache_for_run
    from ldm.data.stream import TextImageStream

    # Buckets' sides must survive the autoencoder's and the UNet's downsampling without padding.
    bucket_step = model.vae_scale * 2 ** (len(model.unet.config.block_out_channels) - 1)
    return TextImageStream(data_args.file_list, data_args.resolution, model.tokenizer, model.tokenizer.model_max_length,
                           model_args.caption_dropout, data_args.shuffle_buffer, seed, parts_per_window=data_args.parts_per_window,
                           max_aspect_ratio=data_args.max_aspect_ratio, aspect_ratio_buckets=data_args.aspect_ratio_buckets,
                           bucket_step=bucket_step, batch_size=batch_size, allow_missing_parts=data_args.allow_missing_parts,
                           latent_cache=latent_cache_for_run(data_args.file_list, model_args, data_args.resolution, data_args.aspect_ratio_buckets))


def create_model(model_args, resolution: int, seed: int, recompute: bool = False, recipe: Optional[Recipe] = None,
                 passed: Collection[str] = ()) -> LatentDiffusionModel:
    """The model both training scripts train: from a pipeline directory (whose prediction type and
    noise schedule it keeps: `continued_recipe`, `passed` = the flags given), or from scratch.
    `model.recipe` is what it trains with."""
    from ldm.training.args import resolve_tokenizer

    if recipe is not None:
        recipe.check()  # before anything large is built
    if model_args.model_name_or_path:
        model = LatentDiffusionModel.from_pipeline_dir(model_args.model_name_or_path, model_args.model_max_length, recipe, passed,
                                                       trust_pickle=model_args.trust_pickle)
    else:
        model = LatentDiffusionModel.from_scratch(
            model_args.vae_name_or_path, model_args.text_encoder_config_file, model_args.unet_config_file,
            resolve_tokenizer(model_args), model_args.model_max_length, seed=seed, recipe=recipe,
            token_embedding_std=model_args.text_encoder_embedding_std, trust_pickle=model_args.trust_pickle,
        )
    if resolution % model.vae_scale:
        raise ValueError(f"--resolution {resolution} is not a multiple of the autoencoder's downsampling factor {model.vae_scale}")
    latent = resolution // model.vae_scale
    if model.unet.config.sample_size != latent:
        # Samplers size their latents from the UNet config's sample_size; keep it true.
        model.unet.register_to_config(sample_size=latent)
    if recompute:
        model.enable_recompute()
    from paddlenlp.utils.log import logger

    model.encode_in_float32 = model_args.vae_encode_fp32
    if model_args.enable_xformers_memory_efficient_attention:
        on = model.enable_memory_efficient_attention()
        logger.info("UNet attention: " + ("memory-efficient / flash kernels (ppdiffusers' xformers processor)" if on else
                                          "standard (this Paddle build has no memory_efficient_attention; CUDA builds do)"))
    return model
