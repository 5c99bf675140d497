"""Evaluation: loading a trained model, sampling and generating, FID and Inception, export and the model card. The top layer of ldm/."""
