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
