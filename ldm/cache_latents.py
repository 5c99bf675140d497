"""`python -m ldm.cache_latents` and `python -m paddle.distributed.launch ... ldm/cache_latents.py`
(the names the README and SPEC give; the launcher takes a script path): runs ldm.training.cache_latents."""
import os
import sys

if __package__ in (None, ""):
    # Run as a file: import the ldm package from the repository root instead of this directory's
    # modules as top-level ones.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from ldm.training.cache_latents import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
