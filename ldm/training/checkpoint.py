"""Checkpoints: one self-describing, step-numbered directory that loads without pickle and that
a resume can check before trusting it.

    checkpoint-N/
      model.safetensors          trainable weights (LDMBert + UNet; stage 1: autoencoder + discriminator)
      ema.safetensors            EMA weights, with --use_ema
      optimizer.safetensors      AdamW moments, beta powers, master weights (O2): the tensors of
      optimizer.json               optimizer.state_dict(), and the rest of it (LR-scheduler entry, names)
                                 (--sharding stage1: optimizer.shardNN.{safetensors,json} from each shard's rank)
      scheduler.json             learning-rate scheduler state
      scaler.json                loss-scaler state, with --fp16
      rng_state_rank{R}.json     Python, NumPy and Paddle RNG states of each rank
      data_position_rank{R}.json where each rank's data workers stood (exact data resume)
      trainer_state.json         global step (the Trainer's TrainerState in the Trainer script)
      args.json                  the run's arguments
      manifest.json              every file above with its size and CRC32C; written last
Both training scripts (and train_vae.py) write this layout (ldm.checkpoint_io does the file formats).

Trust: the files are written to `checkpoint-N.tmp` (each to a temporary name, fsynced, renamed,
the directory fsynced), then rank 0 writes manifest.json after every rank reported its files and
renames the directory to `checkpoint-N`. A checkpoint counts only if its manifest checks out, so a
save cut off at any moment, a truncated or deleted file or a flipped bit is never resumed from:
the resume takes the newest good one and warns about each newer one it skipped.

Old checkpoints (before this layout: pickled optimizer.pdopt, rng_state*.pth/.pdparams,
model_state.pdparams, no manifest) are recognised and resume only with --trust_pickle.
"""
import json
import os
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist

from ldm.training.checkpoint_io import (WriteFailed, decode, describe, encode, file_crc32c, fsync_dir, read_state, rng_from_json, rng_to_json,
                                        safetensors_header_error, write_json, write_safetensors, write_state)
from ldm.training.data_position import data_position_file
from ldm.training.runtime import any_rank
from ldm.core.files import read_json
from ldm.core.safeload import load_pickle, refuse

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
# What checkpoints written before manifest.json held as Paddle pickles (both scripts, and the stock Trainer's names).
LEGACY_PICKLE_RE = re.compile(r"^(model_state\.pdparams|optimizer(\.[\w]+)?\.pdopt|scheduler\.pdparams|scaler\.pdparams|"
                              r"rng_state(_\d+)?\.pth|rng_state_rank\d+\.pdparams|training_args\.bin)$")


# -- which checkpoints can be trusted ----------------------------------------------------------

def checkpoint_dirs(output_dir: str) -> List[str]:
    """Every `checkpoint-N` directory in `output_dir`, oldest step first (good or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, d)) for d in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(d))]
    return [path for _, path in sorted(found) if os.path.isdir(path)]


def legacy_pickles(path: str) -> List[str]:
    """The pickled files of a checkpoint written before manifest.json existed ([] for a current one)."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return []
    return sorted(f for f in os.listdir(path) if LEGACY_PICKLE_RE.match(f))


def checkpoint_problem(path: str, checksums: bool = True) -> Optional[str]:
    """Why `path` must not be resumed from, or None if it is complete.

    Checks the manifest's every file: present, of the recorded size, a well-formed safetensors
    header where it is one and, with `checksums`, its CRC32C (reads every byte: ~23 GB for
    ldm_32l, README "Checkpoints"). An old checkpoint (no manifest, pickled files) is complete by
    the old rule: it has both of the files its save wrote last."""
    if legacy_pickles(path):
        ok = all(os.path.isfile(os.path.join(path, f)) for f in ("trainer_state.json", "data_position_rank0.json"))
        return None if ok else "an old-format checkpoint cut off mid-write (no trainer_state.json or data_position_rank0.json)"
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        return f"no {MANIFEST} (its save never finished)"
    try:
        with open(manifest_file) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in sorted(files.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        size = os.path.getsize(file)
        if size != entry["size"]:
            return f"{name} is {size} bytes, its manifest says {entry['size']} (truncated or overwritten)"
        if name.endswith(".safetensors") and (why := safetensors_header_error(file)):
            return f"{name}: {why}"
    if checksums:
        for name, entry in sorted(files.items()):
            if file_crc32c(os.path.join(path, name)) != entry["crc32c"]:
                return f"{name} fails its CRC32C checksum (corrupted)"
    return None


def is_complete(path: str) -> bool:
    """Cheap completeness (sizes and headers, no checksums): for rotation and listings."""
    return checkpoint_problem(path, checksums=False) is None


def complete_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoint directories (by `is_complete`), oldest first."""
    return [path for path in checkpoint_dirs(output_dir) if is_complete(path)]


def _rank0_decides(value: int) -> int:
    """Rank 0's `value` on every rank (a broadcast when distributed), so every rank resumes from the
    same checkpoint and only rank 0 reads a whole checkpoint to check it (not 32 ranks x 23 GB)."""
    if dist.get_world_size() <= 1 or not dist.is_initialized():
        return value
    tensor = paddle.to_tensor([value], dtype="int64")
    dist.broadcast(tensor, src=0)
    return int(tensor.numpy()[0])


_verified = set()  # checkpoints this process has checked in full (so the resume does not checksum them twice)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest checkpoint in `output_dir` that checks out in full, decided by rank 0; each newer
    one that fails is skipped with one warning naming it and why."""
    from paddlenlp.utils.log import logger

    candidates = checkpoint_dirs(output_dir)
    chosen = -1
    if max(0, dist.get_rank()) == 0:
        for i in reversed(range(len(candidates))):
            problem = checkpoint_problem(candidates[i])
            if problem is None:
                chosen = i
                break
            logger.warning(f"Skipping {candidates[i]}: {problem}; trying the checkpoint before it")
    chosen = _rank0_decides(chosen)
    if chosen < 0:
        return None
    _verified.add(os.path.abspath(candidates[chosen]))
    return candidates[chosen]


def checkpoint_to_resume(training_args) -> Optional[str]:
    """--resume_from_checkpoint if given; else, unless --overwrite_output_dir, the newest
    complete `checkpoint-N` in --output_dir, so re-running the same command continues the run.

    Resuming an older checkpoint is a rollback: the later checkpoints in --output_dir belong to the
    abandoned branch, and left in place the next plain re-run would resume them, not the new
    branch. They are moved aside (`move_abandoned_checkpoints`), never deleted."""
    from paddlenlp.utils.log import logger

    resume = training_args.resume_from_checkpoint
    if resume is None and not training_args.overwrite_output_dir:
        resume = latest_checkpoint(training_args.output_dir)
    if resume:
        if not os.path.isdir(resume):
            raise ValueError(f"--resume_from_checkpoint {resume!r} is not a directory")
        if training_args.resume_from_checkpoint is not None:
            move_abandoned_checkpoints(training_args.output_dir, resume)
        logger.info(f"Resuming from {resume}")
    return resume


def move_abandoned_checkpoints(output_dir: str, resume: str) -> list:
    """Move the checkpoints of `output_dir` later than `resume` to `output_dir/abandoned/checkpoint-N-<UTC time>`.

    Rank 0 moves; the other ranks wait for it in a one-number all-reduce (which also tells them
    whether it failed), so every rank then sees the same checkpoints. Returns the new paths.
    """
    import time

    import paddle.distributed as dist
    from paddlenlp.utils.log import logger

    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(resume)))
    if match is None:
        raise ValueError(f"--resume_from_checkpoint {resume!r} is not named checkpoint-N; cannot tell which checkpoints come after it")
    step = int(match.group(1))
    moved, error = [], None
    if max(0, dist.get_rank()) == 0:
        when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        later = [path for path in complete_checkpoints(output_dir) if int(CHECKPOINT_RE.match(os.path.basename(path)).group(1)) > step]
        try:
            for path in later:
                target = os.path.join(output_dir, "abandoned", f"{os.path.basename(path)}-{when}")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(path, target)
                moved.append(target)
        except OSError as e:
            error = e
        if moved:
            logger.info(f"Rolled back to {os.path.basename(os.path.normpath(resume))}: moved {len(moved)} later checkpoint(s) of the "
                        f"abandoned branch to {os.path.join(output_dir, 'abandoned')} ({', '.join(os.path.basename(m) for m in moved)})")
    if any_rank(error is not None):
        raise ValueError(f"could not move the checkpoints after {resume} aside in {output_dir}: "
                         f"{error.strerror if error is not None else 'rank 0 failed (its log says why)'}; fix the directory and re-run")
    return moved


def require_good_checkpoint(path: str, trust_pickle: bool) -> None:
    """Stop (ValueError, one line) before loading anything from `path` if it fails its manifest
    (rank 0 checksums it, every rank checks sizes and headers) or is an old pickled checkpoint
    and --trust_pickle was not given."""
    pickles = legacy_pickles(path)
    if pickles and not trust_pickle:
        raise refuse(os.path.join(path, pickles[0]), "an old-format checkpoint's Paddle pickle")
    if os.path.abspath(path) in _verified:
        return
    problem = checkpoint_problem(path, checksums=max(0, dist.get_rank()) == 0)
    if any_rank(problem is not None) if dist.is_initialized() else problem is not None:
        raise ValueError(f"checkpoint {path} cannot be resumed from: {problem or 'it fails its manifest on rank 0 (its log says why)'}; "
                         "pass an older checkpoint to --resume_from_checkpoint, or none to take the newest good one")
    _verified.add(os.path.abspath(path))


def rotate_checkpoints(output_dir: str, save_total_limit: Optional[int]) -> None:
    """Keep the newest `save_total_limit` complete checkpoints and delete everything older (call on
    rank 0 after a save completed). A broken checkpoint newer than the kept ones is left alone, and
    never counts towards the limit: it cannot push a good one out."""
    if not save_total_limit or save_total_limit <= 0:
        return
    done = complete_checkpoints(output_dir)
    if len(done) <= save_total_limit:
        return
    oldest_kept = done[-save_total_limit]
    for path in checkpoint_dirs(output_dir):
        if path == oldest_kept:
            break
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_staging(output_dir: str) -> None:
    """Delete `checkpoint-N.tmp` directories a killed save left behind (saves run one at a time, so
    after a save completed none is in flight); at ldm_32l's size each one is ~23 GB of disk."""
    for name in os.listdir(output_dir):
        if name.endswith(".tmp") and CHECKPOINT_RE.match(name[: -len(".tmp")]):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# -- writing -----------------------------------------------------------------------------------

def trainable_state(model) -> dict:
    """Weights that training changes (the frozen autoencoder is not checkpointed)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}


def checkpoint_weights(model) -> dict:
    """What model.safetensors holds: the state of every top-level sublayer that is not frozen whole.
    For the LDM that is exactly `trainable_state` (the frozen autoencoder is left out); for stage 1's
    autoencoder-plus-discriminator it is everything."""
    frozen = [name + "." for name, layer in model.named_children()
              if (params := layer.parameters()) and all(p.stop_gradient for p in params)]
    return {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(frozen))}


def nonfinite_weight(tensors: Dict[str, paddle.Tensor]) -> Optional[str]:
    """The name of a weight holding NaN or inf, or None. One host read for all of them."""
    names = [n for n, t in tensors.items() if paddle.is_floating_point(t)]
    if not names:
        return None
    finite = paddle.stack([paddle.isfinite(tensors[n]).all() for n in names]).numpy()
    bad = [n for n, ok in zip(names, finite) if not ok]
    return bad[0] if bad else None


def write_weights(directory: str, weights: Dict[str, paddle.Tensor], ema=None) -> Dict[str, Tuple[int, int]]:
    files = {"model.safetensors": write_safetensors(os.path.join(directory, "model.safetensors"), {k: v.numpy() for k, v in weights.items()})}
    if ema is not None:
        files["ema.safetensors"] = write_safetensors(os.path.join(directory, "ema.safetensors"), ema.state_numpy())
    return files


def write_args(checkpoint_dir: str, args: dict) -> Tuple[int, int]:
    """args.json: every model, data and loop argument of the run (generate.py rebuilds the model from it)."""
    return write_json(os.path.join(checkpoint_dir, "args.json"), args, default=str)


class CheckpointWriteError(RuntimeError):
    pass


def save_atomically(output_dir: str, step: int, write_files: Callable[[str, int], Dict[str, Tuple[int, int]]], save_total_limit=None,
                    check_finite: Optional[Dict[str, paddle.Tensor]] = None) -> str:
    """The checkpoint protocol both loops share; every rank calls it.

      0. every rank checks `check_finite` (trainable and EMA weights): a NaN or inf anywhere and
         nobody writes (a checkpoint of NaNs would be resumed from and poison the run for good);
      1. rank 0 makes `checkpoint-N.tmp`;
      2. every rank writes its own files into it: `write_files(tmp_dir, rank)` -> {name: (size, crc32c)};
      3. rank 0 gathers every rank's list, writes manifest.json last, renames the directory to
         `checkpoint-N` and rotates the oldest complete checkpoints out.
    After each phase the ranks agree on whether any rank failed (a one-number all-reduce in place
    of a barrier), so any error on any rank (a full disk's OSError, safetensors' SafetensorError,
    anything) stops every rank with the one line below instead of leaving the others waiting in a
    collective until it times out, and no `checkpoint-N` without its manifest is left behind.
    At 32 ranks that is 4 all-reduces and one gather of a few file names per rank per save.
    """
    rank = max(0, dist.get_rank())
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    written = {}

    def newest_complete():
        try:
            done = complete_checkpoints(output_dir)
        except OSError:
            done = []
        return done[-1] if done else "none"

    def phase(action):
        error = None
        try:
            action()
        except Exception as e:  # noqa: BLE001 - any failure must reach the agreement, or the other ranks hang
            error = e
        if any_rank(error is not None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            why = (str(error) if isinstance(error, WriteFailed) else describe(error)) if error is not None else "another rank failed to write its files (its log says why)"
            raise CheckpointWriteError(
                f"could not write checkpoint-{step} in {output_dir}: {why}; the newest complete checkpoint is "
                f"{newest_complete()} and is untouched. Free space or fix the directory, then re-run"
            )

    bad = nonfinite_weight(check_finite) if check_finite else None
    if any_rank(bad is not None):
        raise CheckpointWriteError(
            f"refusing to write checkpoint-{step}: weight {bad or '(on another rank)'} is NaN or inf; the newest complete checkpoint is "
            f"{newest_complete()}. Re-run from it with a lower --learning_rate or --max_grad_norm set"
        )

    def make_dir():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)

    def write():
        written.update(write_files(tmp, rank))

    def publish():
        if rank == 0:
            manifest = {"step": step, "files": {name: {"size": size, "crc32c": crc} for rank_files in every_rank for name, (size, crc) in rank_files.items()}}
            write_json(os.path.join(tmp, MANIFEST), manifest)  # last: from here on the checkpoint counts
            shutil.rmtree(final, ignore_errors=True)  # a broken checkpoint-N of an earlier attempt
            os.replace(tmp, final)
            fsync_dir(output_dir)
            remove_stale_staging(output_dir)
            rotate_checkpoints(output_dir, save_total_limit)

    phase(make_dir)
    phase(write)
    every_rank = [written]
    if dist.get_world_size() > 1:
        every_rank = []
        dist.all_gather_object(every_rank, written)
    phase(publish)
    return final


def save_checkpoint(output_dir, step, model, optimizer, lr_scheduler, data_progress: dict, args: dict, ema=None, scaler=None, save_total_limit=None):
    """The explicit loop's checkpoint-N (layout in the module docstring), written atomically."""
    weights = trainable_state(model)

    def write_files(tmp, rank):
        files = {}
        if rank == 0:  # DataParallel: the ranks' weights and optimizer states are identical
            files.update(write_weights(tmp, weights, ema))
            files.update(write_state(tmp, "optimizer", optimizer.state_dict()))
            files["scheduler.json"] = write_json(os.path.join(tmp, "scheduler.json"), encode(lr_scheduler.state_dict()))
            if scaler is not None:
                files["scaler.json"] = write_json(os.path.join(tmp, "scaler.json"), encode(scaler.state_dict()))
            files["args.json"] = write_args(tmp, args)
            files["trainer_state.json"] = write_json(os.path.join(tmp, "trainer_state.json"), {"global_step": step})
        files[f"rng_state_rank{rank}.json"] = write_json(os.path.join(tmp, f"rng_state_rank{rank}.json"), rng_to_json())
        files[os.path.basename(data_position_file(tmp, rank))] = write_json(data_position_file(tmp, rank), data_progress)
        return files

    check = {**weights, **({f"ema:{k}": v for k, v in ema.shadow.items()} if ema is not None else {})}
    return save_atomically(output_dir, step, write_files, save_total_limit, check_finite=check)


# -- reading -----------------------------------------------------------------------------------

def load_weights(path: str, model, trust_pickle: bool = False) -> dict:
    """model.safetensors as NumPy arrays (an old Trainer checkpoint's model_state.pdparams only with
    --trust_pickle), checked against `checkpoint_weights(model)`: a missing weight or another shape stops the run."""
    from safetensors.numpy import load_file

    file = os.path.join(path, "model.safetensors")
    if os.path.isfile(file):
        weights = load_file(file)
    else:
        old = load_pickle(os.path.join(path, "model_state.pdparams"), trust_pickle, return_numpy=True)
        weights = {k: old[k] for k in checkpoint_weights(model) if k in old}
    missing = set(checkpoint_weights(model)) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} weights (e.g. {sorted(missing)[0]}); it belongs to a different model")
    from ldm.models.ldm import check_state_shapes  # here: the model module imports ppdiffusers

    check_state_shapes(model, weights, f"checkpoint {path}")
    return weights


def set_weights(model, weights: dict) -> None:
    """Set the checkpoint's weights; the rest (the frozen autoencoder) keeps its own, without paddle
    warning about each weight the checkpoint does not hold."""
    state = model.state_dict()
    state.update({k: paddle.to_tensor(v) for k, v in weights.items() if k in state})
    model.set_state_dict(state)


def load_optimizer_state(path: str, stem: str, trust_pickle: bool) -> dict:
    """`stem.{safetensors,json}`, or an old checkpoint's pickled `stem.pdopt` with --trust_pickle."""
    if os.path.isfile(os.path.join(path, f"{stem}.json")):
        return read_state(path, stem)
    return load_pickle(os.path.join(path, f"{stem}.pdopt"), trust_pickle)


def load_small_state(path: str, name: str, trust_pickle: bool, **pickle_kwargs):
    """`name.json` (scheduler, scaler), or an old checkpoint's `name.pdparams` with --trust_pickle; None if neither."""
    if os.path.isfile(os.path.join(path, f"{name}.json")):
        return decode(read_json(os.path.join(path, f"{name}.json")))
    if os.path.isfile(os.path.join(path, f"{name}.pdparams")):
        return load_pickle(os.path.join(path, f"{name}.pdparams"), trust_pickle, **pickle_kwargs)
    return None


def load_rng_state(path: str, rank: int, trust_pickle: bool) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for this rank (e.g. more
    ranks now than when it was saved: those ranks keep their fresh per-rank seeds)."""
    file = os.path.join(path, f"rng_state_rank{rank}.json")
    if os.path.isfile(file):
        rng_from_json(read_json(file))
        return True
    old = os.path.join(path, f"rng_state_rank{rank}.pdparams")  # the explicit loop's old pickle
    if os.path.isfile(old):
        import random

        state = load_pickle(old, trust_pickle, return_numpy=True)
        paddle.set_rng_state(state["paddle"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        return True
    return False


def load_checkpoint(path, model, optimizer, lr_scheduler, ema=None, scaler=None, trust_pickle: bool = False) -> int:
    """Restore everything but the data position (the stream restores that); return the step."""
    from safetensors.numpy import load_file

    require_good_checkpoint(path, trust_pickle)
    rank = max(0, dist.get_rank())
    set_weights(model, load_weights(path, model, trust_pickle))
    optimizer.set_state_dict(load_optimizer_state(path, "optimizer", trust_pickle))
    lr_scheduler.set_state_dict(load_small_state(path, "scheduler", trust_pickle))
    if ema is not None and os.path.isfile(os.path.join(path, "ema.safetensors")):
        ema.load_numpy(load_file(os.path.join(path, "ema.safetensors")))
    if scaler is not None:
        state = load_small_state(path, "scaler", trust_pickle)
        if state is not None:
            scaler.load_state_dict(state)
    load_rng_state(path, rank, trust_pickle)
    return int(read_json(os.path.join(path, "trainer_state.json"))["global_step"])
