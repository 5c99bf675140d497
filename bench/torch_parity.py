"""Does the diffusers export compute in PyTorch what the model computes in Paddle?

    python bench/torch_parity.py --model_dir PADDLE_DIR --export_dir DIFFUSERS_DIR --torch_python /tmp/torchvenv/bin/python

Two processes, so neither venv needs the other's framework:
  1. (this venv, Paddle) loads PADDLE_DIR (a pipeline directory or checkpoint-N, through
     ldm.loading.load_pipeline), draws fixed inputs, and saves them with the UNet's, LDMBert's and
     the autoencoder's outputs (encoder posterior mean, decoder) and a few-step DDIM sample to a .npz;
  2. (--torch_python, with torch + diffusers + transformers, no Paddle) loads DIFFUSERS_DIR with
     diffusers' own classes, strictly (missing or unexpected weights are reported), runs the same
     inputs and prints the largest absolute differences.
Last line: `torch_parity: unet D, ldmbert D, vae_encode D, vae_decode D, pipeline_pixels P (max abs difference; target < 1e-4, pixels in 0-255)`.
Write the export first: python -m ldm.export --model_dir PADDLE_DIR --output_dir DIFFUSERS_DIR --format diffusers
"""
import argparse
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle on a blue background", "a green square at the top left"]
SAMPLE_STEPS = 3
# diffusers' LDMTextToImagePipeline tokenizes with max_length=77 whatever the tokenizer says (ppdiffusers
# uses tokenizer.model_max_length): only a model trained with --model_max_length 77 samples the same there.
DIFFUSERS_PROMPT_TOKENS = 77


def paddle_side(args) -> None:
    sys.path.insert(0, ROOT)
    import paddle

    from ldm.evaluation.loading import initial_noise, load_pipeline, to_uint8_array, vae_factor

    pipe, _ = load_pipeline(args.model_dir)
    unet, bert, vae, tokenizer = pipe.unet, pipe.bert, pipe.vqvae, pipe.tokenizer
    rng = np.random.default_rng(0)
    latent = int(unet.config.sample_size)
    size = latent * vae_factor(pipe)
    ids = np.asarray(tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np")["input_ids"], dtype=np.int64)
    latents = rng.standard_normal((2, unet.config.in_channels, latent, latent)).astype(np.float32)
    timesteps = np.array([10, 900], dtype=np.int64)
    images = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    with paddle.no_grad():
        text = bert(paddle.to_tensor(ids))[0]
        eps = unet(paddle.to_tensor(latents), paddle.to_tensor(timesteps), encoder_hidden_states=text).sample
        moments_mean = vae.encode(paddle.to_tensor(images)).latent_dist.mean
        decoded = vae.decode(paddle.to_tensor(latents)).sample
    noise = np.stack([initial_noise(0, i, (unet.config.in_channels, latent, latent)) for i in range(len(PROMPTS))])
    out = pipe(PROMPTS, height=latent * 8, width=latent * 8, num_inference_steps=SAMPLE_STEPS, guidance_scale=7.5, latents=paddle.to_tensor(noise))
    np.savez(args.npz, input_ids=ids, latents=latents, timesteps=timesteps, images=images, noise=noise,
             text=text.numpy(), unet=eps.numpy(), vae_encode=moments_mean.numpy(), vae_decode=decoded.numpy(),
             pixels=to_uint8_array(out.images), size=np.array(latent * 8))
    print(f"paddle side: wrote {args.npz} ({args.model_dir}, {len(PROMPTS)} prompts, {latent}x{latent} latents)")


def torch_side(args) -> None:
    import torch
    from diffusers import AutoencoderKL, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

    ref = np.load(args.npz)
    # Strict loads: every weight of diffusers' class must come from the file and nothing be left over.
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vqvae")):
        _, info = cls.from_pretrained(args.export_dir, subfolder=sub, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v}
        print(f"{sub}: diffusers {cls.__name__} loading info: {bad or 'all weights matched'}")
    _, info = LDMBertModel.from_pretrained(os.path.join(args.export_dir, "bert"), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    print(f"bert: transformers-style LDMBertModel loading info: {bad or 'all weights matched'}")

    pipe = LDMTextToImagePipeline.from_pretrained(args.export_dir)
    pipe.set_progress_bar_config(disable=True)
    diffs = {}
    with torch.no_grad():
        text = pipe.bert(torch.from_numpy(ref["input_ids"]))[0]
        diffs["ldmbert"] = float(np.abs(text.numpy() - ref["text"]).max())
        eps = pipe.unet(torch.from_numpy(ref["latents"]), torch.from_numpy(ref["timesteps"]), encoder_hidden_states=torch.from_numpy(ref["text"])).sample
        diffs["unet"] = float(np.abs(eps.numpy() - ref["unet"]).max())
        mean = pipe.vqvae.encode(torch.from_numpy(ref["images"])).latent_dist.mean
        diffs["vae_encode"] = float(np.abs(mean.numpy() - ref["vae_encode"]).max())
        decoded = pipe.vqvae.decode(torch.from_numpy(ref["latents"])).sample
        diffs["vae_decode"] = float(np.abs(decoded.numpy() - ref["vae_decode"]).max())
        size = int(ref["size"])
        positions = pipe.bert.config.max_position_embeddings
        if positions == DIFFUSERS_PROMPT_TOKENS:
            out = pipe(PROMPTS, height=size, width=size, num_inference_steps=SAMPLE_STEPS, guidance_scale=7.5,
                       latents=torch.from_numpy(ref["noise"]), output_type="np")
            pixels = (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)
            pixel_diff = str(int(np.abs(pixels.astype(int) - ref["pixels"].astype(int)).max()))
        else:
            pixel_diff = f"n/a (diffusers' pipeline pads prompts to {DIFFUSERS_PROMPT_TOKENS} tokens; this model has {positions} positions)"
    print(f"ids per prompt {ref['input_ids'].shape[1]}; scales: unet |eps| max {np.abs(ref['unet']).max():.3f}, text |h| max {np.abs(ref['text']).max():.3f}")
    print(f"torch_parity: unet {diffs['unet']:.2e}, ldmbert {diffs['ldmbert']:.2e}, vae_encode {diffs['vae_encode']:.2e}, "
          f"vae_decode {diffs['vae_decode']:.2e}, pipeline_pixels {pixel_diff} (max abs difference; target < 1e-4, pixels in 0-255, "
          f"{SAMPLE_STEPS} DDIM steps at guidance 7.5)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", help="The Paddle model: a pipeline directory or checkpoint-N (Paddle side).")
    parser.add_argument("--export_dir", required=True, help="Its diffusers export (python -m ldm.export --format diffusers).")
    parser.add_argument("--torch_python", help="Python of a venv with torch, diffusers and transformers (not this repo's).")
    parser.add_argument("--npz", default=None, help="Where the Paddle side's inputs and outputs go (default: EXPORT_DIR/../torch_parity.npz).")
    parser.add_argument("--torch_side", action="store_true", help="Internal: run the PyTorch half on an existing --npz.")
    args = parser.parse_args(argv)
    args.npz = args.npz or os.path.join(os.path.dirname(os.path.abspath(args.export_dir)), "torch_parity.npz")
    if args.torch_side:
        return torch_side(args)
    if not args.model_dir or not args.torch_python:
        parser.error("--model_dir and --torch_python are needed (or --torch_side with an existing --npz)")
    paddle_side(args)
    done = subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch_side", "--export_dir", args.export_dir, "--npz", args.npz])
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
