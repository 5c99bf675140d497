"""Only `python -m ldm.launch` (__main__.py); the module is ldm.training.launch."""
