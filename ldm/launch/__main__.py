"""`python -m ldm.launch` (the name the README and SPEC give): runs ldm.training.launch."""
from ldm.training.launch import main

main()
