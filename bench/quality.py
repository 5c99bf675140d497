"""Prompt-following of a fixed-budget two-stage run, over several training seeds: tells a change of
recipe from the luck of one seed.

    python bench/quality.py [--preset tiny|demo] [--seeds 0,1,2] [--vae_steps 200] [--ldm_steps 1000] [--batch_size 16]
                            [--stage1_args "--adam_beta1 0.9"] [--stage2_args "--warmup_steps 100"]

For each training seed, the same commands a user runs (ldm.training.runs, as `make demo`), with only
`--seed` differing: the tiny preset's autoencoder (config/tiny/vae.json) with train_vae.py, its
latents cached once (python -m ldm.cache_latents), then LDMBert + UNet (config/tiny) with
train_txt2img_laion400m_trainer.py, each script's own defaults except the budget (steps, batch,
learning rate 1e-3) and what --stage1_args / --stage2_args add. The built-in captioned set
(ldm.data.sample_data: a circle, square or triangle of one of 6 colours on a background of another,
on the left, in the middle or on the right, captions saying so) is written once, the same for
every seed. The exported model is sampled with the stock LDMTextToImagePipeline (DDIM, sampling
seed 0) for --num_prompts captions x --samples_per_prompt, and each sample is read back from its
pixels by ldm.data.sample_data.read_shape, the demo's scorer: does it show the background colour,
the shape colour, the shape and the position its caption asks for? The same scorer on each
prompt's own render sent through the seed's autoencoder and back says what stage 1 allows.

With --preset demo it trains make demo's models and recipe instead (config/demo, the flags in
ldm.training.runs.PRESETS, make demo's budget) and also prints each seed's `demo scores` line (the
demo's 6 prompts x 4, as make demo prints it).

Why this set and scorer rather than captioned digits and a trained classifier: read_shape is
exact on the set's own renders (it reads back all four attributes of every one of them; see
tests/test_bench_quality.py), it needs no training of its own (a classifier trained inside the
bench would add its own seed-to-seed noise to the figure meant to measure the recipe's), and it
is what `make demo` is scored by, so the benchmark and the demo measure the same thing.

The score of a seed is the share of (sample, attribute) pairs that match (the mean of the four
attribute shares; chance is 1/6, 1/5, 1/3 and 1/3). Per-seed lines give each attribute; the last
line is `quality: prompt-following S0 S1 ... median M of N seeds`. Everything is written under
--output_dir (per seed: seed-S/{vae,latents,ldm,samples.png,scores.json}); re-running continues
from what is there, so use a fresh --output_dir per recipe.
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldm.training.runs import (DEMO_GUIDANCE, DEMO_LDM_STEPS, DEMO_PARTS, DEMO_PROMPTS, DEMO_VAE_STEPS, PRESETS, cached_latents, common_flags, default_processes, run,  # noqa: E402
                               sample_data_and_tokenizer, stage1_command, stage2_command)
from ldm.data.sample_data import COLOURS, POSITIONS, SCORES, SHAPES, caption_for  # noqa: E402

RESOLUTION = 32
# Each preset's default budget: tiny's fits 3 seeds in ~13 minutes on 2 idle cores; demo's is
# make demo's own (~11.5 minutes a seed on 2 idle cores, 124 samples included).
BUDGETS = {"tiny": {"vae_steps": 200, "ldm_steps": 1000, "num_parts": 4},
           "demo": {"vae_steps": DEMO_VAE_STEPS, "ldm_steps": DEMO_LDM_STEPS, "num_parts": DEMO_PARTS}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="Training seeds, comma-separated (--seed of both stages).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: config/tiny with the scripts' defaults (what a change of default is measured on); demo: make "
                             "demo's models and recipe (ldm/training/runs.py PRESETS), which also prints each seed's demo scores.")
    parser.add_argument("--vae_steps", type=int, default=None, help="Stage-1 optimizer steps (default: tiny 200, demo as make demo).")
    parser.add_argument("--ldm_steps", type=int, default=None, help="Stage-2 optimizer steps (default: tiny 1000, demo as make demo).")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per optimizer step in both stages (split over --processes).")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Peak learning rate of both stages.")
    parser.add_argument("--stage1_args", default="", help="Extra train_vae.py flags, one shell-quoted string (they come last, so they override).")
    parser.add_argument("--stage2_args", default="", help="Extra train_txt2img_laion400m_trainer.py flags, one shell-quoted string (they come last).")
    parser.add_argument("--processes", type=int, default=None,
                        help="Training processes per stage (default as make demo: 1 on a GPU, on a CPU one per core up to 2).")
    parser.add_argument("--num_parts", type=int, default=None, help="Parts of the built-in set (default: tiny 4, demo 8 as make demo).")
    parser.add_argument("--records_per_part", type=int, default=500, help="Captioned images per part.")
    parser.add_argument("--num_prompts", type=int, default=25, help="Captions sampled (every shape and position alike, colours drawn at random).")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="Samples per caption (a different initial noise each).")
    parser.add_argument("--sample_steps", type=int, default=50, help="DDIM steps per sample.")
    parser.add_argument("--guidance_scale", type=float, default=3.0,
                        help="Classifier-free guidance; 3 as make demo (the stock 7.5 saturated the colours of the demo's model).")
    parser.add_argument("--output_dir", default="quality_output", help="Where data, models, grids and scores are written.")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for name, value in BUDGETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.processes is None:
        args.processes = default_processes()
    if not args.seeds:
        parser.error("--seeds names no seed")
    if args.processes < 1 or args.batch_size % args.processes:
        parser.error(f"--batch_size {args.batch_size} must split evenly over --processes {args.processes}")
    return args


def bench_prompts(n, seed=1234):
    """n captions of the built-in set's kind: shape and position cycle through every value alike
    (3 x 3), colour and background drawn from a fixed generator so every run asks the same."""
    import numpy as np

    rng = np.random.default_rng(seed)
    positions, colours = list(POSITIONS), list(COLOURS)
    prompts = []
    for i in range(n):
        colour, background = rng.choice(colours, size=2, replace=False)
        prompts.append(caption_for(SHAPES[i % 3], colour, background, positions[(i // 3) % 3]))
    return prompts


def autoencoder_ceiling(vae_dir, prompts):
    """The score the trained autoencoder allows: each prompt's image drawn as the set draws it (at
    64 px, resized to the 32 px of training), through the autoencoder and back (the posterior's mean),
    read by the same scorer. A sample can hardly show more of its caption than this."""
    import numpy as np
    import paddle
    from PIL import Image
    from ppdiffusers import AutoencoderKL

    from ldm.models.ldm import to_model_range, to_uint8
    from ldm.data.sample_data import draw_shape, follows_prompt, parse_caption

    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.eval()
    images = []
    for prompt in prompts:
        shape, colour, background, position = parse_caption(prompt)
        image = draw_shape(shape, colour, background, POSITIONS[position], 0.25, 64).resize((RESOLUTION, RESOLUTION), Image.BICUBIC)
        images.append(np.asarray(image).transpose(2, 0, 1))
    with paddle.no_grad():
        pixels = to_model_range(paddle.to_tensor(np.stack(images)))
        decoded = to_uint8(vae.decode(vae.encode(pixels).latent_dist.mode()).sample)
    matches = [follows_prompt(Image.fromarray(image), prompt) for image, prompt in zip(decoded, prompts)]
    shares = {name: statistics.mean(m[name] for m in matches) for name in SCORES}
    return {**shares, "score": statistics.mean(shares.values())}


def train_and_score(args, seed, file_list, tokenizer):
    """Both stages for one training seed, then the samples' scores: {attribute: share, "score": mean,
    "seconds": {step: wall time}}, also written to seed-S/scores.json (a re-run reads it back)."""
    out = os.path.join(args.output_dir, f"seed-{seed}")
    scores_path = os.path.join(out, "scores.json")
    if os.path.isfile(scores_path):
        with open(scores_path) as f:
            result = json.load(f)
        if not isinstance(result.get("autoencoder"), dict):  # scores written before the ceiling was measured
            result["autoencoder"] = autoencoder_ceiling(os.path.join(out, "vae"), bench_prompts(args.num_prompts))
        return result
    seconds = {}
    common = common_flags(args.batch_size, args.processes, args.learning_rate, seed, RESOLUTION)
    # Stage 1: the preset's autoencoder (tiny: f=4, 32 px -> 8x8 latents, train_vae.py's defaults).
    vae = os.path.join(out, "vae")
    if not os.path.isfile(os.path.join(vae, "config.json")):
        seconds["stage 1"] = run(f"seed {seed}, stage 1: autoencoder", stage1_command(
            args.preset, args.processes, out, file_list, args.vae_steps, common, extra=["--image_logging_steps", "0", *shlex.split(args.stage1_args)]))
    start = time.time()
    cached_list = cached_latents(file_list, vae, os.path.join(out, "latents"), RESOLUTION)
    seconds["cache"] = time.time() - start
    # Stage 2: LDMBert + the preset's UNet (tiny: the Trainer script's defaults).
    ldm = os.path.join(out, "ldm")
    if not os.path.isfile(os.path.join(ldm, "model_index.json")):
        seconds["stage 2"] = run(f"seed {seed}, stage 2: LDMBert + UNet", stage2_command(
            args.preset, args.processes, out, tokenizer, cached_list, args.ldm_steps, common,
            extra=["--save_steps", str(args.ldm_steps), "--save_total_limit", "1", "--image_logging_steps", "0", *shlex.split(args.stage2_args)]))
    # Samples from the stock pipeline, read back by the demo's scorer:
    from ldm.evaluation.sampling import sample_grid

    start = time.time()
    _, matches, total = sample_grid(ldm, bench_prompts(args.num_prompts), args.samples_per_prompt, os.path.join(out, "samples.png"),
                                    guidance_scale=args.guidance_scale, steps=args.sample_steps, seed=0)
    result = {name: matches[name] / total for name in SCORES}
    if args.preset == "demo":  # and make demo's own grid and scores (demo.py's prompts, guidance and sampling seed)
        _, result["demo"], result["demo_samples"] = sample_grid(ldm, DEMO_PROMPTS, args.samples_per_prompt, os.path.join(out, "demo_samples.png"),
                                                                guidance_scale=DEMO_GUIDANCE, steps=args.sample_steps, seed=0)
    seconds["samples"] = time.time() - start
    result["score"] = statistics.mean(result[name] for name in SCORES)
    result["samples"] = total
    result["autoencoder"] = autoencoder_ceiling(vae, bench_prompts(args.num_prompts))
    result["seconds"] = seconds
    with open(scores_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main():
    args = parse_args()
    t0 = time.time()
    # The scripts and `python -m ldm...` run from the repository's root, as `make demo` runs them.
    args.output_dir = os.path.abspath(args.output_dir)
    os.chdir(ROOT)
    # The built-in set and its tokenizer, once for every seed (the same data whatever the seed):
    file_list, tokenizer = sample_data_and_tokenizer(args.output_dir, args.num_parts, args.records_per_part)
    results = {}
    for seed in args.seeds:
        results[seed] = result = train_and_score(args, seed, file_list, tokenizer)
        took = ", ".join(f"{step} {s:.0f} s" for step, s in result["seconds"].items())
        print(f"seed {seed}: " + ", ".join(f"{name} {result[name]:.2f}" for name in SCORES)
              + f" -> prompt-following {result['score']:.3f} ({result['samples']} samples; {took})", flush=True)
        ceiling = result["autoencoder"]
        print(f"    its autoencoder's round trip of the prompts' own renders: " + ", ".join(f"{name} {ceiling[name]:.2f}" for name in SCORES)
              + f" -> {ceiling['score']:.3f}", flush=True)
        if "demo" in result:
            print("    demo scores: " + ", ".join(f"{name} {n}/{result['demo_samples']}" for name, n in result["demo"].items()), flush=True)
    scores = [results[seed]["score"] for seed in args.seeds]
    print(f"budget ({args.preset}): stage 1 {args.vae_steps} steps, stage 2 {args.ldm_steps} steps, batch {args.batch_size}, lr {args.learning_rate:g}"
          f"; stage 1 extra: {args.stage1_args or '-'}; stage 2 extra: {args.stage2_args or '-'}; {time.time() - t0:.0f} s in all")
    print(f"quality: prompt-following {' '.join(f'{s:.3f}' for s in scores)} median {statistics.median(scores):.3f} "
          f"of {len(scores)} seeds (spread {max(scores) - min(scores):.3f})")


if __name__ == "__main__":
    main()
