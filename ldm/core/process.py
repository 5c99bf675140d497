"""Process-wide settings every entry point makes once, before its work."""
import gc


def leave_imports_out_of_gc() -> None:
    """Keep what is alive now (the imported libraries: paddle, paddlenlp, ppdiffusers and theirs,
    ~400k objects) out of the garbage collector's later full collections.

    A full collection walks every tracked object (~0.2-0.3 s a time here), and they come often at
    start-up: Python's own thresholds, ppdiffusers' `from_pretrained` after each model it loads,
    Paddle's SOT translator after each frame it translates (~100 in the first `--to_static` step:
    23 s of 40 s there). Frozen objects are never freed, which is right for modules that live as
    long as the process; everything made afterwards (models, batches, the step's tensors) is
    collected as before."""
    gc.freeze()
