"""Loading files you did not write: nothing is unpickled unless the user said --trust_pickle.

A Python pickle (Paddle's `.pdparams`/`.pdopt`/`.pth`, torch's `.bin`/`.pt` when read as a
plain pickle) can run any code while it loads, so a downloaded checkpoint or a shared run
directory could run code on the user's machine. Everything this project writes loads without
pickle (safetensors and JSON); a pickle is read only through `load_pickle(..., trust_pickle=True)`,
and every refusal says, in one line, what was refused and how to accept it.
"""
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

