"""`python -m ldm.report` (the name the README and SPEC give): runs ldm.data.report."""
import sys

from ldm.data.report import main

sys.exit(main())
