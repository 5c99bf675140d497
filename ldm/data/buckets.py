"""Aspect-ratio buckets (NovelAI's, kohya's, SDXL's last stage): batches of one size near the target area.

A centre crop to a square cuts a portrait's head or a landscape's horizon away, and then the
image no longer matches its caption. With buckets, each image is resized to cover the bucket
whose aspect ratio is nearest its own, the excess centre-cropped, and every batch holds images
of one bucket (so they stack), all of about --resolution^2 pixels (so the cost per step stays).

Exact resume with buckets: a worker reads records in the stream's order and puts each in its
bucket's queue; a queue that reaches the batch size is yielded as one batch. The records
waiting in the queues (the carry) were read but not yet trained on, so the position saved with
each batch is the stream's cursor *and* the carry, as (part, line, draw) references; a resumed
worker re-reads those lines and refills its queues before it reads on. Every usable record is
still yielded exactly once.
"""
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

Bucket = Tuple[int, int]  # (width, height) in pixels

# Bucket shapes go up to this aspect ratio when --max_aspect_ratio is unset (NovelAI's 1:2 - 2:1).
DEFAULT_MAX_RATIO = 2.0


def make_buckets(resolution: int, step: int, max_ratio: Optional[float] = None) -> List[Bucket]:
    """Sizes (w, h) with w and h multiples of `step`, w * h <= resolution^2 and as close to it as
    the step allows, aspect ratios up to `max_ratio`; the square (resolution, resolution) included.
    `step` is the autoencoder's factor times the UNet's downsampling (64 px for ldm_32l), so every
    bucket's latent passes through the UNet without padding."""
    max_ratio = max_ratio or DEFAULT_MAX_RATIO
    if resolution % step:
        raise ValueError(f"--resolution {resolution} is not a multiple of the bucket step {step} (autoencoder factor x UNet downsampling)")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= area // step:
        height = (area // width) // step * step
        if height >= step and max(width, height) <= max_ratio * min(width, height):
            buckets.add((width, height))
        width += step
    return sorted(buckets, key=lambda b: b[0] / b[1])


def choose_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (in log ratio: 1:2 and 2:1 are alike far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


class BucketBatcher:
    """Per-bucket queues of decoded samples; yields a batch when one holds `batch_size`."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.queues: Dict[Bucket, List[Tuple[dict, list]]] = {}
        self.order: List[Bucket] = []  # buckets in the order they were first used (a deterministic carry)

    def add(self, sample: dict, ref: list) -> Optional[List[dict]]:
        """Queue a sample (CHW pixels) with its reference [part, line, draw]; return a full batch or None."""
        _, h, w = sample["pixel_values"].shape
        bucket = (w, h)
        if bucket not in self.queues:
            self.queues[bucket] = []
            self.order.append(bucket)
        queue = self.queues[bucket]
        queue.append((sample, ref))
        if len(queue) < self.batch_size:
            return None
        self.queues[bucket] = []
        return [s for s, _ in queue]

    def carry(self) -> List[list]:
        """References of the samples waiting in the queues, in the order they will be re-added on resume."""
        return [ref for bucket in self.order for _, ref in self.queues.get(bucket, [])]


def stack(samples: List[dict]) -> dict:
    """One batch dict from same-bucket samples (arrays stacked; the bookkeeping string kept as a list)."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = values if isinstance(values[0], str) else np.stack(values)
    return batch
