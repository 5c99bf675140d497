"""Only `python -m ldm.sample_data` (__main__.py); the module is ldm.data.sample_data."""
