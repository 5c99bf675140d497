"""What a 32-GPU, multi-week run gets right or wrong, shown on 1-2 CPU processes.

One module fixture trains the tiny model 2 steps on a data set whose records are all the
same image and caption (so every rank sees the same batches, whatever the sharding); the two
plain 2-process runs are the session's (conftest.two_process_runs, shared with test_multiprocess):
  * explicit loop, 1 process;           * explicit loop, 2 processes;
  * explicit loop, 2 processes, --recompute;   * Trainer, 2 processes.
"""
import json
import os
import re

import numpy as np
import paddle
import pytest

from conftest import dp_loop_args, launch, ldm_args, run_script

STEPS = 2  # the weights compared are those of checkpoint-2


def loop_args(shapes, vae, file_list, out, extra=()):
    return dp_loop_args(shapes, vae, file_list, out, STEPS, extra)


def checksums(logs):
    return [re.findall(r"rank \d: parameter checksum (\S+)", log)[-1] for log in logs]


def trained_weights(out):
    """Trainable weights at the last checkpoint, from either script's checkpoint format."""
    from safetensors.numpy import load_file

    return load_file(str(out / f"checkpoint-{STEPS}" / "model.safetensors"))


def max_diff(a, b):
    keys = set(a) & set(b)
    assert len(keys) > 10
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in keys)


@pytest.fixture(scope="module")
def runs(shapes, vae_dir, same_records, two_process_runs, tmp_path_factory):
    """Step-2 weights of: the loop on 1 process; on 2 processes (the session's 4-step run, conftest);
    on 2 processes with --recompute; the Trainer on 2 processes (the session's)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    res = run_script(loop_args(shapes, vae_dir, same_records, root / "one"))
    assert res.returncode == 0, res.stderr[-3000:]
    out["one"] = trained_weights(root / "one")
    logs = launch(loop_args(shapes, vae_dir, same_records, root / "two_recompute", ["--recompute"]), root / "logs_two_recompute")
    assert checksums(logs)[0] == checksums(logs)[1], "two_recompute: ranks ended with different weights"
    out["two_recompute"] = trained_weights(root / "two_recompute")
    for name, kind in (("two", "no_trainer"), ("two_trainer", "trainer")):
        a, b = checksums(two_process_runs[kind]["logs"])
        assert a == b, f"{name}: ranks ended with different weights"
        out[name] = trained_weights(two_process_runs[kind]["out"])
    print({k: f"{max_diff(out['two'], v):.3e}" for k, v in out.items()})
    return out


def test_each_rank_draws_its_own_noise(runs):
    """Same batches on both ranks: had both ranks drawn the same noise and timesteps, the averaged
    gradient would equal one process's and the weights would match it exactly."""
    assert max_diff(runs["one"], runs["two"]) > 1e-5


def test_recompute_under_data_parallel_matches_plain_run(runs):
    assert max_diff(runs["two"], runs["two_recompute"]) < 1e-5


def test_trainer_and_explicit_loop_train_the_same(runs):
    assert max_diff(runs["two"], runs["two_trainer"]) < 1e-5


def test_image_logging_leaves_the_training_rng_alone(shapes, vae_dir, same_records, tmp_path):
    """ppdiffusers' sampling Generator reseeds paddle's global CPU RNG; with image logging every
    step, the run must still end with the same weights as without."""
    quiet, logged = tmp_path / "quiet", tmp_path / "logged"
    for out, every in [(quiet, "0"), (logged, "1")]:
        args = [a for a in loop_args(shapes, vae_dir, shapes["file_list"], out, ["--num_inference_steps", "2", "--caption_dropout", "0.5"])]
        args[args.index("--image_logging_steps") + 1] = every
        res = run_script(args)
        assert res.returncode == 0, res.stderr[-3000:]
    assert max_diff(trained_weights(quiet), trained_weights(logged)) == 0.0


def test_ema_follows_the_reference_warm_up():
    """The rule of CompVis' LitEma (the reference example's; ppdiffusers.models.ema.LitEma is the
    same code): the n-th update, n = 1, 2, ..., uses decay min(decay, (1 + n) / (10 + n)). Checked
    against that rule written out here and against LitEma itself, over updates on both sides of
    the point (n = 35 for 0.8) where the configured decay takes over from the warm-up."""
    from ppdiffusers.models.ema import LitEma

    from ldm.training.ema import COUNTER_KEY, EMA

    paddle.seed(0)
    layer = paddle.nn.Linear(4, 3)
    ema, lit = EMA(layer, decay=0.8), LitEma(layer, decay=0.8)
    expected = {n: p.numpy().astype(np.float64) for n, p in layer.named_parameters()}
    rng = np.random.default_rng(0)
    for n in range(1, 41):
        for name, p in layer.named_parameters():
            p.set_value(rng.normal(size=p.shape).astype("float32"))
        ema.update()
        lit(layer)
        d = min(0.8, (1 + n) / (10 + n))
        expected = {name: d * expected[name] + (1 - d) * p.numpy() for name, p in layer.named_parameters()}
    reference = dict(lit.named_buffers())
    for name in expected:
        np.testing.assert_allclose(ema.shadow[name].numpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(ema.shadow[name].numpy(), reference[lit.m_name2s_name[name]].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)

    # Inside applied() the model holds the EMA; the trained weights come back after.
    trained = layer.weight.numpy().copy()
    with ema.applied():
        np.testing.assert_allclose(layer.weight.numpy(), expected["weight"], rtol=1e-5, atol=1e-6)
    assert np.array_equal(layer.weight.numpy(), trained)
    # The counter travels with the weights, so a resumed run continues the same warm-up.
    state = ema.state_numpy()
    assert state[COUNTER_KEY][0] == 40
    fresh = EMA(layer, decay=0.8)
    fresh.load_numpy(state)
    assert fresh.num_updates == 40 and np.array_equal(fresh.shadow["weight"].numpy(), ema.shadow["weight"].numpy())


def test_ema_of_16_bit_weights_stays_float32():
    """Under O2 the trained weights are bf16; the EMA keeps float32 (a 0.9999 decay's update is
    below bf16's resolution) and showing it in the model leaves both copies as they were."""
    from ldm.training.ema import EMA

    layer = paddle.nn.Linear(4, 3)
    layer.weight.set_value(paddle.full_like(layer.weight, 1.0))
    layer.to(dtype="bfloat16")
    ema = EMA(layer, decay=0.9999)
    ema.num_updates = 10**6
    layer.weight.set_value(paddle.full([4, 3], 2.0, dtype="bfloat16"))
    ema.update()
    assert ema.shadow["weight"].dtype == paddle.float32
    assert np.allclose(ema.shadow["weight"].numpy(), 1.0001, atol=1e-6)  # in bf16 this would round back to 1.0
    trained = layer.weight.astype("float32").numpy().copy()
    with ema.applied():
        assert layer.weight.dtype == paddle.bfloat16 and np.allclose(layer.weight.astype("float32").numpy(), 1.0)
    assert np.array_equal(layer.weight.astype("float32").numpy(), trained)
    assert np.allclose(ema.shadow["weight"].numpy(), 1.0001, atol=1e-6)

def test_autoencoder_init_matches_torch_defaults():
    import math

    from conftest import ROOT
    from ldm.models.autoencoder import build_autoencoder

    paddle.seed(0)
    vae = build_autoencoder(os.path.join(ROOT, "config/tiny/vae.json"))
    for _, layer in vae.named_sublayers():
        if isinstance(layer, paddle.nn.Conv2D) and layer.weight.size >= 1024:
            fan_in = layer.weight.shape[1] * layer.weight.shape[2] * layer.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            assert abs(float(layer.weight.std()) - bound / math.sqrt(3)) / (bound / math.sqrt(3)) < 0.15
            assert float(layer.weight.abs().max()) <= bound + 1e-6
            assert float(layer.bias.abs().max()) <= bound + 1e-6 and float(layer.bias.abs().max()) > 0
        if isinstance(layer, paddle.nn.GroupNorm):
            assert float(layer.weight.min()) == 1.0 and float(layer.bias.abs().max()) == 0.0


def test_resuming_into_weights_of_another_shape_stops_naming_the_tensor(shapes, vae_dir, tmp_path):
    out = tmp_path / "out"
    res = run_script(ldm_args(shapes, vae_dir, out, 1, ["--save_steps", "1", "--image_logging_steps", "0"]))
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.load(open("config/tiny/ldmbert.json"))
    config["encoder_ffn_dim"] = config["encoder_ffn_dim"] * 2
    wider = tmp_path / "ldmbert.json"
    wider.write_text(json.dumps(config))
    args = ldm_args(shapes, vae_dir, out, 2, ["--save_steps", "1", "--image_logging_steps", "0"])
    args[args.index("--text_encoder_config_file") + 1] = str(wider)
    res = run_script(args, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert re.search(r"weight text_encoder\.\S+fc1\S* has shape", res.stderr), res.stderr[-2000:]
