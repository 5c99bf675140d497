"""Using a trained model: load it from any directory a run writes, and generate images with it.

A model directory is one of
  * a pipeline directory (SPEC section 3: model_index.json, vqvae/, bert/, tokenizer/, unet/,
    scheduler/): the final --output_dir of either training script, or anything stock
    `LDMTextToImagePipeline.save_pretrained` wrote. It is loaded with stock ppdiffusers.
  * a `checkpoint-N/` of either training script: `model.safetensors` (the trainable weights),
    or an old Trainer checkpoint's `model_state.pdparams`, optionally `ema.safetensors`, and
    `args.json` (the run's arguments). The model is rebuilt from args.json with
    `ldm.model.create_model`, as the run built it, and the checkpoint's weights (the EMA ones
    when present) are loaded on top.
Either way the result is a stock `LDMTextToImagePipeline`, and sampling goes through its
`__call__`, as a user of the exported model would sample.

Nothing is unpickled unless `trust_pickle` (--trust_pickle): a pickled weight file, in the
checkpoint or in a directory its args.json names, stops the load with one line before it is
opened, and a model_index.json naming code outside ppdiffusers/paddlenlp is refused before
anything is imported (ldm.safeload).
"""
import dataclasses
import json
import os
from typing import List, Optional, Tuple

import numpy as np
import paddle
from PIL import Image, ImageDraw

PIPELINE_PARTS = ("vqvae", "bert", "tokenizer", "unet", "scheduler")
SCHEDULERS = ("ddim", "pndm", "dpm")


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_pipeline(model_dir: str, use_ema: bool = True, trust_pickle: bool = False) -> Tuple["LDMTextToImagePipeline", str]:
    """The pipeline of a model directory and a few words on which weights it holds.

    Raises ValueError with one line naming what is missing when `model_dir` is neither kind,
    or what was refused (ldm.safeload) when it would need a pickle or foreign code."""
    kind = model_dir_kind(model_dir)
    if kind == "pipeline":
        if not use_ema:
            raise ValueError(f"--no_ema needs a checkpoint-N directory: the pipeline directory {model_dir!r} holds one set of weights "
                             f"(the EMA ones if the run used --use_ema)")
        pipe = load_stock_pipeline(model_dir, trust_pickle)
        weights = "pipeline"
    else:
        model, weights = model_from_checkpoint(model_dir, use_ema, trust_pickle)
        pipe = model.to_pipeline()
        pipe.scheduler = as_saved(pipe.scheduler)  # the sampler the exported directory would give
    pipe.set_progress_bar_config(disable=True)
    return pipe, weights


def load_stock_pipeline(model_dir: str, trust_pickle: bool = False, flag: str = "--model_dir"):
    """Stock `LDMTextToImagePipeline.from_pretrained(model_dir)`, after ldm.safeload has checked
    that it will import nothing but ppdiffusers/paddlenlp classes and, without `trust_pickle`,
    read no pickle."""
    from ppdiffusers import LDMTextToImagePipeline

    from ldm.core.safeload import check_pipeline_dir

    check_pipeline_dir(model_dir, trust_pickle, flag)
    components = {}
    if diffusers_layout(model_dir):
        # A PyTorch-layout directory (python -m ldm.export --format diffusers, or a diffusers
        # download): ppdiffusers 0.29 converts its UNet and autoencoder while loading when told
        # (from_diffusers; it does not detect it), but its LDMBert reader refuses torch-format safetensors (and its from_diffusers path for LDMBert
        # is broken), so the text encoder goes through ldm.model.load_text_encoder's converter.
        from ldm.models.ldm import load_text_encoder

        components = {"bert": load_text_encoder(os.path.join(model_dir, "bert"), trust_pickle), "from_diffusers": True}
    return LDMTextToImagePipeline.from_pretrained(model_dir, **components)


def diffusers_layout(model_dir: str) -> bool:
    """Whether a pipeline directory's model_index.json was written for PyTorch diffusers."""
    with open(os.path.join(model_dir, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    return "_diffusers_version" in index or any(isinstance(v, list) and v[:1] == ["diffusers"] for v in index.values())


def model_dir_kind(model_dir: str) -> str:
    """'pipeline' or 'checkpoint'; otherwise a ValueError that says what is missing and what to pass."""
    from ldm.training.checkpoint import complete_checkpoints

    if not os.path.isdir(model_dir):
        raise ValueError(f"--model_dir {model_dir!r} is not a directory")
    if os.path.isfile(os.path.join(model_dir, "model_index.json")):
        missing = [p for p in PIPELINE_PARTS if not os.path.isdir(os.path.join(model_dir, p))]
        if missing:
            raise ValueError(f"--model_dir {model_dir!r} has model_index.json but no {missing[0]}/: an incomplete pipeline directory")
        return "pipeline"
    if any(os.path.isfile(os.path.join(model_dir, f)) for f in ("model.safetensors", "model_state.pdparams")):
        if not os.path.isfile(os.path.join(model_dir, "args.json")):
            raise ValueError(f"--model_dir {model_dir!r} is a checkpoint without args.json, so its model cannot be rebuilt; "
                             f"pass the run's final output directory instead")
        return "checkpoint"
    checkpoints = complete_checkpoints(model_dir)
    if checkpoints:
        raise ValueError(f"--model_dir {model_dir!r} has no model_index.json (the run has not finished); pass one of its checkpoints, "
                         f"e.g. the newest: {checkpoints[-1]}")
    raise ValueError(f"--model_dir {model_dir!r} has neither model_index.json (a pipeline directory) nor model.safetensors or "
                     f"model_state.pdparams (a checkpoint-N of a training run)")


def model_from_checkpoint(path: str, use_ema: bool = True, trust_pickle: bool = False):
    """The LatentDiffusionModel of a checkpoint-N (eval mode) and which weights it holds."""
    from safetensors.numpy import load_file

    from ldm.training.args import ModelArguments, RecipeArguments
    from ldm.models.ldm import check_state_shapes
    from ldm.training.checkpoint import trainable_state
    from ldm.training.build import create_model
    from ldm.core.files import read_json
    from ldm.core.safeload import load_pickle, refuse

    safe_file, pickle_file = os.path.join(path, "model.safetensors"), os.path.join(path, "model_state.pdparams")
    if not os.path.isfile(safe_file) and not trust_pickle:
        # Before the model is built (minutes and GBs for ldm_32l): an old Trainer checkpoint's
        # whole model is a pickle.
        raise refuse(pickle_file, "an old Trainer checkpoint's weights, a Paddle pickle")
    saved = read_json(os.path.join(path, "args.json"))
    try:
        model_args, recipe_args = (cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})
                                   for cls in (ModelArguments, RecipeArguments))
        # Trust is the caller's to give, never the checkpoint's: args.json records the run's
        # --trust_pickle, and a file we did not write could say anything there.
        model_args = dataclasses.replace(model_args, trust_pickle=trust_pickle)
        # The recipe (prediction type, zero-terminal-SNR betas) goes into the sampler's config.
        model = create_model(model_args, int(saved["resolution"]), int(saved.get("seed", 0)), recipe=recipe_args.recipe())
    except ValueError as e:
        # args.json holds the paths as the run was given them: relative ones resolve against the current directory.
        raise ValueError(f"rebuilding the model of {path} from its args.json: {e}") from None
    if os.path.isfile(safe_file):
        weights = load_file(safe_file)  # the trainable weights (either script)
    else:
        weights = load_pickle(pickle_file, trust_pickle, "an old Trainer checkpoint's weights, a Paddle pickle", return_numpy=True)
    missing = sorted(set(trainable_state(model)) - set(weights))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the model's weights (e.g. {missing[0]}); it belongs to a different model than its args.json describes")
    ema_file = os.path.join(path, "ema.safetensors")
    which = "raw (checkpoint has no EMA)"
    if use_ema and os.path.isfile(ema_file):
        weights.update(load_file(ema_file))  # keyed by the trainable parameters' names (plus an update counter)
        which = "EMA"
    elif os.path.isfile(ema_file):
        which = "raw (--no_ema)"
    check_state_shapes(model, weights, f"checkpoint {path}")
    state = model.state_dict()  # the frozen autoencoder's too, which the explicit loop does not save
    state.update({k: paddle.to_tensor(v) for k, v in weights.items() if k in state})
    model.set_state_dict(state)
    model.eval()
    return model, which


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def vae_factor(pipe) -> int:
    """Pixels per latent cell: 2 ** (number of downsamplings in the autoencoder)."""
    return 2 ** (len(pipe.vqvae.config.block_out_channels) - 1)


def trained_size(pipe) -> int:
    """The image side the model was trained at: the trainers keep unet.config.sample_size at
    the latent side, so this holds for any autoencoder factor (and for stock-written models,
    whose pipeline defaults to the same product)."""
    return int(pipe.unet.config.sample_size) * vae_factor(pipe)


def as_saved(scheduler):
    """The scheduler as `save_pretrained` + `from_pretrained` would give it back.

    A scheduler built in code remembers which settings it took by default (`_use_default_values`),
    and `from_config` lets the new class's own defaults replace those; a saved file has no such
    list, so every setting carries over. Without this a checkpoint's DPM-Solver took "linspace"
    timestep spacing (its default) where the exported directory's took DDIM's "leading", and the
    same weights sampled other images (max pixel difference 144 at 2 steps)."""
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    return type(scheduler).from_config(config)


def set_scheduler(pipe, name: str) -> None:
    """Swap the sampler, keeping the model's noise schedule (betas, prediction type, timestep
    spacing) from its config, read as the exported directory has it (`as_saved`)."""
    from ppdiffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    pipe.scheduler = as_saved(pipe.scheduler)

    if name != "ddim" and pipe.scheduler.config.get("rescale_betas_zero_snr", False):
        # ppdiffusers 0.29's PNDM and DPM-Solver would drop the rescaled betas (they have no such
        # option), and both divide by sqrt(alpha_T) = 0 at the terminal step.
        raise ValueError(f"--scheduler {name} cannot sample this model: it was trained with zero terminal SNR (rescaled betas), "
                         "which ppdiffusers' PNDM and DPM-Solver schedulers do not support; use --scheduler ddim")
    if name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif name == "pndm":
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)  # PLMS, as Stable Diffusion samples
    elif name == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    else:
        raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")


def check_size(pipe, height: Optional[int], width: Optional[int]) -> Tuple[int, int]:
    """Output pixels (the trained size by default); they must be whole latent cells."""
    factor = vae_factor(pipe)
    height, width = height or trained_size(pipe), width or trained_size(pipe)
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(f"--height {height} and --width {width} must be positive multiples of the autoencoder's downsampling factor {factor}")
    return height, width


def generate(pipe, prompts: List[str], height: int, width: int, num_inference_steps: int = 50, guidance_scale: float = 7.5,
             seed: int = 0, batch_size: int = 4, progress: bool = False, first_index: int = 0) -> List[Image.Image]:
    """One image per entry of `prompts`, `height` x `width` real pixels.

    Image k (counted from `first_index`, so a long list can be drawn in pieces) starts from the
    noise `initial_noise(seed, k, ...)`, so the same seed gives the same
    image whatever the batch size. The noise is drawn with numpy and handed to the pipeline:
    ppdiffusers replaces `paddle.Generator` with a tracker whose `manual_seed` calls
    `paddle.seed` and, on the CPU, then draws from the global RNG, so per-image generators
    neither stay apart within a batch nor leave the global RNG alone."""
    from tqdm.auto import tqdm

    factor = vae_factor(pipe)
    # The stock pipeline makes latents of height // 8 whatever the autoencoder's factor
    # (FACTS.md), so ask it for the pixels that give latents of the size we want.
    latent_shape = (pipe.unet.config.in_channels, height // factor, width // factor)
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk = prompts[start:start + batch_size]
        noise = np.stack([initial_noise(seed, first_index + start + i, latent_shape) for i in range(len(chunk))])
        out = pipe(chunk, height=latent_shape[1] * 8, width=latent_shape[2] * 8, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, latents=paddle.to_tensor(noise))
        images += out.images
    return images


def initial_noise(seed: int, index: int, shape) -> np.ndarray:
    """The starting latents of image `index` of a run with `seed`: standard normal, float32."""
    return np.random.default_rng([seed, index]).standard_normal(shape).astype(np.float32)


def save_grid(path: str, prompts: List[str], rows: List[List[Image.Image]]) -> str:
    """One row per prompt, the prompt written above it; cells upscaled to at least 96 px."""
    side = max(rows[0][0].size)
    scale = max(1, -(-96 // side))
    cell_w, cell_h = rows[0][0].size[0] * scale, rows[0][0].size[1] * scale
    label_h = 14
    # At least wide enough for a caption of ~60 characters in Pillow's default font.
    grid = Image.new("RGB", (max(cell_w * max(len(r) for r in rows), 360), (cell_h + label_h) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images) in enumerate(zip(prompts, rows)):
        y = r * (cell_h + label_h)
        draw.text((2, y + 1), prompt, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((cell_w, cell_h), Image.NEAREST), (c * cell_w, y + label_h))
    grid.save(path, format="PNG")
    return path


def read_prompt_file(path: str) -> List[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompt_file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]


def to_uint8_array(images: List[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
