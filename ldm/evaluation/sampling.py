"""Sampling from a trained model directory with stock ppdiffusers, as a user would."""
from typing import Dict, List, Tuple

from ldm.evaluation.loading import load_stock_pipeline, save_grid
from ldm.data.sample_data import SCORES, follows_prompt, parse_caption


def sample_grid(model_dir: str, prompts: List[str], per_prompt: int, path: str, guidance_scale: float = 7.5, steps: int = 50,
                seed: int = 0) -> Tuple[str, Dict[str, int], int]:
    """Write a PNG grid (one row per prompt, with the prompt written above it).

    Returns (path, {score name: samples that match their prompt in it (SCORES)}, samples scored);
    only prompts in the sample data's caption format are scored."""
    import paddle

    pipe = load_stock_pipeline(model_dir, flag="model directory")  # stock from_pretrained, after ldm.safeload's checks
    pipe.set_progress_bar_config(disable=True)
    latent = pipe.unet.config.sample_size
    # The stock pipeline makes latents of height // 8 whatever the autoencoder's factor,
    # so ask for latent * 8 pixels to get latents of the size the UNet was trained on.
    size = latent * 8
    # One call for every sample: a tiny UNet costs little more for a batch of 48 than of 8.
    generator = paddle.Generator().manual_seed(seed)
    images = pipe([p for p in prompts for _ in range(per_prompt)], height=size, width=size, num_inference_steps=steps,
                  guidance_scale=guidance_scale, generator=generator).images
    rows = [images[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]
    matches, total = dict.fromkeys(SCORES, 0), 0
    for prompt, row in zip(prompts, rows):
        if parse_caption(prompt):
            for image in row:
                for name, ok in follows_prompt(image, prompt).items():
                    matches[name] += ok
                total += 1
    return save_grid(path, prompts, rows), matches, total
