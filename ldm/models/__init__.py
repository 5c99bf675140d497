"""Models: the autoencoder, LDMBert + UNet (ldm.py), the recipe's math, the discriminator, FLOP counting. Imports only ldm.core; never ldm.data."""
