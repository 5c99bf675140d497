"""`python -m ldm.sample_data` (the name the README and SPEC give): runs ldm.data.sample_data."""
from ldm.data.sample_data import main

main()
