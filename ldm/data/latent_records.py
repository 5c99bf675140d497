"""The cached-latent record format (written by ldm.cache_latents, read by the stream): column 4 of a
part line holds an autoencoder's posterior moments for the image, tagged with which autoencoder
and resolution made them.
"""
import base64
import binascii
from typing import Optional, Tuple

from dataclasses import dataclass

import numpy as np


# Which crop of the image the moments describe: the stream's (ldm.data.decode_image) shorter side
# resized to the resolution, then centre-cropped.
CROP = "centre"

def cache_prefix(fingerprint: str, resolution: int) -> str:
    """The start of column 4 for moments of this autoencoder at this resolution."""
    return f"{fingerprint}/{resolution}px-{CROP}/"


@dataclass(frozen=True)
class LatentCache:
    """What a training stream needs to read a cache: column 4's prefix and the moments' shape."""

    prefix: str
    shape: Tuple[int, int, int]  # [2C, h, w] (C for a VQModel)


def moments_column(prefix: str, moments: np.ndarray, size: Tuple[int, int]) -> str:
    """Column 4 for one image's moments ([2C, h, w]; stored as float16) and its source size (w, h)."""
    c, h, w = moments.shape
    return f"{prefix}{c}x{h}x{w}/{size[0]}x{size[1]}/{base64.b64encode(moments.astype('<f2').tobytes()).decode('ascii')}"


def read_moments(column: bytes, prefix: bytes) -> Optional[Tuple[np.ndarray, Tuple[int, int]]]:
    """(float16 moments, source (w, h)) of a column 4 written with `prefix`; None if it has another
    prefix (another autoencoder or resolution) or is damaged."""
    if not column.startswith(prefix):
        return None
    try:
        shape, size, data = column[len(prefix):].split(b"/", 2)
        c, h, w = (int(v) for v in shape.split(b"x"))
        width, height = (int(v) for v in size.split(b"x"))
        return np.frombuffer(binascii.a2b_base64(data, strict_mode=True), dtype="<f2").reshape(c, h, w), (width, height)
    except ValueError:  # binascii.Error is a ValueError; so are a bad shape and a wrong byte count
        return None


def cached_record(raw: bytes, prefix: bytes) -> Optional[Tuple[str, np.ndarray, Tuple[int, int]]]:
    """(caption, moments, source (w, h)) of a raw part line whose column 4 holds moments written
    with `prefix`; None otherwise (no column 4, another prefix, damaged)."""
    fields = raw.rstrip(b"\r\n").split(b"\t", 4)
    if len(fields) < 4:
        return None
    found = read_moments(fields[3], prefix)
    if found is None:
        return None
    try:
        return fields[0].decode("utf-8"), found[0], found[1]
    except UnicodeDecodeError:
        return None
