"""Where the data stream stood at a checkpoint (one file per rank), and putting a resumed stream
back there: the same records in the same order, on the same or another number of ranks and workers
(SPEC section 5); a changed data order stops the run at start-up naming the setting."""
import json
import os
import re
from typing import Optional


def data_position_file(checkpoint_dir: str, rank: int) -> str:
    return os.path.join(checkpoint_dir, f"data_position_rank{rank}.json")


def data_position_to_resume(checkpoint_dir: str, rank: int, resolution: int, ignore_data_skip: bool, buckets: bool = False) -> Optional[dict]:
    """The data position saved in a checkpoint, unless this run starts a new pass of the data:
    with --ignore_data_skip, or at a new --resolution (a resolution stage, e.g. 256 px then 512 px:
    model, optimizer, EMA and step carry on, the data is read afresh at the new size), or when
    --aspect_ratio_buckets was switched (a bucketed position also holds the records in the queues)."""
    from paddlenlp.utils.log import logger

    if ignore_data_skip:
        logger.info("--ignore_data_skip: the data stream starts a new pass")
        return None
    args_file = os.path.join(checkpoint_dir, "args.json")
    if os.path.isfile(args_file):
        with open(args_file) as f:
            saved_args = json.load(f)
        saved = saved_args.get("resolution")
        if saved is not None and int(saved) != resolution:
            logger.info(f"New resolution stage: {checkpoint_dir} was trained at --resolution {saved}, this run trains at {resolution}; "
                        "model, optimizer, EMA and step continue, the data stream starts a new pass")
            return None
        if bool(saved_args.get("aspect_ratio_buckets", False)) != buckets:
            logger.info(f"--aspect_ratio_buckets is {'on' if buckets else 'off'} now, unlike in {checkpoint_dir}: the data stream starts a new pass")
            return None
    return load_data_position(checkpoint_dir, rank)


def load_data_position(checkpoint_dir: str, rank: int) -> Optional[dict]:
    path = data_position_file(checkpoint_dir, rank)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def saved_data_order(checkpoint_dir: str) -> Optional[dict]:
    """The data-order fingerprint saved with a checkpoint (rank 0's, which names every part: every
    rank checks against the same one, so all ranks stop or go on together); None before fingerprints."""
    saved = load_data_position(checkpoint_dir, 0)
    return saved.get("data_order") if saved else None


def resume_data_stream(stream, checkpoint_dir: str, rank: int, num_workers: int, ignore_data_skip: bool) -> Optional[dict]:
    """Resume `stream` (ldm.data.TextImageStream) at the data position saved in `checkpoint_dir`
    and return that position (StreamProgress starts from it); or None when this run starts a new
    pass (see data_position_to_resume). A saved position only means the same records under the
    same order: a changed --seed, --shuffle_buffer, --parts_per_window, bucket set or file list
    would re-read up to a pass of records or skip them without a word, so it stops the run here
    (ValueError, one line naming what changed and what to do)."""
    from paddlenlp.utils.log import logger

    from ldm.data.filelists import fingerprint_changes, order_fingerprint

    saved_order = saved_data_order(checkpoint_dir)
    # Compared with the full listing on every rank, so each names the same parts.
    changes = fingerprint_changes(saved_order, order_fingerprint(stream.entries, stream.order_settings(), listing=True)) if saved_order else []
    # Rank 0's file decides for every rank (this rank may not have existed in the checkpoint's layout).
    saved = data_position_to_resume(checkpoint_dir, 0, stream.resolution, ignore_data_skip, bool(stream.buckets))
    if saved is not None and rank > 0:
        saved = load_data_position(checkpoint_dir, rank) or {"world_size": saved["world_size"], "num_workers": saved["num_workers"], "batches": 0, "workers": {}}
    if saved is None:
        # A new pass is a new order: it follows the highest pass any worker of the checkpoint reached.
        stream.start_new_pass(highest_saved_pass(checkpoint_dir) + 1)
        logger.info(f"The data stream starts pass {stream.first_pass}" + (f", with changed settings: {'; '.join(changes)}" if changes else ""))
        return None
    if saved_order is None:
        logger.warning(f"{checkpoint_dir} has no data-order fingerprint (written before they were saved): its data position is resumed "
                       "without checking that --seed, --shuffle_buffer, --parts_per_window and the file lists are unchanged")
    elif changes:
        raise ValueError(f"the data order changed since {checkpoint_dir}: {'; '.join(changes)}. Resuming its data position now would re-read "
                         "or skip records of the current pass. Put the setting back, or pass --ignore_data_skip to start a new pass with "
                         "the new settings (model, optimizer and step kept), or use a new --output_dir")
    if saved["world_size"] != stream.world_size or saved["num_workers"] != max(1, num_workers):
        # Elastic resume: every old rank's position is needed to carry this rank's over.
        old_ranks = [load_data_position(checkpoint_dir, r) for r in range(int(saved["world_size"]))]
        if any(r is None for r in old_ranks):
            raise ValueError(f"{checkpoint_dir} lacks the data position of rank {old_ranks.index(None)}, needed to resume on another number of "
                             "processes or workers; resume on the checkpoint's, or pass --ignore_data_skip to start a new pass")
        stream.resume(saved, num_workers, old_ranks)
        return stream.resume_state
    stream.resume(saved, num_workers)
    return saved


def highest_saved_pass(checkpoint_dir: str) -> int:
    """The highest pass of any filelist any worker of any rank had reached in a checkpoint."""
    from ldm.data.shards import CURSOR_FIELDS

    highest = 0
    for name in os.listdir(checkpoint_dir):
        if re.match(r"^data_position_rank\d+\.json$", name):
            with open(os.path.join(checkpoint_dir, name)) as f:
                saved = json.load(f)
            highest = max([highest, int(saved.get("first_pass", 0))] + [int(p) for p in saved.get("elastic", {}).get("max_pass", [])] +
                          [int(p) for w in saved["workers"].values() for p in w["position"][1::CURSOR_FIELDS]])
    return highest
