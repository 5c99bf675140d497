"""Only `python -m ldm.tokenizer` (__main__.py); the module is ldm.data.tokenizer."""
