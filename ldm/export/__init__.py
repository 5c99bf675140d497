"""Only `python -m ldm.export` (__main__.py); the module is ldm.evaluation.export."""
