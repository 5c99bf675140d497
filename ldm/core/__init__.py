"""The lowest layer: helpers every other layer may use (safe loading of weight files, the RNG guard); imports nothing of ldm."""
