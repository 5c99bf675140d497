"""Only `python -m ldm.prepare` (__main__.py); the module is ldm.data.prepare."""
