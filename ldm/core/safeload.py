"""Loading files you did not write: nothing is unpickled unless the user said --trust_pickle.

A Python pickle (Paddle's `.pdparams`/`.pdopt`/`.pth`, torch's `.bin`/`.pt` when read as a
plain pickle) can run any code while it loads, so a downloaded checkpoint or a shared run
directory could run code on the user's machine. Everything this project writes loads without
pickle (safetensors and JSON); a pickle is read only through `load_pickle(..., trust_pickle=True)`,
and every refusal says, in one line, what was refused and how to accept it.

Model directories are checked before ppdiffusers or paddlenlp open them (`check_weights_dir`,
`check_pipeline_dir`): their stock loaders pick a pickle reader by file name, and
`DiffusionPipeline.from_pretrained` imports whatever module a model_index.json names, or a
`.py` file it finds in the directory, so those are refused before anything is imported, with or
without --trust_pickle (code is never a weights format).
"""
import json
import os

TRUST_HINT = "pass --trust_pickle only if you wrote it yourself or trust whoever did"


class PickleRefused(ValueError):
    """A pickled file was asked for without --trust_pickle (a ValueError: scripts print it as one line)."""


def refuse(path: str, what: str = "a Python pickle") -> "PickleRefused":
    """The one-line refusal for `path` (raise it)."""
    return PickleRefused(f"{path} is {what}, which can run code while it loads; refusing to read it ({TRUST_HINT})")


def load_pickle(path: str, trust_pickle: bool, what: str = "a Paddle pickle", **paddle_load_kwargs):
    """`paddle.load(path)` if the user trusts pickles, else raise PickleRefused before opening the file."""
    if not trust_pickle:
        raise refuse(path, what)
    import paddle

    return paddle.load(path, **paddle_load_kwargs)


# ---------------------------------------------------------------------------
# Model directories (a pipeline directory, its vqvae/ bert/ unet/, an autoencoder directory)
# ---------------------------------------------------------------------------

# Weight files ppdiffusers and paddlenlp read with a pickle: by suffix (ppdiffusers'
# `smart_load` and paddlenlp's `load_state_dict` choose the reader by suffix; only
# `.safetensors` goes to the safetensors parser). ppdiffusers 0.29's torch reader without torch
# (`utils/load_utils.py` `torch_load`) unpickles a zip's data.pkl with an Unpickler whose
# `find_class` falls through to `pickle.Unpickler.find_class`, i.e. imports and calls anything.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pdparams", ".pdopt", ".pkl", ".pickle")

# The libraries a model_index.json may name: ppdiffusers (and the names its loader maps onto
# it, pipeline_utils.py step 6.1) and the transformers it bundles; anything else would be
# imported by `DiffusionPipeline.from_pretrained` (`importlib.import_module(library_name)`).
TRUSTED_LIBRARIES = ("ppdiffusers", "ppdiffusers.transformers", "paddlenlp.transformers", "diffusers", "diffusers_paddle", "transformers")


def check_weights_dir(path: str, trust_pickle: bool, flag: str) -> None:
    """Refuse (PickleRefused, one line) a model directory the stock loaders would read a pickle
    from, unless the user trusts pickles: a weight file with a pickle suffix, or a sharded
    index naming a shard that is not safetensors.

    Any pickled weight file counts, even beside safetensors ones the loader might prefer: which
    file wins depends on variants and index files (ppdiffusers' modeling_utils and paddlenlp's
    `_resolve_model_file_path` order them differently), and a rule that needs the loader's
    exact order to be safe is one library update away from running code."""
    if trust_pickle:
        return
    names = sorted(os.listdir(path))
    for name in names:
        if name.endswith(PICKLE_SUFFIXES):
            beside = [n for n in names if n.endswith(".safetensors")]
            hint = f" (to load the safetensors weights beside it, {beside[0]}, remove it)" if beside else ""
            raise refuse(os.path.join(path, name), f"{flag}'s pickled weights file{hint}")
        if name.endswith(".index.json"):
            weight_map = _read_json(os.path.join(path, name), flag).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise ValueError(f"{flag} {os.path.join(path, name)}: weight_map must map tensor names to files")
            for shard in sorted(set(map(str, weight_map.values()))):
                if not shard.endswith(".safetensors"):
                    raise refuse(os.path.join(path, name), f"{flag}'s shard index naming {shard!r}, a file read with pickle")


def check_pipeline_dir(path: str, trust_pickle: bool, flag: str) -> None:
    """Refuse, before anything is imported or unpickled, a pipeline directory whose model_index.json
    names a class outside ppdiffusers/paddlenlp, that holds Python files ppdiffusers would import,
    or whose components hold pickled weights (without --trust_pickle). Raises ValueError (one line)."""
    index_file = os.path.join(path, "model_index.json")
    # Our loaders (ldm.model) open the LDM pipeline's parts whatever model_index.json says; the
    # stock loader opens what it names.
    components = {"vqvae", "bert", "tokenizer", "unet", "scheduler"}
    if os.path.isfile(index_file):
        components |= set(check_model_index(index_file, flag))
    for folder in [path] + [os.path.join(path, c) for c in sorted(components) if os.path.isdir(os.path.join(path, c))]:
        # DiffusionPipeline.from_pretrained imports `<dir>/<_class_name[0]>.py` and even
        # `<dir>/None.py` (its custom_pipeline default) as a custom pipeline, and
        # `<component>/<library>.py` as a custom component: a model directory holds no code.
        code = sorted(n for n in os.listdir(folder) if n.endswith(".py"))
        if code:
            raise ValueError(f"{flag} {path!r} holds Python code ({os.path.join(folder, code[0])}), which ppdiffusers would import "
                             f"while loading it; a model directory holds configs and weights only: refusing to load it")
        if folder != path:
            check_weights_dir(folder, trust_pickle, f"{flag} {os.path.basename(folder)}/")


def check_model_index(index_file: str, flag: str) -> list:
    """The components a model_index.json names, after checking that each is a ppdiffusers or
    paddlenlp class the pipeline loader reads with its own from_pretrained (a model, scheduler
    or tokenizer); raises ValueError naming the first entry that is not. Nothing the file
    names is imported first: only the trusted libraries are."""
    config = _read_json(index_file, flag)
    if not isinstance(config.get("_class_name"), str):
        # A [module, class] pair makes ppdiffusers import <dir>/<module>.py as a custom pipeline.
        raise ValueError(f"{flag} {index_file}: _class_name must name a ppdiffusers pipeline class, got {config.get('_class_name')!r}")
    components = []
    for name, entry in config.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)):
            continue
        if len(entry) != 2 or not all(isinstance(e, (str, type(None))) for e in entry):
            raise ValueError(f"{flag} {index_file}: {name} must be [library, class], got {entry!r}")
        library, class_name = entry
        if library is None:
            continue  # an optional component left out
        cls = _trusted_class(library, class_name or "")
        if cls is None:
            raise ValueError(f"{flag} {index_file}: {name} names {library}.{class_name}, which is not a ppdiffusers or paddlenlp "
                             f"model, scheduler or tokenizer; loading it would import and run that code: refusing to load it")
        components.append(name)
    return components


def _trusted_class(library: str, class_name: str):
    """The class ppdiffusers' loader would use for [library, class_name] if it is one of the
    trusted libraries' models, schedulers or tokenizers (not a nested pipeline), else None."""
    import importlib
    import importlib.util

    from paddlenlp.transformers import PretrainedModel, PretrainedTokenizer
    from ppdiffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
    from ppdiffusers import pipelines

    # As pipeline_utils.py step 6.1 maps them, then: a ppdiffusers pipeline subpackage
    # (e.g. ["latent_diffusion", "LDMBertModel"]) or a library.
    library = {"diffusers": "ppdiffusers", "diffusers_paddle": "ppdiffusers", "transformers": "ppdiffusers.transformers",
               "paddlenlp.transformers": "ppdiffusers.transformers"}.get(library, library)
    if library in TRUSTED_LIBRARIES:
        module = importlib.import_module(library)
    elif library.isidentifier() and importlib.util.find_spec(f"ppdiffusers.pipelines.{library}") is not None:
        module = getattr(pipelines, library)
    else:
        return None
    cls = getattr(module, class_name, None)
    loadable = (ModelMixin, SchedulerMixin, PretrainedModel, PretrainedTokenizer)
    if not isinstance(cls, type) or not issubclass(cls, loadable) or issubclass(cls, DiffusionPipeline):
        return None
    return cls


def _read_json(path: str, flag: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {path}: expected a JSON object")
    return config
