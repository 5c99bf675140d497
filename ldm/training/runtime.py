"""Process-level set-up shared by the entry scripts: CPU threads, RNG streams, start-up errors,
resume, and what the ranks agree on at every step."""
import os
import sys
from dataclasses import dataclass
from typing import Optional

import paddle


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_cpu_threads(n: int = 0, data_workers: int = 0) -> int:
    """Paddle runs CPU kernels on one thread unless told; give it the cores nobody else uses.

    Under paddle.distributed.launch the cores are shared between the local processes, and each
    process's `data_workers` DataLoader workers take one core each (ldm.data.init_worker gives
    them one thread): the training process gets the cores left, at least one. Oversubscribed
    cores cost far more than an idle one: the tiny preset's step on 2 cores with 1 data worker
    took 350 ms with 2 threads and 178 ms with 1 (bench/train_step.py --threads, README "Speed").
    """
    if n <= 0:
        cores = usable_cores()
        local = int(os.environ.get("PADDLE_LOCAL_SIZE", os.environ.get("PADDLE_TRAINERS_NUM", "1")) or 1)
        n = max(1, cores // max(1, local) - data_workers)
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


def seed_rank_streams(seed: int, rank: int) -> None:
    """Give every rank its own random stream for what the training step draws (noise, timesteps,
    the posterior sample, dropout), after the model was built from the shared seed.

    Every rank is seeded with the same --seed before the model is built (identical initial
    weights; DataParallel also broadcasts rank 0's), but if the ranks kept drawing from the same
    stream, a global batch of N x B images would carry only B distinct (noise, timestep) pairs
    and data parallelism would buy no variance reduction. Rank 0 keeps --seed itself, so a
    one-process run draws exactly what rank 0 of a multi-process run draws. (paddlenlp's
    set_seed only varies the seed by rank inside a fleet hybrid group, which plain
    DataParallel does not create.) Checkpoints save each rank's state, so resume stays exact.
    """
    import random

    import numpy as np

    rank_seed = seed + 1_000_003 * rank
    paddle.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)


class Preemption:
    """SIGTERM (a cluster's preemption notice) asks the loop to finish its step, save a
    checkpoint and exit 0; re-running the command continues from that checkpoint.

    Schedulers send SIGTERM to every process of the job, and paddle.distributed.launch sends it
    to each rank's process group three times in 0.6 s: the handler only sets a flag, so repeats
    are harmless, and the data workers ignore it (ldm.data.init_worker) so that they are alive
    for the rest of the step. The launcher SIGKILLs a rank still running 30 s after its SIGTERM
    (paddle/distributed/launch: Pod.stop(timeout=30)): the rest of the step and the save must fit
    in that (README "Interruptions" says what to do where they do not).
    """

    def __init__(self):
        import signal

        from ldm.data.progress import end_workers_at_exit

        self.requested = False
        signal.signal(signal.SIGTERM, self._on_signal)
        end_workers_at_exit()  # the workers ignore SIGTERM, so this process ends them at exit

    def _on_signal(self, signum, frame):
        if not self.requested:
            print("SIGTERM received: finishing this step, then saving a checkpoint and exiting", file=sys.stderr, flush=True)
        self.requested = True


def any_rank(flag: bool) -> bool:
    """Logical OR of a flag over all ranks (one tiny all-reduce when distributed)."""
    import paddle.distributed as dist

    if dist.get_world_size() <= 1:
        return bool(flag)
    value = paddle.to_tensor([1 if flag else 0], dtype="int32")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(int(value.numpy()[0]))


@dataclass
class StepVerdict:
    skip: bool  # some rank had a non-finite loss or gradient norm in this step: nobody updates
    preempt: bool  # some rank got SIGTERM: everybody saves and stops after this step
    reason: str = ""  # why the step is skipped, for the warning: "loss" or "gradients"


class StepAgreement:
    """What every rank must agree on at each optimizer step, in one all-reduce and one host read.

    On a GPU every read of a device value (`float(loss)`, `.numpy()`) waits for the queue to
    drain. So the non-finite checks accumulate on the device: the loss over the micro-batches,
    the gradients' global norm once their accumulation is complete (a finite loss can have an
    infinite gradient, e.g. sqrt at 0, and clipping by an infinite norm writes NaN into every
    weight). At the end of the step one small vector [non-finite loss, non-finite gradient norm,
    SIGTERM, data stream dead] is max-reduced over the ranks and read once: the step's only host
    sync. Every rank therefore skips the same steps, stops at the same step, and no rank leaves
    the others waiting in a collective.
    """

    def __init__(self, max_nonfinite: int):
        self.max_nonfinite = max_nonfinite
        self.preemption = Preemption()
        self.consecutive = 0
        self.skipped = 0
        self._nonfinite = None
        self._nonfinite_grad = None

    def observe(self, loss) -> None:
        """Note a micro-batch's loss (no host sync)."""
        bad = paddle.logical_not(paddle.isfinite(loss.detach().astype("float32"))).astype("float32").reshape([1])
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad

    def observe_gradients(self, parameters) -> None:
        """Note whether the accumulated gradients' global norm is finite (no host sync). Call after
        the step's last backward (and gradient all-reduce, if any) and before the optimizer step.
        Not with a loss scaler (--fp16): it finds the infinite gradients itself and shrinks the scale."""
        squares = [paddle.sum(paddle.square(p.grad.astype("float32"))) for p in parameters if p.grad is not None]
        if squares:
            self._nonfinite_grad = paddle.logical_not(paddle.isfinite(paddle.add_n(squares))).astype("float32").reshape([1])

    def finish_step(self, data_error: Optional[str] = None) -> StepVerdict:
        """Agree on the step across ranks; stop every rank (exit 1, one line) if it must not go on."""
        import paddle.distributed as dist

        nonfinite = self._nonfinite if self._nonfinite is not None else paddle.zeros([1], "float32")
        nonfinite_grad = self._nonfinite_grad if self._nonfinite_grad is not None else paddle.zeros([1], "float32")
        self._nonfinite, self._nonfinite_grad = None, None
        rank = max(0, dist.get_rank())
        # The data flag carries rank + 1, so after the max every rank knows which one to blame.
        local = paddle.to_tensor([float(self.preemption.requested), float(rank + 1) if data_error else 0.0], dtype="float32")
        flags = paddle.concat([nonfinite, nonfinite_grad, local])
        if dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, nonfinite_grad, preempt, dead_rank = flags.numpy().tolist()  # the one host sync of the step
        if dead_rank:
            raise SystemExit(f"error: {data_error}" if data_error else
                             f"error: rank {int(dead_rank) - 1}'s data stream stopped the run (its log says why); stopping every rank")
        verdict = StepVerdict(skip=nonfinite > 0 or nonfinite_grad > 0, preempt=preempt > 0,
                              reason="loss" if nonfinite > 0 else "gradients" if nonfinite_grad > 0 else "")
        self._count(verdict.skip)
        return verdict

    def _count(self, skipped: bool) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_nonfinite:
            # SystemExit prints the one-line message and exits 1, with no traceback to read past.
            raise SystemExit(
                f"error: {self.consecutive} optimizer steps in a row had a non-finite loss or gradient norm; stopping. The last checkpoint in "
                "--output_dir is intact: lower --learning_rate, set --max_grad_norm, or check the data, then re-run"
            )


def skip_warning(step: int, verdict: StepVerdict) -> str:
    """The warning for a skipped step (both loops)."""
    what = "non-finite loss" if verdict.reason == "loss" else "non-finite gradient norm (the loss was finite)"
    return f"step {step}: {what}, skipping this optimizer step (no update; a --save_steps checkpoint due now is not written)"
