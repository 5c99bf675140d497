"""What the training process knows of its data workers: each worker's position and skips
(StreamProgress, from the bookkeeping every sample carries), the workers' start and end, and
the stream as a paddle dataset.
"""
import json
import os
import sys
import time
import traceback
from typing import Dict, Optional

import numpy as np

from ldm.data.records import SKIP_REASONS, explain_barren, skips_from_vector
from ldm.data.shards import CURSOR_FIELDS, TAIL_PASS
from ldm.data.stream import TextImageStream, current_rank_and_world


class StreamProgress:
    """Where each dataloader worker's stream stood after the last consumed sample, and its skips.

    Filled from the bookkeeping each sample carries (ldm.data.TextImageStream); saved with
    every checkpoint so a resumed run reads exactly the records the uninterrupted run would.
    `fatal` is None, or the one-line reason this rank's data cannot go on (a barren shard).
    """

    def __init__(self, world_size: int, num_workers: int, resumed: Optional[dict] = None, resolution: Optional[int] = None,
                 stream: Optional["TextImageStream"] = None):
        self.world_size = world_size
        # From the stream: what a resume checks the order against (TextImageStream.fingerprint), and
        # the pass a worker that has not yielded yet starts at (TextImageStream.start_new_pass).
        self.fingerprint = stream.fingerprint() if stream is not None else None
        self.first_pass = stream.first_pass if stream is not None else 0
        self.num_workers = max(1, num_workers)
        self.resolution = resolution
        self.batches = 0
        self.workers: Dict[int, dict] = {}
        self.fatal: Optional[str] = None
        self.elastic = None  # the old shards' passes still to finish after a layout change (TextImageStream.relayout)
        if resumed:
            self.batches = int(resumed["batches"])
            self.workers = {int(w): v for w, v in resumed["workers"].items()}
            self.elastic = resumed.get("elastic")

    def update(self, batch: dict) -> None:
        """Take the stream's bookkeeping out of a collated batch (so the model never sees it)."""
        self.batches += 1
        states = batch.pop(BOOKKEEPING_KEY)  # host strings: no device read (pack_bookkeeping)
        for state in (json.loads(s) for s in ([states] if isinstance(states, str) else states)):  # (a bucketed batch has one)
            # Within a batch and across batches a worker's position only grows; keep the last.
            self.workers[int(state["worker"])] = {"position": state["position"], "skips": state["skips"]}
            if "carry" in state:
                self.workers[int(state["worker"])]["carry"] = state["carry"]
            if state["data_error"] and self.fatal is None:
                # A sentinel's pixels are resolution x resolution, which names the flag in the message.
                resolution = self.resolution or (int(batch["pixel_values"].shape[-1]) if "pixel_values" in batch else None)
                self.fatal = (f"nothing to train on: data worker {state['worker']} of rank {max(0, current_rank_and_world()[0])} found no usable "
                              f"record in its share of --file_list: {explain_barren(skips_from_vector(state['skips']), resolution)}")

    def state_dict(self) -> dict:
        state = {"world_size": self.world_size, "num_workers": self.num_workers, "batches": self.batches,
                 "workers": {str(w): v for w, v in sorted(self.workers.items())}}
        if self.fingerprint is not None:
            state["data_order"] = self.fingerprint
        if self.first_pass:
            state["first_pass"] = self.first_pass
        if self.elastic and any(p == TAIL_PASS for v in self.workers.values() for p in v["position"][1::CURSOR_FIELDS]):
            state["elastic"] = self.elastic  # dropped once every worker of this rank has finished its old shards' passes
        return state

    def skip_totals(self) -> Dict[str, int]:
        """Skip counts summed over this rank's workers and then over all ranks."""
        import paddle
        import paddle.distributed as dist

        local = np.zeros(len(SKIP_REASONS), "int64")
        for v in self.workers.values():
            saved = np.asarray(v["skips"], dtype="int64")[: len(SKIP_REASONS)]
            local[: len(saved)] += saved  # a checkpoint from before newer reasons has a shorter vector
        total = paddle.to_tensor(local)
        if dist.get_world_size() > 1:
            dist.all_reduce(total)
        return {f"skipped_{r}": int(v) for r, v in zip(SKIP_REASONS, total.numpy())}


# The stream's per-sample bookkeeping leaves the worker as one JSON string: paddle's DataLoader
# keeps strings on the host, while arrays become tensors (on a GPU, copied to the device), and
# reading those back every micro-batch would be a host sync each time.
BOOKKEEPING_KEY = "stream_state"
BOOKKEEPING_FIELDS = ("skips", "worker", "position", "data_error")


def pack_bookkeeping(sample: dict) -> dict:
    state = {k: np.asarray(sample.pop(k)).tolist() for k in BOOKKEEPING_FIELDS}
    if "carry" in sample:  # a bucketed batch (ldm.buckets): the records waiting in its worker's queues
        state["carry"] = sample.pop("carry")
    sample[BOOKKEEPING_KEY] = json.dumps(state, separators=(",", ":"))
    return sample


def init_worker(worker_id: int) -> None:
    """`worker_init_fn` of the training DataLoaders: SIGTERM from outside is ignored; one intra-op thread.

    SIGTERM first: schedulers (SLURM, Kubernetes) and paddle.distributed.launch send it to the
    whole process group, workers included, and a worker killed by it makes Paddle's SIGCHLD
    handler raise `SystemError: DataLoader process ... is killed by signal: Terminated` in the
    training process mid-step, before it can save. So only the training process decides
    (ldm.runtime.Preemption: finish the step, save, exit 0); see `_sigterm_only_from_parent`.
    Threads: a worker runs Pillow and numpy, not Paddle kernels; the thread pool it inherits from
    the training process (ldm.runtime.set_cpu_threads) would only contend for its cores."""
    _sigterm_only_from_parent()
    import paddle

    paddle.base.core.set_num_threads(1)


def _sigterm_only_from_parent() -> None:
    """In a data worker: ignore SIGTERM; the training process ends its workers with SIGINT at exit.

    Ignoring SIGTERM alone would hang a finished run: at exit, Python's multiprocessing ends the
    daemonic workers still running with SIGTERM and then waits for them (seen with the Trainer
    script, whose DataLoader iterator outlives train()). So the training process, before that,
    sends them SIGINT (`end_workers_at_exit`), which Paddle's worker loop takes as its cue to
    clean up its shared memory and return. (Reading the sender of each SIGTERM with sigwaitinfo
    cannot work: Paddle starts a thread in the worker before this runs, and a signal that thread
    does not block is delivered to it.) SIGKILL still ends a worker.
    When the training process dies without that (SIGKILL, e.g. the launcher's after its grace),
    Paddle's ParentWatchDog is not enough: a worker blocked writing a batch nobody reads stays
    forever (seen), where before the scheduler's SIGTERM would have ended it. So on Linux the
    kernel is asked to SIGKILL the worker when its parent dies (prctl PR_SET_PDEATHSIG).
    """
    import ctypes
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() == 1:  # the parent died before the request took effect
            os._exit(1)


# How long the training process waits at exit for its data workers to take their SIGINT.
WORKER_EXIT_GRACE_S = 5.0


def end_workers_at_exit() -> None:
    """In the training process: at exit, end the data workers still running with SIGINT (see
    `_sigterm_only_from_parent`). atexit runs the newest registration first, so this runs before
    multiprocessing's own exit hook, which then only waits for them."""
    import atexit
    import multiprocessing
    import signal

    def end_workers():
        workers = [w for w in multiprocessing.active_children() if w.daemon]
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
        # Python runs a signal's handler in the main thread, but the kernel may hand the signal to
        # another of the worker's threads (Paddle's or the queue feeder): its main thread then stays
        # blocked reading the index queue and never sees it (seen: a finished 2-rank run hung at exit).
        # So a worker still alive after a grace period is killed; its work is over anyway.
        deadline = time.monotonic() + WORKER_EXIT_GRACE_S
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGKILL)
                worker.join()

    atexit.register(end_workers)


def as_paddle_dataset(stream: TextImageStream):
    """Wrap as a paddle.io.IterableDataset (kept apart so this module imports without paddle)."""
    from paddle.io import IterableDataset

    class _Dataset(IterableDataset):
        def __init__(self):
            super().__init__()
            self.stream = stream

        def __iter__(self):
            try:
                for sample in self.stream:
                    yield pack_bookkeeping(sample)
            except Exception:
                # Paddle's single-process DataLoader runs this in a thread and waits forever
                # if it dies; a bug here must end the run loudly instead of hanging it.
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)

    return _Dataset()
