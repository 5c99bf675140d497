"""`python -m ldm.export` (the name the README and SPEC give): runs ldm.evaluation.export."""
import sys

from ldm.evaluation.export import main

sys.exit(main())
