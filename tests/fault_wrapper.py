"""Run a training script under a real fault, set up in this process before the script starts:

  FSIZE_LIMIT=N       RLIMIT_FSIZE of N bytes with SIGXFSZ ignored: every write past N bytes in
                      one file fails with EFBIG, exactly as on a filesystem that filled up;
  FSIZE_LIMIT_RANK=R  ... only on the rank whose PADDLE_TRAINER_ID is R (the others write freely);
  FORBID_PADDLE_LOAD=1  paddle.load raises: a resume that still works read no Paddle pickle.

Usage: python tests/fault_wrapper.py SCRIPT.py ARGS... (also as the script of paddle.distributed.launch).
"""
import os
import resource
import runpy
import signal
import sys

limit = os.environ.get("FSIZE_LIMIT")
rank = os.environ.get("FSIZE_LIMIT_RANK")
if limit and (rank is None or os.environ.get("PADDLE_TRAINER_ID", "0") == rank):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
if os.environ.get("FORBID_PADDLE_LOAD"):
    import paddle

    def forbidden(path, *args, **kwargs):
        raise RuntimeError(f"paddle.load({path!r}) called: a checkpoint file was unpickled")

    paddle.load = forbidden
    paddle.framework.io.load = forbidden

sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
