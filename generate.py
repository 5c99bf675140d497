"""Generate images from a trained model: a run's final output directory, any stock
LDMTextToImagePipeline directory, or a checkpoint-N of either training script.

    python generate.py --model_dir ./laion400m_pretrain_output_trainer \
        --prompt "a red circle on a blue background" --output ./samples

writes one PNG per prompt and image into --output (or, with --grid, one PNG grid there).
"""
import argparse
import os
import re
import sys

from ldm.evaluation.loading import SCHEDULERS
from ldm.core.process import leave_imports_out_of_gc


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="A pipeline directory (model_index.json, unet/, ...) or a checkpoint-N directory of either training script.")
    parser.add_argument("--prompt", action="append", default=[], help="Text to draw; repeat the flag for several prompts.")
    parser.add_argument("--prompt_file", help="File with one prompt a line (blank lines and # comments skipped), after any --prompt.")
    parser.add_argument("--output", required=True, help="Directory for the PNGs; with --grid, the path of the grid PNG.")
    parser.add_argument("--grid", action="store_true", help="Write one grid (a row per prompt, --num_images_per_prompt columns) instead of one PNG per image.")
    parser.add_argument("--num_images_per_prompt", type=int, default=1, help="Images drawn for each prompt, each from its own noise.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps of the sampler.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance weight; 1 turns guidance off.")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="Sampler: DDIM, PNDM (PLMS) or DPM-Solver++ multistep; the model's noise schedule is kept.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the starting noise of each image (drawn per image, so the same seed gives the same images whatever --batch_size).")
    parser.add_argument("--batch_size", type=int, default=4, help="Images denoised together; does not change the images.")
    parser.add_argument("--height", type=int, help="Output height in pixels, a multiple of the autoencoder's factor; default: the size the model was trained at.")
    parser.add_argument("--width", type=int, help="Output width in pixels; default: the size the model was trained at.")
    parser.add_argument("--trust_pickle", action="store_true", help="Also read pickled weights (an old Trainer checkpoint's model_state.pdparams, diffusers' .bin): a pickle can run code while it loads, so only for files you trust.")
    parser.add_argument("--no_ema", action="store_true", help="From a checkpoint, use the raw trained weights instead of its EMA weights.")
    parser.add_argument("--num_threads", type=int, default=0, help="CPU threads for Paddle's kernels; 0 uses every core available.")
    args = parser.parse_args(argv)
    if args.num_images_per_prompt < 1 or args.batch_size < 1 or args.num_inference_steps < 1:
        parser.error("--num_images_per_prompt, --batch_size and --num_inference_steps must be at least 1")
    if not args.grid and args.output.lower().endswith(".png"):
        parser.error(f"--output {args.output!r} looks like a file: without --grid it is a directory (one PNG per image); add --grid for one PNG")
    return args


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"


def main(argv=None):
    leave_imports_out_of_gc()  # the collector's full passes skip the libraries imported above
    # Arguments and prompts (bad input stops here, before the model loads):
    args = parse_args(argv)
    from ldm.evaluation.loading import check_size, generate, load_pipeline, read_prompt_file, save_grid, set_scheduler, write_json
    from ldm.training.runtime import exit_on_bad_input, set_cpu_threads

    try:
        prompts = args.prompt + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
        if not prompts:
            raise ValueError("no prompt: pass --prompt TEXT or --prompt_file F")
        set_cpu_threads(args.num_threads)

        # Load the model (a pipeline directory or a checkpoint) and choose the sampler:
        pipe, weights = load_pipeline(args.model_dir, use_ema=not args.no_ema, trust_pickle=args.trust_pickle)
        set_scheduler(pipe, args.scheduler)
        height, width = check_size(pipe, args.height, args.width)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)) if args.grid else args.output, exist_ok=True)
    except (ValueError, OSError) as e:
        exit_on_bad_input(e)

    # Generate, prompt-major: image j of prompt i is image k = i * num_images_per_prompt + j.
    per = args.num_images_per_prompt
    flat = [p for p in prompts for _ in range(per)]
    print(f"{len(flat)} image(s) of {width}x{height} from {args.model_dir} ({weights} weights), {args.scheduler}, "
          f"{args.num_inference_steps} steps, guidance {args.guidance_scale}, seed {args.seed}", flush=True)
    images = generate(pipe, flat, height, width, args.num_inference_steps, args.guidance_scale, args.seed, args.batch_size, progress=True)

    # Save: one grid, or one PNG per image with a JSON record of how each was made.
    if args.grid:
        save_grid(args.output, prompts, [images[i * per:(i + 1) * per] for i in range(len(prompts))])
        print(f"wrote grid {os.path.abspath(args.output)}")
        return 0
    records = []
    for k, (prompt, image) in enumerate(zip(flat, images)):
        name = f"{k // per:04d}-{k % per:02d}-{slug(prompt)}.png"
        image.save(os.path.join(args.output, name))
        records.append({"file": name, "prompt": prompt, "index": k})
    settings = {k: getattr(args, k) for k in ("model_dir", "scheduler", "num_inference_steps", "guidance_scale", "seed", "batch_size")}
    write_json(os.path.join(args.output, "generation.json"), {**settings, "weights": weights, "height": height, "width": width, "images": records})
    print(f"wrote {len(images)} PNG(s) to {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
