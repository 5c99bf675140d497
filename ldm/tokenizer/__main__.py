"""`python -m ldm.tokenizer` (the name the README and SPEC give): runs ldm.data.tokenizer."""
import sys

from ldm.data.tokenizer import main

sys.exit(main())
