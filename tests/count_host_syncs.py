"""Run a training script in this process and count device-to-host reads made by our code and the
PaddleNLP Trainer's loop: `python tests/count_host_syncs.py SCRIPT ARGS...` prints, as its last
line, `host_syncs {"file:line": count, ...}`.

On a GPU each of these (`Tensor.numpy()`, `.item()`, `.tolist()`, `float()`, `int()`, `bool()`)
waits for the device's queue to drain. Reads inside paddle and ppdiffusers are not counted: those
are of shape tensors (`paddle.shape`), which live on the host.
"""
import json
import os
import runpy
import sys
import traceback
from collections import Counter

import paddle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
counts = Counter()


def counting(name):
    original = getattr(paddle.Tensor, name)

    def read(self, *args, **kwargs):
        caller = traceback.extract_stack(limit=2)[0]
        path = os.path.abspath(caller.filename)
        ours = path.startswith(ROOT + os.sep) and "site-packages" not in path
        trainer_loop = os.sep + os.path.join("paddlenlp", "trainer") + os.sep in path
        if ours or trainer_loop:
            counts[f"{path.split('site-packages' + os.sep)[-1] if trainer_loop else os.path.relpath(path, ROOT)}:{caller.lineno}"] += 1
        return original(self, *args, **kwargs)

    setattr(paddle.Tensor, name, read)


for method in ("numpy", "item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
    counting(method)

script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print("host_syncs " + json.dumps(dict(counts)), flush=True)
