"""The RNG state around a block that must not move it."""
import contextlib

import paddle


@contextlib.contextmanager
def preserved_rng():
    """Run a block (image logging, evaluation) without touching the training RNG.

    ppdiffusers' `paddle.Generator().manual_seed` calls `paddle.seed`, which reseeds the global
    CPU generator (and, on a GPU, restores only the CUDA one): without this, noise and timesteps
    would repeat every --image_logging_steps on a CPU build.
    """
    cpu = paddle.get_rng_state()
    cuda = paddle.get_cuda_rng_state() if paddle.is_compiled_with_cuda() else None
    try:
        yield
    finally:
        paddle.set_rng_state(cpu)
        if cuda is not None:
            paddle.set_cuda_rng_state(cuda)
