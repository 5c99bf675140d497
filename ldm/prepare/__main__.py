"""`python -m ldm.prepare` (the name the README and SPEC give): runs ldm.data.prepare."""
import sys

from ldm.data.prepare import main

sys.exit(main())
