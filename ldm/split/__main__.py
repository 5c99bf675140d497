"""`python -m ldm.split` (the name the README and SPEC give): runs ldm.data.split."""
import sys

from ldm.data.split import main

sys.exit(main())
