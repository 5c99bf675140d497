"""Shared fixtures: tiny generated datasets and helpers that run the real scripts."""
import base64
import fcntl
import gc
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def frozen_survivors():
    """Before each test, leave every object that is still alive (paddle, ppdiffusers and paddlenlp
    with their lazy imports, cached fixtures: ~400k objects) out of the garbage collector's later
    collections. A full collection walks every tracked object, ~0.3 s apiece in a worker, and
    Python runs them every so often, ppdiffusers' from_pretrained after each model it loads and
    Paddle's SOT translator after each frame. Objects a test creates are collected as before
    (the collect() here first frees the previous test's cyclic garbage, so freezing keeps none)."""
    gc.collect()
    gc.freeze()
    yield


def run_script(args, cwd=ROOT, timeout=600, env=None):
    """Run a repo script or module with this interpreter; return the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def jpeg_b64(size=(48, 40), colour=(200, 30, 30), mode="RGB", fmt="JPEG"):
    image = Image.new(mode, size, colour)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def write_part(path, lines):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def write_lists(tmp_path, parts, weights=None, name="a"):
    filelist = tmp_path / f"{name}.filelist"
    filelist.write_text("\n".join(str(p) for p in parts) + "\n")
    file_list = tmp_path / f"{name}.filelist.list"
    file_list.write_text(f"{filelist}{'' if weights is None else ' ' + str(weights)}\n")
    return str(file_list)


def make_parts(tmp_path, num_parts, records_per_part, size=(40, 36)):
    """Parts of valid records whose captions say where they come from."""
    parts = []
    for p in range(num_parts):
        path = str(tmp_path / f"part-{p:05d}.gz")
        write_part(path, [f"part {p} record {r}\t_\t{jpeg_b64(size)}" for r in range(records_per_part)])
        parts.append(path)
    return parts


def once_per_run(tmp_path_factory, name, make):
    """`make(directory)`'s JSON-able result, made once for the whole pytest run.

    Under pytest-xdist (`make test` runs `-n 2`) every worker is a session of its own, so a plain
    session fixture would train the autoencoder and every shared run once per worker. There the
    first worker to ask makes it in the directory all workers share, holding a lock on it; the
    others wait on the lock and read the result it recorded (or its failure)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, beside every worker's popen-gwK/
    record = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        if not record.is_file():
            directory = shared / name
            directory.mkdir()
            try:
                record.write_text(json.dumps({"result": make(directory)}))
            except BaseException as error:
                record.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
                raise
    made = json.loads(record.read_text())
    if "error" in made:
        pytest.fail(f"the shared fixture {name} failed on another worker: {made['error']}")
    return made["result"]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small built-in shapes dataset and a tokenizer built from it (session-wide)."""
    from ldm.data.sample_data import write_sample_dataset
    from ldm.data.tokenizer import build_vocab, iter_captions, write_tokenizer

    def make(root):
        file_list = write_sample_dataset(str(root / "data"), num_parts=2, records_per_part=64, size=40, seed=1)
        tokenizer = write_tokenizer(build_vocab(lambda: iter_captions(file_list)), str(root / "tokenizer"), model_max_length=16)
        return {"root": str(root), "file_list": file_list, "tokenizer": tokenizer}

    made = once_per_run(tmp_path_factory, "shapes", make)
    return dict(made, root=Path(made["root"]))


@pytest.fixture(scope="session")
def vae_dir(shapes, tmp_path_factory):
    def make(out):
        res = run_script(["train_vae.py", "--do_train", "--file_list", shapes["file_list"], "--output_dir", str(out),
                          "--resolution", "32", "--max_steps", "6", "--vae_config_file", "config/tiny/vae.json",
                          "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "2",
                          "--save_steps", "3", "--image_logging_steps", "3", "--scaling_batches", "2", "--use_ema", "--ema_decay", "0.9"])
        assert res.returncode == 0, res.stderr[-3000:]
        return str(out)

    return Path(once_per_run(tmp_path_factory, "vae", make))


def ldm_args(shapes, vae_dir, out, max_steps, extra=()):
    return ["train_txt2img_laion400m_trainer.py", "--do_train", "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
            "--weight_decay", "0.02", "--max_steps", str(max_steps), "--lr_scheduler_type", "constant", "--warmup_steps", "0",
            "--logging_steps", "2", "--save_steps", "4", "--save_total_limit", "2", "--seed", "23",
            "--dataloader_num_workers", "1", "--vae_name_or_path", str(vae_dir),
            "--text_encoder_config_file", "config/tiny/ldmbert.json", "--unet_config_file", "config/tiny/unet.json",
            "--file_list", shapes["file_list"], "--num_inference_steps", "3", "--model_max_length", "16",
            "--tokenizer_name", shapes["tokenizer"], "--resolution", "32", "--image_logging_steps", "4", *extra]


@pytest.fixture(scope="session")
def stock_pipeline_dir(shapes, tmp_path_factory):
    """A tiny LDMTextToImagePipeline written by stock ppdiffusers alone (random weights), with
    an f=2 autoencoder and a UNet of 8x8 latents: its images are 16 px, not the stock 64."""
    from ppdiffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
    from ppdiffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from ppdiffusers.transformers import BertTokenizer

    def make(root):
        tokenizer = BertTokenizer.from_pretrained(shapes["tokenizer"])
        vae = AutoencoderKL(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            latent_channels=4, norm_num_groups=8, layers_per_block=1)
        bert = LDMBertModel(LDMBertConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, d_model=32,
                                          encoder_layers=1, encoder_attention_heads=2, head_dim=16, encoder_ffn_dim=64))
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
        out = root / "pipeline"
        LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler).save_pretrained(str(out))
        return str(out)

    return Path(once_per_run(tmp_path_factory, "stock", make))


# -- Shared training runs ------------------------------------------------------------------
# Each training configuration runs once per pytest run (once_per_run: not once per xdist worker):
# several test files read the same run's output (checkpoints, exported pipeline) and must only read
# it. A test that continues a run copies it first (shutil.copytree) so the shared directory stays
# as the run left it.

RESUME_STEPS = 8  # the straight runs' length: long enough to interrupt at step 2 and resume


def loop_resume_args(shapes, vae, out, steps, extra=()):
    """The explicit loop with what resuming must restore: 2 data workers, a shuffle buffer, a
    cosine schedule with warm-up, gradient accumulation, EMA, a checkpoint every step."""
    return ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--max_train_steps", str(steps),
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--logging_steps", "1", "--save_steps", "1",
            "--save_total_limit", "2", "--seed", "23", "--num_workers", "2", "--shuffle_buffer", "16",
            "--vae_name_or_path", str(vae), "--text_encoder_config_file", "config/tiny/ldmbert.json",
            "--unet_config_file", "config/tiny/unet.json", "--file_list", shapes["file_list"], "--model_max_length", "16",
            "--tokenizer_name", shapes["tokenizer"], "--resolution", "32", "--image_logging_steps", "0", "--use_ema",
            "--ema_decay", "0.9", *extra]


def trainer_resume_args(shapes, vae, out, steps, extra=()):
    """The same for the Trainer script."""
    return ldm_args(shapes, vae, out, steps, ["--dataloader_num_workers", "2", "--image_logging_steps", "0", "--save_steps", "1",
                                              "--shuffle_buffer", "16", "--lr_scheduler_type", "cosine", "--warmup_steps", "2",
                                              "--use_ema", "--ema_decay", "0.9", *extra])


def _train_once(tmp_path_factory, name, args):
    def make(root):
        out = root / "out"
        res = run_script(args(out))
        assert res.returncode == 0, res.stderr[-3000:]
        return str(out)

    return Path(once_per_run(tmp_path_factory, name, make))


@pytest.fixture(scope="session")
def straight_loop_run(shapes, vae_dir, tmp_path_factory):
    """8 uninterrupted steps of the explicit loop (loop_resume_args): checkpoint-7, checkpoint-8 and
    the exported pipeline (EMA weights of step 8). Read by test_resume_exact and test_generate."""
    return _train_once(tmp_path_factory, "straight_loop", lambda out: loop_resume_args(shapes, vae_dir, out, RESUME_STEPS))


@pytest.fixture(scope="session")
def straight_trainer_run(shapes, vae_dir, tmp_path_factory):
    """The same with the Trainer script (checkpoints hold model.safetensors, as the explicit loop's). Read by
    test_resume_exact, test_train_e2e and test_generate."""
    return _train_once(tmp_path_factory, "straight_trainer", lambda out: trainer_resume_args(shapes, vae_dir, out, RESUME_STEPS))


@pytest.fixture(scope="session")
def nonfinite_trainer_run(shapes, vae_dir, tmp_path_factory):
    """The Trainer script at a learning rate of 1e30 (trainer_nan_args) until its third non-finite
    step in a row stops it: (output dir, CompletedProcess). Read by test_failures and
    test_nonfinite_steps, which asked for this same run each."""
    def make(root):
        res = run_script(trainer_nan_args(shapes, vae_dir, root / "out"), timeout=600)
        return {"out": str(root / "out"), "args": res.args, "returncode": res.returncode, "stdout": res.stdout, "stderr": res.stderr}

    made = once_per_run(tmp_path_factory, "nonfinite_trainer", make)
    return Path(made["out"]), subprocess.CompletedProcess(made["args"], made["returncode"], made["stdout"], made["stderr"])


def trainer_nan_args(shapes, vae, out, extra=()):
    """A learning rate of 1e30 blows the weights up in step 1; later steps are non-finite and skipped."""
    return ldm_args(shapes, vae, out, 20, ["--learning_rate", "1e30", "--save_steps", "1", "--save_total_limit", "2",
                                           "--max_nonfinite_steps", "3", "--image_logging_steps", "0", *extra])


# -- Shared two-process runs (paddle.distributed.launch, gloo on the CPU) ---------------------

def launch(args, log_dir):
    """Run a training script on 2 processes; return both workers' logs (asserting it succeeded)."""
    res = run_script(["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir), *args], timeout=900)
    logs = [open(os.path.join(log_dir, f"workerlog.{r}")).read() for r in (0, 1)]
    assert res.returncode == 0, res.stderr[-2000:] + logs[0][-3000:] + logs[1][-2000:]
    return logs


@pytest.fixture(scope="session")
def same_records(tmp_path_factory):
    """Two parts of one repeated record: every rank's batches are identical, whatever the sharding."""
    def make(root):
        image = jpeg_b64((40, 40), (200, 40, 40))
        parts = []
        for p in range(2):
            path = str(root / f"part-{p:05d}.gz")
            write_part(path, [f"a red square on a blue background\t_\t{image}"] * 24)
            parts.append(path)
        return write_lists(root, parts)

    return once_per_run(tmp_path_factory, "same", make)


def dp_loop_args(shapes, vae, file_list, out, steps, extra=()):
    """The explicit loop as the data-parallel tests run it: batch 2 x 2 accumulation per process,
    gradient clipping, no caption dropout, a checkpoint every 2 steps, images logged at step 2."""
    return ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--adam_weight_decay", "0.02", "--max_grad_norm", "1.0",
            "--max_train_steps", str(steps), "--lr_scheduler", "constant", "--logging_steps", "1", "--save_steps", "2",
            "--seed", "23", "--num_workers", "1", "--vae_name_or_path", str(vae), "--caption_dropout", "0",
            "--text_encoder_config_file", "config/tiny/ldmbert.json", "--unet_config_file", "config/tiny/unet.json",
            "--file_list", file_list, "--model_max_length", "16", "--tokenizer_name", str(shapes["tokenizer"]),
            "--resolution", "32", "--image_logging_steps", "2", "--num_inference_steps", "2", "--num_threads", "1", *extra]


def dp_trainer_args(shapes, vae, file_list, out, steps, extra=()):
    """The same for the Trainer script."""
    args = ldm_args(shapes, vae, out, steps, ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                              "--max_grad_norm", "1.0", "--save_steps", "2", "--image_logging_steps", "2",
                                              "--num_inference_steps", "2", "--num_threads", "1", "--caption_dropout", "0",
                                              "--dataloader_num_workers", "1", *extra])
    return [a if a != shapes["file_list"] else file_list for a in args]


@pytest.fixture(scope="session")
def two_process_runs(shapes, vae_dir, same_records, tmp_path_factory):
    """Each script on 2 processes for 4 steps on `same_records` (checkpoint-2 and checkpoint-4):
    {"no_trainer" | "trainer": {"out": output dir, "logs": [workerlog.0, workerlog.1]}}. Read by
    test_distributed_correctness (the weights of step 2) and test_multiprocess (sync, sharding,
    logs, then a resume on a copy)."""
    def make(root):
        runs = {}
        for kind, args in (("no_trainer", dp_loop_args), ("trainer", dp_trainer_args)):
            out = root / kind
            runs[kind] = {"out": str(out), "logs": launch(args(shapes, vae_dir, same_records, out, 4), root / f"logs_{kind}")}
        return runs

    runs = once_per_run(tmp_path_factory, "two_process", make)
    return {kind: dict(run, out=Path(run["out"])) for kind, run in runs.items()}
