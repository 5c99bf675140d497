"""Only `python -m ldm.split` (__main__.py); the module is ldm.data.split."""
