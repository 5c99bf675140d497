"""`python -m ldm.launch ARGS...`: `python -m paddle.distributed.launch ARGS...` (same arguments,
same logs), except that SIGTERM to the launcher is a preemption notice, not a kill.

What Paddle's launcher (3.0) does on SIGTERM (paddle/distributed/launch/controllers/controller.py
`signal_handler`, job/pod.py `stop`, utils/process_context.py `terminate`): it sends SIGTERM to
each rank's process group (three times, 0.2 s apart), waits up to 30 s for each rank, SIGKILLs
the ones still running, and exits with status 15 whatever the ranks did. So a rank whose step and
checkpoint take longer than 30 s is killed mid-save, and a clean preemption still looks like a
failure to the scheduler (no automatic requeue on exit 0 policies, a red job in the dashboard).

Here SIGTERM is passed on once to each rank (the training scripts finish the step, save, log
`Preempted: saved checkpoint-N` and exit 0; their data workers ignore SIGTERM) and the launcher
goes on watching, with no deadline of its own: the scheduler's own grace (SLURM KillWait,
Kubernetes terminationGracePeriodSeconds) bounds the wait. It then exits as the ranks did: 0
when every rank saved. A second SIGTERM, or SIGINT (Ctrl-C), gets Paddle's own handling (SIGKILL
after 30 s, exit 15).
"""
import signal
import sys


def forward_sigterm_to_ranks(controller):
    """Replace the launcher's SIGTERM handler: pass the signal on to the ranks and keep watching."""
    stock_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        controller.ctx.logger.info("SIGTERM: passed on to every rank, which saves a checkpoint and exits; waiting for them "
                                   "(a second SIGTERM: SIGKILL after 30 s)")
        for container in controller.pod.containers:
            process = container._proc._proc if container._proc is not None else None  # paddle 3.0: Container -> ProcessContext -> Popen
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)  # the rank alone: its data workers are its business
        signal.signal(signal.SIGTERM, stock_handler)

    signal.signal(signal.SIGTERM, on_sigterm)


def main():
    from paddle.distributed.launch import main as paddle_launch
    from paddle.distributed.launch import controllers
    from paddle.distributed.launch.context import Context

    ctx = Context()
    if ctx.is_legacy_mode() or ctx.is_auto_tuner_mode():
        sys.exit("error: ldm.launch runs the collective launcher only; use python -m paddle.distributed.launch for these arguments")
    paddle_launch.ctx = ctx  # (as paddle's own launch() sets it)
    controller = controllers.init(ctx)
    forward_sigterm_to_ranks(controller)
    controller.run()  # deploy the ranks and watch them until they end
    controller.finalize()  # exits with the first non-zero exit code of the ranks, else 0


if __name__ == "__main__":
    main()
