"""Only `python -m ldm.evaluate` (__main__.py); the module is ldm.evaluation.evaluate."""
