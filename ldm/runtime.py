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


def require_writable_dir(path: str, flag: str = "--output_dir") -> None:
    """Fail at start-up, in one line, if the output directory cannot be created or written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path!r} is not a writable directory ({e.strerror or e}); pass a directory you can write to") from None


def exit_on_bad_input(error: Exception) -> None:
    """A wrong flag or path stops the run with one line that says what to fix."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def checkpoint_to_resume(training_args) -> Optional[str]:
    """--resume_from_checkpoint if given; else, unless --overwrite_output_dir, the newest
    complete `checkpoint-N` in --output_dir, so re-running the same command continues the run."""
    from paddlenlp.utils.log import logger

    from ldm.checkpoint import latest_checkpoint

    resume = training_args.resume_from_checkpoint
    if resume is None and not training_args.overwrite_output_dir:
        resume = latest_checkpoint(training_args.output_dir)
    if resume:
        if not os.path.isdir(resume):
            raise ValueError(f"--resume_from_checkpoint {resume!r} is not a directory")
        logger.info(f"Resuming from {resume}")
    return resume


def log_startup(model, per_device_batch: int, accumulation: int, world_size: int, num_workers: int, threads: int, stream=None) -> None:
    """What a user checks first: sizes, effective batch, and how the data is sharded (STYLE 11)."""
    from paddlenlp.utils.log import logger

    trainable = sum(p.size for p in model.parameters() if not p.stop_gradient)
    logger.info(f"Trainable parameters: {trainable / 1e6:.2f}M; CPU threads per process: {threads}")
    logger.info(f"Total train batch size (per device {per_device_batch} x accumulation {accumulation} x world {world_size}) = {per_device_batch * accumulation * world_size}")
    if stream is not None:
        shards = world_size * max(1, num_workers)
        parts = sum(len(e.parts) for e in stream.entries)
        logger.info(f"Data: {len(stream.entries)} filelist(s), {parts} part(s), {shards} shard(s) = {world_size} rank(s) x {max(1, num_workers)} worker(s); this rank reads shards {stream.rank * max(1, num_workers)}..{(stream.rank + 1) * max(1, num_workers) - 1}")


def log_parameter_checksum(model, rank: int) -> float:
    """Printed by every rank at the end: equal values mean the ranks' weights stayed in sync."""
    from paddlenlp.utils.log import logger

    total = float(sum(float(p.astype("float64").abs().sum()) for p in model.parameters() if not p.stop_gradient))
    logger.info(f"rank {rank}: parameter checksum {total:.10e}")
    return total


class Preemption:
    """SIGTERM (a cluster's preemption notice) asks the loop to finish its step, save a
    checkpoint and exit 0; re-running the command continues from that checkpoint."""

    def __init__(self):
        import signal

        self.requested = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        if not self.requested:
            print("SIGTERM received: finishing this step, then saving a checkpoint and exiting", file=sys.stderr, flush=True)
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank once any rank got the signal, so all ranks stop at the same step."""
        return any_rank(self.requested)


def any_rank(flag: bool) -> bool:
    """Logical OR of a flag over all ranks (one tiny all-reduce when distributed)."""
    import paddle.distributed as dist

    if dist.get_world_size() <= 1:
        return bool(flag)
    value = paddle.to_tensor([1 if flag else 0], dtype="int32")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(int(value.numpy()[0]))


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss; stops the run after too many in a row."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def is_finite(self, loss) -> bool:
        """True if this loss is finite on every rank (so every rank skips, or none)."""
        import math

        return not any_rank(not math.isfinite(float(loss)))

    def step_done(self, skipped: bool) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            # SystemExit prints the one-line message and exits 1, with no traceback to read past.
            raise SystemExit(
                f"error: {self.consecutive} optimizer steps in a row had a non-finite loss; stopping. The last checkpoint in "
                "--output_dir is intact: lower --learning_rate, set --max_grad_norm, or check the data, then re-run"
            )

