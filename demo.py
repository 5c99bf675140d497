"""`make demo`: the whole path on the CPU, from generated data to a grid of prompted samples.

  1. write the built-in sample dataset (coloured shapes, nothing downloaded);
  2. build a WordPiece tokenizer from its captions;
  3. stage 1: train the demo's autoencoder (config/demo/vae.json) with train_vae.py;
  4. cache its latents once (python -m ldm.cache_latents), so stage 2 never runs the encoder;
  5. stage 2: train LDMBert + UNet (config/demo/unet.json) with train_txt2img_laion400m_trainer.py;
  6. load the result with stock ppdiffusers LDMTextToImagePipeline and write a PNG grid,
     one row per prompt, print its path and, last, how many samples match their prompt's
     background colour, shape colour, shape and position (ldm.data.sample_data.read_shape).
Each step is the real command-line tool, run as a subprocess, so the demo exercises exactly
what a user runs; on a CPU the two training stages run as 2 processes through
paddle.distributed.launch, as a multi-GPU run does. Re-running continues from what is already
in --output_dir.
"""
import argparse
import os
import time

from ldm.training.runs import (DEMO_GUIDANCE, DEMO_LDM_STEPS, DEMO_PARTS, DEMO_PROMPTS, DEMO_VAE_STEPS, cached_latents, common_flags,
                               default_processes, run, sample_data_and_tokenizer, stage1_command, stage2_command)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_output", help="Where data, models and the grid are written.")
    parser.add_argument("--vae_steps", type=int, default=DEMO_VAE_STEPS, help="Stage-1 optimizer steps.")
    parser.add_argument("--ldm_steps", type=int, default=DEMO_LDM_STEPS, help="Stage-2 optimizer steps.")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per optimizer step in both stages.")
    parser.add_argument("--processes", type=int, default=None,
                        help="Training processes, each taking --batch_size / processes images of every step (default: 1 on a "
                             "GPU; on a CPU, 2 if we may use 2 cores). On 2 cores two processes take 1.7x the steps/s of one: "
                             "Paddle's CPU kernels gain little from a second thread on tensors this small.")
    parser.add_argument("--seed", type=int, default=23, help="Training seed of both stages (--seed of the scripts).")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="Columns of the grid.")
    args = parser.parse_args()
    if args.processes is None:
        args.processes = default_processes()
    if args.processes < 1 or args.batch_size % args.processes:
        parser.error(f"--batch_size {args.batch_size} must split evenly over --processes {args.processes}")
    out = args.output_dir
    t0 = time.time()

    # 1-2. Data and tokenizer:
    file_list, tokenizer = sample_data_and_tokenizer(out, num_parts=DEMO_PARTS, records_per_part=500)

    common = common_flags(args.batch_size, args.processes, 1e-3, args.seed)
    # 3. Stage 1: the demo's f=2 autoencoder (32 px -> 16x16 latents; ldm/training/runs.py PRESETS
    # says why each of its flags).
    vae = os.path.join(out, "vae")
    if not os.path.isfile(os.path.join(vae, "config.json")):
        run("stage 1: autoencoder", stage1_command("demo", args.processes, out, file_list, args.vae_steps, common,
                                                   extra=["--image_logging_steps", str(args.vae_steps)]))
    # 4. The frozen encoder's output, once for every image, so stage 2 only samples from it.
    cached_list = cached_latents(file_list, vae, os.path.join(out, "latents"), resolution=32)
    # 5. Stage 2: LDMBert + the demo's UNet with the demo's recipe (v-prediction, zero terminal
    # SNR, LDMBert's embeddings at std 1.0, EMA: PRESETS says what each did).
    ldm = os.path.join(out, "ldm")
    if not os.path.isfile(os.path.join(ldm, "model_index.json")):
        run("stage 2: LDMBert + UNet", stage2_command("demo", args.processes, out, tokenizer, cached_list, args.ldm_steps, common,
                                                      extra=["--save_steps", "500", "--save_total_limit", "1", "--image_logging_steps",
                                                             str(args.ldm_steps), "--num_inference_steps", "25"]))

    # 6. Samples from the stock pipeline:
    print("\n==> samples", flush=True)
    from ldm.evaluation.sampling import sample_grid

    grid_path, matches, total = sample_grid(ldm, DEMO_PROMPTS, args.samples_per_prompt, os.path.join(out, "samples.png"), guidance_scale=DEMO_GUIDANCE)
    print(f"demo finished in {time.time() - t0:.0f} s")
    print(f"grid of samples (one row per prompt): {os.path.abspath(grid_path)}")
    # Samples whose background colour, shape colour, shape and position match their prompt,
    # read from the pixels by ldm.data.sample_data.read_shape (SPEC section 1 fixes this line).
    print("demo scores: " + ", ".join(f"{name} {n}/{total}" for name, n in matches.items()))


if __name__ == "__main__":
    main()
