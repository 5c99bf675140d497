"""Files we write and read back: their modes (the umask decides, as for any other file the user
writes), and the one JSON reader of local files.

The safetensors writer (used by our checkpoints and by ppdiffusers' `save_pretrained`) creates
every file with mode 0600 whatever the umask. On a cluster that means a teammate cannot read the
run's checkpoints or exported model, and a job resumed under another uid (a Kubernetes pod, a
service account) cannot read its own checkpoint. We set the mode a plain `open()` would have given.
"""
import json
import os


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc, kernel >= 4.7)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it straight back
    os.umask(mask)
    return mask


def as_umask_allows(path: str) -> None:
    """Give the file at `path` the mode `open(path, "w")` would have given it."""
    os.chmod(path, 0o666 & ~current_umask())


def safetensors_as_umask_allows(directory: str) -> None:
    """`as_umask_allows` for every .safetensors file a `save_pretrained` wrote into `directory`
    (its component subfolders included; checkpoint-N folders are written file by file and skipped)."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith("checkpoint-") and d != "abandoned"]
        for name in files:
            if name.endswith(".safetensors"):
                as_umask_allows(os.path.join(root, name))


def read_json(path: str):
    """A local JSON file (args.json, trainer_state.json, a model config), read as UTF-8."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
