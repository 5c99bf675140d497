"""Checkpoints of the explicit training loop: one self-describing, step-numbered directory.

    checkpoint-N/
      model.safetensors          trainable weights (LDMBert + UNet); no pickled code to load
      ema.safetensors            EMA weights, with --use_ema
      optimizer.pdopt            AdamW moments (a Paddle pickle: Paddle has no safetensors
                                 format for optimizer state)
      scheduler.json             learning-rate scheduler state
      rng_state_rank{R}.pdparams Paddle, NumPy and Python RNG states of each rank (pickle)
      data_position_rank{R}.json where each rank's data workers stood (exact data resume)
      trainer_state.json         global step
      args.json                  the run's arguments
A checkpoint is written as `checkpoint-N.tmp` and renamed when complete, so a run cut off
mid-write leaves no `checkpoint-N` behind and is never resumed from.
"""
import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import paddle
import paddle.distributed as dist
from safetensors.numpy import load_file, save_file

from ldm.runtime import any_rank

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_complete(path: str) -> bool:
    """Both loops write these two files last (the Trainer's state, then our data position;
    or the data position, then trainer_state.json): a save cut off midway lacks one."""
    return all(os.path.isfile(os.path.join(path, f)) for f in ("trainer_state.json", "data_position_rank0.json"))


def complete_checkpoints(output_dir: str):
    """Complete checkpoint directories, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(d))]
    return [path for _, path in sorted(found) if is_complete(path)]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def rotate_checkpoints(output_dir: str, save_total_limit: Optional[int]) -> None:
    """Keep the newest `save_total_limit` complete checkpoints (call on rank 0, after a save completes)."""
    if save_total_limit and save_total_limit > 0:
        for old in complete_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def trainable_state(model) -> dict:
    """Weights that training changes (the frozen autoencoder is not checkpointed)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}


class CheckpointWriteError(RuntimeError):
    pass


def save_atomically(output_dir: str, step: int, write_files, save_total_limit=None) -> str:
    """The checkpoint protocol both loops share; every rank calls it.

      1. rank 0 makes `checkpoint-N.tmp`;
      2. every rank writes its own files into it: `write_files(tmp_dir, rank)`;
      3. rank 0 renames it to `checkpoint-N` (so a cut-off write is never resumed from) and
         rotates the oldest complete checkpoints out.
    Between the phases the ranks agree on whether any write failed (a one-number all-reduce in
    place of a barrier), so a full disk on rank 0 stops every rank with the message instead of
    leaving the others waiting at a barrier until the collective times out. A failed write
    leaves the previous checkpoints as they were and raises CheckpointWriteError (one line).
    """
    rank = max(0, dist.get_rank())
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"

    def phase(action):
        error = None
        try:
            action()
        except OSError as e:
            error = e
        if any_rank(error is not None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(output_dir)
            why = f"{error.strerror or error}" if error is not None else "another rank failed to write its files (its log says why)"
            raise CheckpointWriteError(
                f"could not write checkpoint-{step} in {output_dir}: {why}; the newest complete checkpoint is "
                f"{previous or 'none'} and is untouched. Free space or fix the directory, then re-run"
            )

    def make_dir():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)

    def publish():
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            rotate_checkpoints(output_dir, save_total_limit)

    phase(make_dir)
    phase(lambda: write_files(tmp, rank))
    phase(publish)
    return final


def save_checkpoint(output_dir, step, model, optimizer, lr_scheduler, data_progress: dict, args: dict, ema=None, scaler=None, save_total_limit=None):
    """The explicit loop's checkpoint-N (layout in the module docstring), written atomically."""

    def write_files(tmp, rank):
        if rank == 0:
            save_file({k: v.numpy() for k, v in trainable_state(model).items()}, os.path.join(tmp, "model.safetensors"))
            if ema is not None:
                save_file(ema.state_numpy(), os.path.join(tmp, "ema.safetensors"))
            paddle.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pdopt"))
            if scaler is not None:
                paddle.save(scaler.state_dict(), os.path.join(tmp, "scaler.pdparams"))
            with open(os.path.join(tmp, "scheduler.json"), "w") as f:
                json.dump(lr_scheduler.state_dict(), f)
            write_args(tmp, args)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"global_step": step}, f)
        paddle.save({"paddle": paddle.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                    os.path.join(tmp, f"rng_state_rank{rank}.pdparams"))
        with open(data_position_file(tmp, rank), "w") as f:
            json.dump(data_progress, f)

    return save_atomically(output_dir, step, write_files, save_total_limit)


def write_args(checkpoint_dir: str, args: dict) -> None:
    """args.json: every model, data and loop argument of the run (generate.py rebuilds the model from it)."""
    with open(os.path.join(checkpoint_dir, "args.json"), "w") as f:
        json.dump(args, f, indent=1, default=str)


def check_state_shapes(model, state: dict, source: str) -> None:
    """Stop at start-up, naming the tensor, when a saved weight does not fit the model (instead of
    paddle's warning, after which training would go on with the fresh weight)."""
    own = model.state_dict()
    for name, value in state.items():
        if name in own and tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(f"{source}: weight {name} has shape {list(value.shape)} but the model's is {list(own[name].shape)}; "
                             "resume with the same model config (or start a new --output_dir)")


def load_checkpoint(path, model, optimizer, lr_scheduler, ema=None, scaler=None) -> int:
    """Restore everything but the data position (the stream restores that); return the step."""
    rank = max(0, dist.get_rank())
    weights = load_file(os.path.join(path, "model.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} weights (e.g. {sorted(missing)[0]}); it belongs to a different model")
    check_state_shapes(model, weights, f"checkpoint {path}")
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights.items()})
    optimizer.set_state_dict(paddle.load(os.path.join(path, "optimizer.pdopt")))
    with open(os.path.join(path, "scheduler.json")) as f:
        lr_scheduler.set_state_dict(json.load(f))
    if ema is not None and os.path.isfile(os.path.join(path, "ema.safetensors")):
        ema.load_numpy(load_file(os.path.join(path, "ema.safetensors")))
    if scaler is not None and os.path.isfile(os.path.join(path, "scaler.pdparams")):
        scaler.load_state_dict(paddle.load(os.path.join(path, "scaler.pdparams")))
    rng_file = os.path.join(path, f"rng_state_rank{rank}.pdparams")
    if os.path.isfile(rng_file):
        rng = paddle.load(rng_file, return_numpy=True)
        paddle.set_rng_state(rng["paddle"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return int(json.load(f)["global_step"])


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

    from ldm.data import fingerprint_changes, order_fingerprint

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
    from ldm.data import CURSOR_FIELDS

    highest = 0
    for name in os.listdir(checkpoint_dir):
        if re.match(r"^data_position_rank\d+\.json$", name):
            with open(os.path.join(checkpoint_dir, name)) as f:
                saved = json.load(f)
            highest = max([highest, int(saved.get("first_pass", 0))] + [int(p) for p in saved.get("elastic", {}).get("max_pass", [])] +
                          [int(p) for w in saved["workers"].values() for p in w["position"][1::CURSOR_FIELDS]])
    return highest
