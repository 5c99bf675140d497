"""Only `python -m ldm.report` (__main__.py); the module is ldm.data.report."""
