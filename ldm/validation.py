"""What the training scripts look at besides the training loss: a fixed batch for the logged images.

The images logged at --image_logging_steps are always made from the same inputs (the first
records of the data, read once at start-up, never caption-dropped; or --validation_prompts)
and the same noise, so one cell of the grid can be compared across steps and across runs.
"""
import itertools
from typing import List, Optional

import numpy as np


def fixed_log_batch(file_list: str, resolution: int, count: int = 8, tokenizer=None, max_length: int = 77,
                    prompts: Optional[List[str]] = None, seed: int = 0) -> Optional[dict]:
    """The first `count` readable records of the data (rank 0's first pass, whatever the world
    size), as a batch {"pixel_values", "input_ids"?}; `prompts` replace their captions.
    None if the data has no readable record (the training stream then stops with the reason)."""
    import paddle

    from ldm.data import TextImageStream

    stream = TextImageStream(file_list, resolution, seed=seed, rank=0, world_size=1)
    records = list(itertools.islice(stream.records(stream.shard_stream(0, 1)), count))
    if not records:
        return None
    batch = {"pixel_values": paddle.to_tensor(np.stack([r["pixel_values"] for r in records]))}
    if tokenizer is not None:
        from ldm.tokenizer import CaptionEncoder

        captions = list(prompts) if prompts else [r["caption"] for r in records]
        encode = CaptionEncoder(tokenizer, max_length)
        batch["input_ids"] = paddle.to_tensor(np.stack([encode(c) for c in captions]))
    return batch
