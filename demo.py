"""`make demo`: the whole path on the CPU, from generated data to a grid of prompted samples.

  1. write the built-in sample dataset (coloured shapes, nothing downloaded);
  2. build a WordPiece tokenizer from its captions;
  3. stage 1: train the demo's autoencoder (config/demo/vae.json) with train_vae.py;
  4. cache its latents once (python -m ldm.cache_latents), so stage 2 never runs the encoder;
  5. stage 2: train LDMBert + UNet (config/demo/unet.json) with train_txt2img_laion400m_trainer.py;
  6. load the result with stock ppdiffusers LDMTextToImagePipeline and write a PNG grid,
     one row per prompt, print its path and, last, how many samples match their prompt's
     background colour, shape colour, shape and position (ldm.sample_data.read_shape).
Each step is the real command-line tool, run as a subprocess, so the demo exercises exactly
what a user runs; on a CPU the two training stages run as 2 processes through
paddle.distributed.launch, as a multi-GPU run does. Re-running continues from what is already
in --output_dir.
"""
import argparse
import os
import subprocess
import sys
import time

# Every caption of the sample data is 13 tokens; 16 leaves few padding tokens, which the stock
# pipeline does not mask (they take part in LDMBert's attention).
TOKENS = 16
# The stage-2 recipe (README "Quick start" has what each choice did to the scores):
#   v-prediction: with epsilon the same budget learned no colours;
#   zero terminal SNR: sampling starts from pure noise, where only the caption says what goes where;
#   LDMBert's token embeddings at std 1.0: the reference's 0.02 lets attention's shared mixture
#   drown each word, so "left", "right", "circle" and "square" never reached the UNet (position
#   7/24; with 1.0: 24/24);
#   an EMA of the weights (its warm-up makes the decay ~0.994 by step 1450): steadier colours and
#   positions than the last step's weights (two runs: 24/24 on both against 20/22 and 24/24).
RECIPE = ["--prediction_type", "v_prediction", "--zero_terminal_snr", "--text_encoder_embedding_std", "1.0", "--use_ema"]
# Classifier-free guidance of the grid: lower than the stock 7.5, which at this size saturates
# colours and blurs shapes (on one trained model, two sampling seeds: shape 18 and 20/24 at 2,
# 16 and 21 at 3, 15 at 4, 17 at 5, 6 at 7.5 on another).
GUIDANCE = 3.0
# Each shape and each position twice, so the shape and position scores test all of them.
PROMPTS = [
    "a red circle on a blue background, on the left",
    "a yellow square on a black background, in the middle",
    "a white triangle on a green background, on the right",
    "a blue circle on a yellow background, on the right",
    "a green square on a red background, on the left",
    "a black triangle on a white background, in the middle",
]


def default_processes():
    """One process on a GPU (this model is far too small to split); on a CPU, one per core, up to 2."""
    import paddle

    from ldm.training.runtime import usable_cores

    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        return 1
    return min(2, usable_cores())


def trainer(processes, script, log_dir):
    """The command that runs a training script on `processes` CPU processes: through
    paddle.distributed.launch (gloo) when more than one, as a user runs it on several devices
    (rank 0's output is shown; every rank's is in log_dir/workerlog.N)."""
    if processes == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(processes), "--log_dir", log_dir, script]


def run(step, cmd):
    print(f"\n==> {step}\n    {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    print(f"    {step}: {time.time() - start:.0f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_output", help="Where data, models and the grid are written.")
    parser.add_argument("--vae_steps", type=int, default=500, help="Stage-1 optimizer steps.")
    parser.add_argument("--ldm_steps", type=int, default=1450, help="Stage-2 optimizer steps.")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per optimizer step in both stages.")
    parser.add_argument("--processes", type=int, default=None,
                        help="Training processes, each taking --batch_size / processes images of every step (default: 1 on a "
                             "GPU; on a CPU, 2 if we may use 2 cores). On 2 cores two processes take 1.7x the steps/s of one: "
                             "Paddle's CPU kernels gain little from a second thread on tensors this small.")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="Columns of the grid.")
    args = parser.parse_args()
    if args.processes is None:
        args.processes = default_processes()
    if args.processes < 1 or args.batch_size % args.processes:
        parser.error(f"--batch_size {args.batch_size} must split evenly over --processes {args.processes}")
    out = args.output_dir
    py = sys.executable
    t0 = time.time()

    # 1-2. Data and tokenizer:
    file_list = os.path.join(out, "data", "train.filelist.list")
    if not os.path.isfile(file_list):
        run("sample data", [py, "-m", "ldm.sample_data", "--output_dir", os.path.join(out, "data"), "--num_parts", "8", "--records_per_part", "500"])
    tokenizer = os.path.join(out, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer, "vocab.txt")):
        run("tokenizer", [py, "-m", "ldm.tokenizer", "--file_list", file_list, "--output_dir", tokenizer, "--model_max_length", str(TOKENS)])

    common = ["--resolution", "32", "--per_device_train_batch_size", str(args.batch_size // args.processes),
              "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--logging_steps", "50", "--seed", "23",
              "--dataloader_num_workers", "0", "--do_train"]
    # 3. Stage 1: an f=2 autoencoder (32 px -> 16x16 latents). The tiny preset's f=4 one kept the
    # shape in 32 of 48 of its own reconstructions (squares came back round); this one in 48.
    vae = os.path.join(out, "vae")
    if not os.path.isfile(os.path.join(vae, "config.json")):
        run("stage 1: autoencoder", [*trainer(args.processes, "train_vae.py", os.path.join(out, "logs", "vae")), "--output_dir", vae, "--vae_config_file", "config/demo/vae.json",
                                     "--file_list", file_list, "--max_steps", str(args.vae_steps), "--save_steps", str(args.vae_steps),
                                     "--image_logging_steps", str(args.vae_steps), *common,
                                     # No discriminator and Adam's usual betas: a short run learns faster so (README "Two
                                     # stages": 18.6 dB reconstruction PSNR after 300 steps against 15.4 dB).
                                     "--disc_weight", "0", "--adam_beta1", "0.9", "--adam_beta2", "0.999"])
    # 4. The frozen encoder's output, once for every image, so stage 2 only samples from it.
    latents = os.path.join(out, "latents")
    cached_list = os.path.join(latents, "train.filelist.list")
    if not os.path.isfile(cached_list):
        run("cache latents", [py, "-m", "ldm.cache_latents", "--file_list", file_list, "--vae_name_or_path", vae,
                              "--resolution", "32", "--output_dir", latents])
    # 5. Stage 2. The UNet (config/demo/unet.json) reads the caption at 16x16 too, where the shape's
    # edges are drawn: with cross-attention only at 8x8 and 4x4 it drew blobs (shape 7-17/24 in 4 runs).
    ldm = os.path.join(out, "ldm")
    if not os.path.isfile(os.path.join(ldm, "model_index.json")):
        run("stage 2: LDMBert + UNet", [*trainer(args.processes, "train_txt2img_laion400m_trainer.py", os.path.join(out, "logs", "ldm")), "--output_dir", ldm,
                                        "--vae_name_or_path", vae, "--tokenizer_name", tokenizer, "--file_list", cached_list,
                                        "--text_encoder_config_file", "config/tiny/ldmbert.json", "--unet_config_file", "config/demo/unet.json",
                                        "--model_max_length", str(TOKENS), "--max_steps", str(args.ldm_steps), "--save_steps", "500",
                                        "--save_total_limit", "1", "--image_logging_steps", str(args.ldm_steps), "--num_inference_steps", "25", *common,
                                        *RECIPE])

    # 6. Samples from the stock pipeline:
    print("\n==> samples", flush=True)
    from ldm.evaluation.sampling import sample_grid

    grid_path, matches, total = sample_grid(ldm, PROMPTS, args.samples_per_prompt, os.path.join(out, "samples.png"), guidance_scale=GUIDANCE)
    print(f"demo finished in {time.time() - t0:.0f} s")
    print(f"grid of samples (one row per prompt): {os.path.abspath(grid_path)}")
    # Samples whose background colour, shape colour, shape and position match their prompt,
    # read from the pixels by ldm.sample_data.read_shape (SPEC section 1 fixes this line).
    print("demo scores: " + ", ".join(f"{name} {n}/{total}" for name, n in matches.items()))


if __name__ == "__main__":
    main()
