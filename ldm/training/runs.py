"""The real command-line tools run as subprocesses, step by step: what `make demo` (demo.py) and
the quality benchmark (bench/quality.py) both do, so each exercises exactly what a user runs.

Every step skips itself when its output is already there, so re-running continues."""
import os
import subprocess
import sys
import time

# Every caption of the sample data is 13 tokens; 16 leaves few padding tokens, which the stock
# pipeline does not mask (they take part in LDMBert's attention).
TOKENS = 16

# Classifier-free guidance of the demo's grid: lower than the stock 7.5, which at this size saturates
# colours and blurs shapes (on one trained model, two sampling seeds: shape 18 and 20/24 at 2,
# 16 and 21 at 3, 15 at 4, 17 at 5, 6 at 7.5 on another).
DEMO_GUIDANCE = 3.0
# Each shape and each position twice, so the shape and position scores test all of them.
DEMO_PROMPTS = [
    "a red circle on a blue background, on the left",
    "a yellow square on a black background, in the middle",
    "a white triangle on a green background, on the right",
    "a blue circle on a yellow background, on the right",
    "a green square on a red background, on the left",
    "a black triangle on a white background, in the middle",
]

# make demo's budget: stage-1 and stage-2 optimizer steps at batch 16, and parts of 500 records.
DEMO_VAE_STEPS, DEMO_LDM_STEPS, DEMO_PARTS = 500, 1000, 8


def default_processes():
    """One process on a GPU (the tiny models are far too small to split); on a CPU, one per core, up to 2."""
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


def run(step, cmd, **kwargs):
    """Run one step's command (its output goes where ours does), stop on failure; returns its wall time in s."""
    print(f"\n==> {step}\n    {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True, **kwargs)
    took = time.time() - start
    print(f"    {step}: {took:.0f} s", flush=True)
    return took


def sample_data_and_tokenizer(out, num_parts, records_per_part, seed=0):
    """Write the built-in sample dataset under out/data and a WordPiece tokenizer of its captions
    under out/tokenizer (python -m ldm.sample_data, python -m ldm.tokenizer); returns both paths."""
    py = sys.executable
    file_list = os.path.join(out, "data", "train.filelist.list")
    if not os.path.isfile(file_list):
        run("sample data", [py, "-m", "ldm.sample_data", "--output_dir", os.path.join(out, "data"), "--num_parts", str(num_parts),
                            "--records_per_part", str(records_per_part), "--seed", str(seed)])
    tokenizer = os.path.join(out, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer, "vocab.txt")):
        run("tokenizer", [py, "-m", "ldm.tokenizer", "--file_list", file_list, "--output_dir", tokenizer, "--model_max_length", str(TOKENS)])
    return file_list, tokenizer


def cached_latents(file_list, vae, latents, resolution):
    """The frozen encoder's output, once for every image (python -m ldm.cache_latents), so stage 2
    only samples from it; returns the cached parts' file list list."""
    cached_list = os.path.join(latents, "train.filelist.list")
    if not os.path.isfile(cached_list):
        run("cache latents", [sys.executable, "-m", "ldm.cache_latents", "--file_list", file_list, "--vae_name_or_path", vae,
                              "--resolution", str(resolution), "--output_dir", latents])
    return cached_list


# The two recipes the demo and the quality benchmark train, as the flags each stage adds to the
# scripts' own defaults (everything not named here is the script's default).
PRESETS = {
    # config/tiny with the scripts' defaults: what `bench/quality.py` measures a change of default on.
    "tiny": {
        "vae_config": "config/tiny/vae.json",
        "unet_config": "config/tiny/unet.json",
        "stage1": [],
        "stage2": [],
    },
    # `make demo`'s recipe (docs/demo.md has what each choice did to the scores).
    "demo": {
        # An f=2 autoencoder (32 px -> 16x16 latents): the tiny preset's f=4 one kept the shape in
        # 32 of 48 of its own reconstructions (squares came back round); this one in 48.
        "vae_config": "config/demo/vae.json",
        # The UNet reads the caption at 16x16 too, where the shape's edges are drawn: with
        # cross-attention only at 8x8 and 4x4 it drew blobs (shape 7-17/24 in 4 runs).
        "unet_config": "config/demo/unet.json",
        # No discriminator and Adam's usual betas: a short run learns faster so (README "Two
        # stages": 18.6 dB reconstruction PSNR after 300 steps against 15.4 dB).
        "stage1": ["--lr_scheduler_type", "constant", "--disc_weight", "0", "--adam_beta1", "0.9", "--adam_beta2", "0.999"],
        #   v-prediction: with epsilon the same budget learned no colours;
        #   zero terminal SNR: sampling starts from pure noise, where only the caption says what goes where;
        #   LDMBert's token embeddings at std 1.0: the reference's 0.02 lets attention's shared mixture
        #   drown each word, so "left", "right", "circle" and "square" never reached the UNet (position
        #   7/24; with 1.0: 24/24);
        #   an EMA of the weights (its warm-up makes the decay ~0.991 by step 1000): steadier colours and
        #   positions than the last step's weights;
        #   the noisier half of the timesteps drawn twice as often, where the layout and the shape are
        #   decided: the shapes come in 1000 steps where they took 1450 (docs/quality.md, 3 seeds).
        "stage2": ["--lr_scheduler_type", "constant", "--prediction_type", "v_prediction", "--zero_terminal_snr",
                   "--text_encoder_embedding_std", "1.0", "--use_ema",
                   "--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "2", "--timestep_bias_portion", "0.5"],
    },
}


def common_flags(batch_size, processes, learning_rate, seed, resolution=32):
    """The flags both stages share: each process takes batch_size / processes images of every step;
    the data is read in the training process (no workers: the sample set is tiny)."""
    return ["--resolution", str(resolution), "--per_device_train_batch_size", str(batch_size // processes),
            "--learning_rate", str(learning_rate), "--logging_steps", "50", "--seed", str(seed),
            "--dataloader_num_workers", "0", "--do_train"]


def stage1_command(preset, processes, out, file_list, steps, common, extra=()):
    """train_vae.py for `preset`'s autoencoder, writing out/vae (logs of every rank in out/logs/vae)."""
    return [*trainer(processes, "train_vae.py", os.path.join(out, "logs", "vae")), "--output_dir", os.path.join(out, "vae"),
            "--vae_config_file", PRESETS[preset]["vae_config"], "--file_list", file_list, "--max_steps", str(steps),
            "--save_steps", str(steps), *common, *PRESETS[preset]["stage1"], *extra]


def stage2_command(preset, processes, out, tokenizer, cached_list, steps, common, extra=()):
    """train_txt2img_laion400m_trainer.py for `preset`'s LDMBert + UNet on out/vae's cached latents,
    writing the pipeline directory out/ldm (logs of every rank in out/logs/ldm)."""
    return [*trainer(processes, "train_txt2img_laion400m_trainer.py", os.path.join(out, "logs", "ldm")), "--output_dir", os.path.join(out, "ldm"),
            "--vae_name_or_path", os.path.join(out, "vae"), "--tokenizer_name", tokenizer, "--file_list", cached_list,
            "--text_encoder_config_file", "config/tiny/ldmbert.json", "--unet_config_file", PRESETS[preset]["unet_config"],
            "--model_max_length", str(TOKENS), "--max_steps", str(steps), *common, *PRESETS[preset]["stage2"], *extra]
