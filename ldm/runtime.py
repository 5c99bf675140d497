"""Process-level set-up shared by the entry scripts: CPU threads, start-up errors, resume."""
import os
import sys
from typing import Optional

import paddle


def set_cpu_threads(n: int = 0) -> int:
    """Paddle runs CPU kernels on one thread unless told (~1.5x slower on 2 cores); use them all.

    Under paddle.distributed.launch the cores are shared between the local processes.
    """
    if n <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = int(os.environ.get("PADDLE_LOCAL_SIZE", os.environ.get("PADDLE_TRAINERS_NUM", "1")) or 1)
        n = max(1, cores // max(1, local))
    paddle.base.core.set_num_threads(n)
    return n


def exit_on_bad_input(error: Exception) -> None:
    """A wrong flag or path stops the run with one line that says what to fix."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def last_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete `checkpoint-N` in output_dir (the Trainer's layout), or None."""
    from paddlenlp.trainer.trainer_utils import get_last_checkpoint

    if not os.path.isdir(output_dir):
        return None
    return get_last_checkpoint(output_dir)
