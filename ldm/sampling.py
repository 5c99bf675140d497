"""Sampling from a trained model directory with stock ppdiffusers, as a user would."""
from typing import List

from PIL import Image, ImageDraw

from ldm.sample_data import follows_prompt, parse_caption


def sample_grid(model_dir: str, prompts: List[str], per_prompt: int, path: str, guidance_scale: float = 7.5, steps: int = 50, seed: int = 0):
    """Write a PNG grid (one row per prompt, with the prompt written above it).

    Returns (path, background matches, shape-colour matches, samples scored)."""
    import paddle
    from ppdiffusers import LDMTextToImagePipeline

    pipe = LDMTextToImagePipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    latent = pipe.unet.config.sample_size
    # The stock pipeline makes latents of height // 8 whatever the autoencoder's factor,
    # so ask for latent * 8 pixels to get latents of the size the UNet was trained on.
    size = latent * 8
    rows, bg_ok, fg_ok, total = [], 0, 0, 0
    for i, prompt in enumerate(prompts):
        generator = paddle.Generator().manual_seed(seed + i)
        images = pipe([prompt] * per_prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images
        rows.append(images)
        if parse_caption(prompt):
            for image in images:
                bg, fg = follows_prompt(image, prompt)
                bg_ok, fg_ok, total = bg_ok + bg, fg_ok + fg, total + 1
    cell = max(96, rows[0][0].size[0] * 3)
    label_h = 14
    grid = Image.new("RGB", (cell * per_prompt, (cell + label_h) * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images) in enumerate(zip(prompts, rows)):
        y = r * (cell + label_h)
        draw.text((2, y + 1), prompt, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (c * cell, y + label_h))
    grid.save(path)
    return path, bg_ok, fg_ok, total
