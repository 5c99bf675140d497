"""`python -m ldm.evaluate` (the name the README and SPEC give): runs ldm.evaluation.evaluate."""
import sys

from ldm.evaluation.evaluate import main

sys.exit(main())
