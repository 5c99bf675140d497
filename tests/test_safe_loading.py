"""Loading files you did not write (ldm.safeload, issue 21): a crafted pickle in each place a load
path would read one is refused with one line before it is opened, so the code it carries never
runs (its marker file stays absent); a model_index.json naming a module outside
ppdiffusers/paddlenlp is refused before that module is imported. With --trust_pickle an honest
old-format file still loads.

The crafted files are what an attacker would ship: a pickle whose __reduce__ calls
open(marker, "w"), saved under the name the loader looks for (wrapped in torch's zip layout
for `.bin`, since ppdiffusers' torch reader without torch unpickles a zip's data.pkl, and its
find_class falls through to Python's, which imports anything)."""
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import ROOT, run_script


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(marker) -> bytes:
    return pickle.dumps(Evil(marker), protocol=2)


def write_torch_zip(path, payload: bytes):
    """torch.save's zip layout (what a diffusers `.bin` is): <prefix>/data.pkl."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


def assert_refused(res, *words):
    """Exit 2 with one `error:` line on stderr that names what was refused and the flag."""
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), last
    return last


def evil_vae_dir(root, marker):
    """A diffusers-format autoencoder directory (a Stable Diffusion download's vae/) whose
    weights are a crafted pickle."""
    d = root / "evil_vae"
    d.mkdir()
    config = json.load(open(os.path.join(ROOT, "config/tiny/vae.json")))
    (d / "config.json").write_text(json.dumps(dict(config, _class_name="AutoencoderKL")))
    write_torch_zip(d / "diffusion_pytorch_model.bin", evil_pickle(marker))
    return d


def checkpoint_dir(root, pipeline_dir, **args):
    """A checkpoint-N as the training scripts write it (args.json, weights), rebuilt from
    `pipeline_dir` (--model_name_or_path) at 16 px, the stock fixture's size."""
    ckpt = root / "checkpoint-2"
    ckpt.mkdir(parents=True)
    saved = dict(model_name_or_path=str(pipeline_dir), model_max_length=16, resolution=16, seed=0, **args)
    (ckpt / "args.json").write_text(json.dumps(saved))
    return ckpt


def generate(model_dir, out, *extra):
    return run_script(["generate.py", "--model_dir", str(model_dir), "--prompt", "a red circle", "--output", str(out),
                       "--num_inference_steps", "1", "--num_threads", "1", *extra])


# ---------------------------------------------------------------------------
# Pickled weights
# ---------------------------------------------------------------------------


def test_generate_refuses_an_old_trainer_checkpoint(stock_pipeline_dir, tmp_path):
    """A Trainer checkpoint of the old format: its model_state.pdparams is a Paddle pickle."""
    marker = tmp_path / "ran"
    ckpt = checkpoint_dir(tmp_path / "run", stock_pipeline_dir)
    (ckpt / "model_state.pdparams").write_bytes(evil_pickle(marker))
    res = generate(ckpt, tmp_path / "out")
    assert_refused(res, "model_state.pdparams", "--trust_pickle")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_trust_pickle_loads_an_honest_old_trainer_checkpoint(stock_pipeline_dir, tmp_path):
    import paddle

    from ldm.training.args import ModelArguments
    from ldm.training.checkpoint import trainable_state
    from ldm.evaluation.loading import model_from_checkpoint
    from ldm.training.build import create_model
    from ldm.core.safeload import PickleRefused

    ckpt = checkpoint_dir(tmp_path / "run", stock_pipeline_dir)
    model = create_model(ModelArguments(model_name_or_path=str(stock_pipeline_dir), model_max_length=16), 16, 0)
    # Weights unlike the pipeline directory's, so loading them shows.
    saved = {k: v.numpy() + 1.0 for k, v in trainable_state(model).items()}
    paddle.save(saved, str(ckpt / "model_state.pdparams"))
    with pytest.raises(PickleRefused, match="model_state.pdparams.*--trust_pickle"):
        model_from_checkpoint(str(ckpt))
    loaded, which = model_from_checkpoint(str(ckpt), trust_pickle=True)
    assert which == "raw (checkpoint has no EMA)"
    state = loaded.state_dict()
    assert all(np.array_equal(state[k].numpy(), v) for k, v in saved.items())


def test_training_refuses_a_pickled_diffusers_autoencoder(shapes, tmp_path):
    """--vae_name_or_path pointing at a diffusers vae/ with diffusion_pytorch_model.bin: the real
    training script stops at start-up."""
    from conftest import ldm_args

    marker = tmp_path / "ran"
    vae = evil_vae_dir(tmp_path, marker)
    res = run_script(ldm_args(shapes, vae, tmp_path / "out", 2, ["--num_threads", "1"]))
    assert_refused(res, "diffusion_pytorch_model.bin", "--vae_name_or_path", "--trust_pickle")
    assert not marker.exists()


def test_cache_latents_refuses_a_pickled_autoencoder(shapes, tmp_path, capsys):
    from ldm.training import cache_latents

    marker = tmp_path / "ran"
    vae = evil_vae_dir(tmp_path, marker)
    argv = ["--file_list", shapes["file_list"], "--vae_name_or_path", str(vae), "--resolution", "32", "--output_dir", str(tmp_path / "cache")]
    assert cache_latents.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diffusion_pytorch_model.bin" in err[0] and "--trust_pickle" in err[0], err
    assert not marker.exists()


def test_generate_refuses_a_checkpoint_whose_autoencoder_is_pickled(stock_pipeline_dir, tmp_path):
    """A checkpoint-N with safetensors weights whose args.json names a pickled autoencoder (and
    says trust_pickle: true, which a file we did not write cannot grant)."""
    from safetensors.numpy import save_file

    marker = tmp_path / "ran"
    vae = evil_vae_dir(tmp_path, marker)
    ckpt = checkpoint_dir(tmp_path / "run", stock_pipeline_dir, trust_pickle=True)
    args = json.loads((ckpt / "args.json").read_text())
    args.update(model_name_or_path=None, vae_name_or_path=str(vae), tokenizer_name=str(stock_pipeline_dir / "tokenizer"),
                text_encoder_config_file=os.path.join(ROOT, "config/tiny/ldmbert.json"), unet_config_file=os.path.join(ROOT, "config/tiny/unet.json"))
    (ckpt / "args.json").write_text(json.dumps(args))
    save_file({"unet.conv_out.bias": np.zeros(4, np.float32)}, str(ckpt / "model.safetensors"))
    save_file({"unet.conv_out.bias": np.zeros(4, np.float32)}, str(ckpt / "ema.safetensors"))
    res = generate(ckpt, tmp_path / "out")
    assert_refused(res, "diffusion_pytorch_model.bin", "--trust_pickle")
    assert not marker.exists()


def test_pipeline_directory_with_pickled_components_is_refused(stock_pipeline_dir, tmp_path):
    """A Paddle-format pipeline directory whose unet/ holds model_state.pdparams instead of
    safetensors, and a diffusers one whose bert/ holds pytorch_model.bin: refused by generate's
    loader, by --model_name_or_path and by the demo's sampler, whichever component it is."""
    from ldm.evaluation.loading import load_pipeline
    from ldm.models.ldm import LatentDiffusionModel
    from ldm.core.safeload import PickleRefused
    from ldm.evaluation.sampling import sample_grid

    marker = tmp_path / "ran"
    for part, weights in (("unet", "model_state.pdparams"), ("bert", "pytorch_model.bin")):
        model_dir = tmp_path / part
        shutil.copytree(stock_pipeline_dir, model_dir)
        for name in os.listdir(model_dir / part):
            if name.endswith(".safetensors"):
                os.remove(model_dir / part / name)
        payload = evil_pickle(marker)
        if weights.endswith(".bin"):
            write_torch_zip(model_dir / part / weights, payload)
        else:
            (model_dir / part / weights).write_bytes(payload)
        with pytest.raises(PickleRefused, match=f"{part}/{weights}.*--trust_pickle"):
            load_pipeline(str(model_dir))
        with pytest.raises(PickleRefused, match=f"--model_name_or_path {part}/"):
            LatentDiffusionModel.from_pipeline_dir(str(model_dir), 16)
        with pytest.raises(PickleRefused):
            sample_grid(str(model_dir), ["a red circle"], 1, str(tmp_path / "grid.png"), steps=1)
        assert not marker.exists()


def test_pickled_shard_named_by_an_index_is_refused(tmp_path):
    """A safetensors index whose weight_map names a file the loaders would read with pickle."""
    from ldm.core.safeload import PickleRefused, check_weights_dir

    (tmp_path / "diffusion_paddle_model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard.dat"}}))
    with pytest.raises(PickleRefused, match="shard.dat"):
        check_weights_dir(str(tmp_path), False, "--vae_name_or_path")
    check_weights_dir(str(tmp_path), True, "--vae_name_or_path")


# ---------------------------------------------------------------------------
# The FID Inception weights
# ---------------------------------------------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def write_legacy_torch_file(path, tensors, header=None):
    """torch.save's legacy (pre-1.6, non-zip) format, as pytorch-fid's 2019 .pth may be: magic,
    protocol, system info, the state dict (tensors by persistent id), storage keys, storages."""

    class Rebuild:  # pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
        def __init__(self, key, array):
            self.key, self.array = key, array

    class StatePickler(pickle._Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, tuple) and obj[:1] == ("storage-of",):
                return ("storage", Global("torch", "FloatStorage"), obj[1].key, "cpu", obj[1].array.size, None)
            return None

        def save(self, obj, save_persistent_id=True):
            if isinstance(obj, Global):
                self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
                return
            super().save(obj, save_persistent_id)

        def reducer_override(self, obj):
            if isinstance(obj, Rebuild):
                stride = tuple(s // obj.array.itemsize for s in obj.array.strides)
                return Global("torch._utils", "_rebuild_tensor_v2"), (("storage-of", obj), 0, obj.array.shape, stride, False, {})
            return NotImplemented

    refs = {name: Rebuild(str(i), np.asarray(a, np.float32)) for i, (name, a) in enumerate(tensors.items())}
    with open(path, "wb") as f:
        f.write(header if header is not None else pickle.dumps(LEGACY_MAGIC, protocol=2))
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
        StatePickler(f, protocol=2).dump(refs)
        pickle.dump([r.key for r in refs.values()], f, protocol=2)
        for r in refs.values():
            flat = np.ascontiguousarray(r.array).ravel() if r.array.flags.c_contiguous else r.array.T.ravel()
            f.write(struct.pack("<q", flat.size) + flat.astype("<f4").tobytes())
    return path


class Global:
    """`module.name` written as pickle's GLOBAL opcode."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise TypeError("a reference, not a function")


def test_legacy_inception_file_cannot_run_code(tmp_path, capsys):
    """The legacy format's header pickles go through the restricted unpickler too: a crafted
    header is a one-line error from python -m ldm.evaluate, before anything else loads."""
    from ldm.evaluation import evaluate

    marker = tmp_path / "ran"
    path = write_legacy_torch_file(str(tmp_path / "pt_inception.pth"), {"w": np.ones(3)}, header=evil_pickle(marker))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model_dir", str(tmp_path), "--file_list", str(tmp_path / "none"), "--num_images", "2",
                       "--output_dir", str(tmp_path / "out"), "--inception_weights", path])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --inception_weights") and "unexpected object io.open" in err[0], err
    assert not marker.exists()


def test_honest_legacy_file_reads_and_bad_strides_are_refused(tmp_path):
    from ldm.evaluation.inception import read_torch_file

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = write_legacy_torch_file(str(tmp_path / "ok.pth"), {"a": a, "b": np.float32([7, 8])})
    tensors = read_torch_file(path)
    assert np.array_equal(tensors["a"], a) and np.array_equal(tensors["b"], [7, 8])
    # A tensor whose stride reaches past its 6-element storage (numpy's as_strided would read
    # whatever memory lies beyond it).
    wide = np.lib.stride_tricks.as_strided(np.zeros(100, np.float32), shape=(2, 3), strides=(4 * 50, 4))
    bad = write_legacy_torch_file(str(tmp_path / "bad.pth"), {"a": wide})  # a 6-element storage, strides (50, 1)
    with pytest.raises(ValueError, match="reaches element"):
        read_torch_file(bad)


# ---------------------------------------------------------------------------
# model_index.json
# ---------------------------------------------------------------------------


def test_model_index_naming_another_module_is_refused_before_import(stock_pipeline_dir, tmp_path):
    """generate.py on a pipeline directory whose model_index.json names evil_module.Thing,
    a module on the path that writes the marker when imported."""
    marker = tmp_path / "ran"
    code = tmp_path / "code"
    code.mkdir()
    (code / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    pass\n")
    model_dir = tmp_path / "model"
    shutil.copytree(stock_pipeline_dir, model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    index["unet"] = ["evil_module", "Thing"]
    (model_dir / "model_index.json").write_text(json.dumps(index))
    # (run_script fixes PYTHONPATH to the repo; here it also holds the planted module)
    res = subprocess.run([sys.executable, "generate.py", "--model_dir", str(model_dir), "--prompt", "x", "--output", str(tmp_path / "out"),
                          "--num_inference_steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{code}"))
    assert_refused(res, "evil_module.Thing", "model_index.json")
    assert not marker.exists()


def test_model_index_and_code_in_the_directory_are_refused_everywhere(stock_pipeline_dir, tmp_path):
    """["os", "system"], a pipeline _class_name naming a .py in the directory, a component's
    own .py (ppdiffusers' custom components) and ppdiffusers' `None.py` custom-pipeline default:
    each refused by generate's loader, --model_name_or_path and the demo's sampler."""
    from ldm.evaluation.loading import load_pipeline
    from ldm.models.ldm import LatentDiffusionModel
    from ldm.evaluation.sampling import sample_grid

    marker = tmp_path / "ran"
    plant = f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    pass\n"
    cases = {
        "os_system": ({"unet": ["os", "system"]}, {}),
        "custom_pipeline": ({"_class_name": ["evil_pipeline", "Thing"]}, {"evil_pipeline.py": plant}),
        "custom_component": ({"unet": ["evil_component", "Thing"]}, {"unet/evil_component.py": plant}),
        "none_py": ({}, {"None.py": plant}),
        "library_shadow": ({}, {"unet/ppdiffusers.py": plant}),
    }
    for name, (entries, files) in cases.items():
        model_dir = tmp_path / name
        shutil.copytree(stock_pipeline_dir, model_dir)
        index = json.loads((model_dir / "model_index.json").read_text())
        (model_dir / "model_index.json").write_text(json.dumps(dict(index, **entries)))
        for rel, text in files.items():
            (model_dir / rel).write_text(text)
        for load in (lambda: load_pipeline(str(model_dir)), lambda: LatentDiffusionModel.from_pipeline_dir(str(model_dir), 16),
                     lambda: sample_grid(str(model_dir), ["x"], 1, str(tmp_path / "grid.png"), steps=1)):
            with pytest.raises(ValueError) as e:
                load()
            assert "\n" not in str(e.value) and ("model_index.json" in str(e.value) or "Python code" in str(e.value)), (name, e.value)
        assert not marker.exists(), name
        assert not any(m.startswith("evil_") for m in sys.modules), name


def test_written_pipelines_still_load(stock_pipeline_dir):
    """The guard lets through what ppdiffusers itself writes (model_index.json naming
    ppdiffusers, its latent_diffusion module and its transformers; safetensors weights)."""
    from ldm.core.safeload import check_pipeline_dir

    check_pipeline_dir(str(stock_pipeline_dir), False, "--model_dir")
    index = json.loads((stock_pipeline_dir / "model_index.json").read_text())
    assert {k: v[0] for k, v in index.items() if not k.startswith("_")} == {
        "bert": "latent_diffusion", "scheduler": "ppdiffusers", "tokenizer": "ppdiffusers.transformers", "unet": "ppdiffusers",
        "vqvae": "ppdiffusers"}
