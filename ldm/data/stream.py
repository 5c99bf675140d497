"""The LAION-400M-style text-image stream (SPEC section 2).

Layout of the input:
    --file_list  ->  filelists (optionally weighted)  ->  parts  ->  lines
    line = caption \t placeholder \t base64(image) [\t ignored ...]

How the stream is cut into shards (STYLE 7: one visible, deterministic rule):
    * the shards are the (rank, dataloader worker) pairs, S = world_size * num_workers;
    * each filelist's parts are split into "units": when a filelist has fewer parts
      than shards, every part is split by line stride into ceil(S / parts) units
      (unit j of a part reads lines j, j+m, j+2m, ...), so no shard is ever empty;
    * every pass, the units are permuted with a seed shared by all shards, then dealt
      by stride: shard s reads units s, s+S, s+2S, ...  Every unit belongs to exactly
      one shard, so every readable record is read exactly once per pass.
Within a shard each filelist is an endless sequence of passes. The shard's units of a pass
are read --parts_per_window at a time, side by side: a shuffle window of --shuffle_buffer
lines takes the next slice of each open unit and is permuted before it is decoded, so a
batch mixes several parts (LAION parts are in crawl order: runs of one site, near-duplicates).
The filelists are interleaved by weight. Every random choice is a pure function of
(seed, pass, rank, worker), so two runs with the same settings see the same stream, and
the position in it is a few integers that checkpoints save (exact resume).

Bad data never stops the stream: each skipped record or part is counted by reason
(SKIP_REASONS), and the first of each reason is logged with its part, line and why.
A shard whose passes hold no usable record (BARREN_UNITS) cannot make progress; it then
yields sentinel samples (`data_error` 1) that tell every rank's training loop to stop
with one line naming the skips (StreamProgress.fatal), instead of spinning silently.
"""
import os
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ldm.data.buckets import BucketBatcher, make_buckets, stack

from ldm.data.records import SKIP_REASONS, Skip, decode_image, explain_barren, log, parse_line, skips_from_vector
from ldm.data.filelists import describe_parts, order_fingerprint, part_sizes, read_file_list, read_lines
from ldm.data.shards import CURSOR_FIELDS, PARTS_PER_WINDOW, ShardStream, TAIL_PASS

# Caption-dropout draws made at a time (TextImageStream._caption_dropped).
DROPOUT_BLOCK = 64
# A shard that has skipped this many records without yielding one says so (early hint).
EARLY_WARNING_SKIPS = 1000


def current_rank_and_world() -> Tuple[int, int]:
    """Rank and world size from paddle.distributed's launch environment."""
    try:
        import paddle.distributed as dist

        return dist.get_rank(), max(1, dist.get_world_size())
    except Exception:
        return int(os.environ.get("PADDLE_TRAINER_ID", 0)), int(os.environ.get("PADDLE_TRAINERS_NUM", 1))


def _worker():
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    from paddle.io import get_worker_info

    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TextImageStream:
    """IterableDataset of {"pixel_values", "input_ids", "skips", "worker", "position", "data_error"} for training.

    Besides the sample, each item carries its worker's cumulative skip counts (by
    SKIP_REASONS) and the worker's stream position just after it, so the training loop
    can log the skips and checkpoint exactly where every worker stood (`resume`);
    `data_error` is 1 on the sentinels a barren shard yields instead (see `__iter__`).
    """

    def __init__(
        self,
        file_list: str,
        resolution: int,
        tokenizer=None,
        max_length: int = 77,
        caption_dropout: float = 0.1,
        buffer_size: int = 1000,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        parts_per_window: int = PARTS_PER_WINDOW,
        max_aspect_ratio: Optional[float] = None,
        aspect_ratio_buckets: bool = False,
        bucket_step: int = 64,
        batch_size: int = 1,
        latent_cache=None,
        allow_missing_parts: bool = False,
    ):
        self.entries = read_file_list(file_list, allow_missing_parts)
        self.resolution = resolution
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.caption_dropout = caption_dropout
        self._dropouts: Dict[int, Tuple[int, List[bool]]] = {}  # shard -> (first draw, dropped?) of a block of draws
        self.buffer_size = buffer_size
        self.seed = seed
        self.parts_per_window = parts_per_window
        self.max_aspect_ratio = max_aspect_ratio
        # With aspect-ratio buckets (ldm.buckets) each worker yields whole batches of one bucket,
        # so the DataLoader must not batch again (`loader_batch_size`).
        self.buckets = make_buckets(resolution, bucket_step, max_aspect_ratio) if aspect_ratio_buckets else None
        self.bucket_step = bucket_step
        self.batch_size = batch_size
        # ldm.cache_latents.LatentCache: samples carry the cached moments ("latent_moments") instead of pixels
        self.latent_cache = latent_cache
        if rank is None or world_size is None:
            rank, world_size = current_rank_and_world()
        self.rank, self.world_size = rank, world_size
        if self.rank == 0:
            log(f"{file_list}: {describe_parts(self.entries)}")
        self.resume_state = None
        # The pass every shard starts at when it has no saved position: 0 for a new run; after the
        # highest pass a checkpoint reached when a resumed run starts a new pass (start_new_pass).
        self.first_pass = 0
        if tokenizer is not None:
            from ldm.data.tokenizer import CaptionEncoder

            self.encode_caption = CaptionEncoder(tokenizer, max_length)

    def order_settings(self) -> Dict[str, object]:
        """The flags that define the stream's order, by flag name. Without buckets, --max_aspect_ratio
        only decides which records are skipped (a skipped record still advances the position)."""
        settings = {"seed": self.seed, "shuffle_buffer": self.buffer_size, "parts_per_window": self.parts_per_window,
                    "resolution": self.resolution, "aspect_ratio_buckets": bool(self.buckets)}
        if self.buckets:  # the bucket set decides which records are batched together
            settings.update(bucket_step=self.bucket_step, max_aspect_ratio=self.max_aspect_ratio)
        return settings

    def fingerprint(self) -> dict:
        """The order fingerprint checkpoints save (see order_fingerprint); rank 0's names every part."""
        return order_fingerprint(self.entries, self.order_settings(), listing=self.rank == 0)

    def loader_batch_size(self, batch_size: int):
        """batch_size for paddle.io.DataLoader: None when the stream yields whole (bucketed) batches."""
        return None if self.buckets else batch_size

    def resume(self, state: dict, num_workers: int, all_ranks: Optional[List[dict]] = None) -> None:
        """Continue from a position saved by the trainer (see ldm.trainer.StreamProgress).

        The position is per (rank, worker) shard. With another world size or number of dataloader
        workers (elastic resume), `all_ranks` holds every old rank's saved state, in rank order, and
        the position is carried over to this layout (relayout)."""
        if state["world_size"] != self.world_size or state["num_workers"] != max(1, num_workers):
            if all_ranks is None:
                raise ValueError(f"the checkpoint's data position is for {state['world_size']} processes x {state['num_workers']} dataloader workers, "
                                 f"this run has {self.world_size} x {max(1, num_workers)}; use the same, or pass --ignore_data_skip to start a new pass")
            state = self.relayout(all_ranks, max(1, num_workers))
        self.resume_state = state
        self.first_pass = int(state.get("first_pass", 0))  # for a worker that had not yielded yet

    def relayout(self, old_ranks: List[dict], num_workers: int) -> dict:
        """This rank's resume state in a new layout (world size x workers) from every old rank's.

        Each old shard j (of S) is dealt to new shard j mod S'; a new shard first finishes the
        passes of the old shards it was dealt (ShardStream.tail_stream: the rest of each one's
        pass from its saved cursor, then its whole passes up to the highest pass any old shard had
        reached, in the old layout), then reads the next passes in the new layout. So every record
        of every pass is read once. Cost: each old shard re-reads (decompresses, does not decode)
        up to the windows it had started, as any resume; at 32 x 8 -> 24 x 8 GPUs x workers, 64 of
        the 192 new shards finish two old shards' passes, the others one: they begin the next pass
        up to one old shard's share of a pass (1/256) apart, and nothing waits on that (the stream
        is endless). Old skip counts and bucket queues go with their old shard."""
        old_world, old_workers = int(old_ranks[0]["world_size"]), int(old_ranks[0]["num_workers"])
        for state in old_ranks:
            if state.get("elastic"):
                was = state["elastic"]["from"]
                raise ValueError(f"the checkpoint's data position is itself still finishing the passes of an earlier layout change "
                                 f"({was[0]} x {was[1]} -> {old_world} x {old_workers} processes x dataloader workers); resume it on "
                                 f"{old_world} x {old_workers} until a later checkpoint, or pass --ignore_data_skip to start a new pass")
        lists = len(self.entries)
        old = []  # every old shard's saved worker state, shard j = rank * workers + worker
        for state in old_ranks:
            first = int(state.get("first_pass", 0))
            for w in range(old_workers):
                saved = state["workers"].get(str(w)) or {"position": [0] + [first, 0, 0, 0] * lists, "skips": []}
                if len(saved["position"]) != 1 + CURSOR_FIELDS * lists:
                    raise ValueError(f"saved data position has {len(saved['position'])} numbers, expected {1 + CURSOR_FIELDS * lists}: the --file_list changed since the checkpoint")
                old.append(saved)
        max_pass = [max(int(v["position"][1 + CURSOR_FIELDS * l]) for v in old) for l in range(lists)]
        num_shards = self.world_size * num_workers
        workers, tasks = {}, {}
        for w in range(num_workers):
            mine = list(range(self.rank * num_workers + w, len(old), num_shards))  # old shards j = this shard mod S'
            skips = np.zeros(len(SKIP_REASONS), "int64")
            for j in mine:
                vector = np.asarray(old[j]["skips"], "int64")[: len(SKIP_REASONS)]
                skips[: len(vector)] += vector
            position = [0]
            for l in range(lists):
                position += [TAIL_PASS, -1, 0, 0] if mine else [max_pass[l] + 1, 0, 0, 0]
            workers[str(w)] = {"position": position, "skips": skips.tolist()}
            carry = [c for j in mine for c in old[j].get("carry", [])]
            if carry:
                workers[str(w)]["carry"] = carry
            if mine:
                tasks[str(w)] = [[j, old[j]["position"]] for j in mine]
        log(f"rank {self.rank}: data position carried over from {old_world} x {old_workers} to {self.world_size} x {num_workers} processes x workers; "
            f"the old shards' passes (up to pass {max(max_pass)}) are finished first, then the new layout reads on")
        return {"world_size": self.world_size, "num_workers": num_workers, "batches": 0, "workers": workers,
                "elastic": {"from": [old_world, old_workers], "old_shards": len(old), "max_pass": max_pass, "tasks": tasks}}

    def start_new_pass(self, pass_index: int) -> None:
        """Start every shard afresh at `pass_index` (--ignore_data_skip, a resolution stage): the pass
        index seeds the part order and every window's shuffle, so a new pass is a new order, never a
        replay of pass 0's first records."""
        self.resume_state = None
        self.first_pass = pass_index

    def shard_stream(self, worker: int, num_workers: int, passes: Optional[int] = None) -> ShardStream:
        shard = self.rank * num_workers + worker
        state, skips, carry = None, None, []
        if self.first_pass:
            state = np.zeros(1 + CURSOR_FIELDS * len(self.entries), dtype="int64")
            state[1::CURSOR_FIELDS] = self.first_pass
        tail = None
        if self.resume_state is not None:
            saved = self.resume_state["workers"].get(str(worker))
            if saved is not None:
                state, skips, carry = saved["position"], saved["skips"], saved.get("carry", [])
            elastic = self.resume_state.get("elastic")
            if elastic and str(worker) in elastic["tasks"]:
                tail = {"old_shards": elastic["old_shards"], "max_pass": elastic["max_pass"], "tasks": elastic["tasks"][str(worker)]}
        stream = ShardStream(self.entries, shard, self.world_size * num_workers, self.seed, self.buffer_size, state, self.parts_per_window, passes, tail)
        stream.skips.where = f"rank {self.rank} worker {worker}"
        stream.carry = carry  # bucketed records read but not yet yielded (ldm.buckets)
        if skips is not None:
            stream.skips.update(skips_from_vector(skips))
        return stream

    def records(self, stream: ShardStream) -> Iterator[dict]:
        """Decoded records of one shard: dicts with part, line, caption and image.

        Ends when the shard is barren (ShardStream.barren holds every filelist). The stream is
        otherwise endless, and skipped lines must not count as progress, or a shard whose every
        record is skipped (e.g. every image smaller than --resolution) would spin without a word.
        """
        skipped, any_yield = 0, False
        for rec in stream:
            if len(stream.barren) == len(self.entries):
                return
            try:
                caption, key, value = self.decode(rec.raw)
            except Skip as e:
                stream.skips.skip(e.reason, rec.part, rec.line, str(e))
                skipped += 1
                if skipped == EARLY_WARNING_SKIPS and not any_yield:
                    log(f"{stream.skips.where}: no usable record among the first {skipped} read: {explain_barren(stream.skips, self.resolution)}; "
                        "the run stops if its passes yield none")
                continue
            stream.used(rec.list_index)
            any_yield = True
            yield {"part": rec.part, "line": rec.line, "pass": rec.pass_index, "list": rec.list_index, "caption": caption, key: value,
                   "draw": int(stream.state[0])}

    def decode(self, raw: bytes) -> Tuple[str, str, np.ndarray]:
        """(caption, sample key, array) of a raw line, or raise Skip: the decoded image as
        "pixel_values"; with a latent cache, the moments in column 4 as "latent_moments" (no image
        decode: ldm.cache_latents decoded and checked it, and noted its size for --max_aspect_ratio)."""
        if self.latent_cache is not None:
            from ldm.data.latent_records import cached_record

            cached = cached_record(raw, self.latent_cache.prefix.encode())
            if cached is not None:
                caption, moments, (w, h) = cached
                if self.max_aspect_ratio and max(w, h) > self.max_aspect_ratio * min(w, h):
                    raise Skip("extreme_aspect_ratio", f"{w}x{h} pixels, more elongated than --max_aspect_ratio {self.max_aspect_ratio}")
                return caption, "latent_moments", moments
        caption, data, reason = parse_line(raw)
        if reason is not None:
            raise Skip(reason, "not 3 tab-separated UTF-8 columns" if reason == "short_line" else "column 3 is not base64")
        pixels = decode_image(data, self.resolution, self.max_aspect_ratio, self.buckets)
        if self.latent_cache is not None:
            # A usable image without moments: one batch cannot mix moments and pixels.
            raise Skip("not_cached", f"column 4 holds no moments starting {self.latent_cache.prefix!r}")
        return caption, "pixel_values", pixels

    def __iter__(self):
        loader_worker, num_workers = _worker()
        # After a resume the DataLoader starts its round-robin at loader worker 0, but the
        # uninterrupted run would next have read from worker (batches consumed % workers):
        # rotate the roles so the batches come in exactly the same order.
        offset = 0 if self.resume_state is None else int(self.resume_state["batches"]) % num_workers
        worker = (loader_worker + offset) % num_workers
        stream = self.shard_stream(worker, num_workers)
        if self.buckets:
            yield from self._bucketed_batches(stream, worker)
        else:
            for rec in self.records(stream):
                yield self._sample(rec, stream, worker)
        # Only a barren shard gets here (the stream is endless). Exiting this worker would leave
        # the other ranks waiting in the gradient all-reduce; instead send sentinels, which make
        # StreamProgress.fatal say why, and the training loops stop on every rank at one step.
        log(f"{stream.skips.where} has nothing to train on: {explain_barren(stream.skips, self.resolution)}; stopping the run")
        while True:
            blank = (("latent_moments", np.zeros(self.latent_cache.shape, np.float16)) if self.latent_cache is not None else
                     ("pixel_values", np.zeros((3, self.resolution, self.resolution), np.uint8)))
            sentinel = {blank[0]: blank[1], "skips": stream.skips.as_vector(),
                        "worker": np.int64(worker), "position": stream.state.copy(), "data_error": np.int64(1)}
            if self.tokenizer is not None:
                sentinel["input_ids"] = np.full(self.max_length, self.tokenizer.pad_token_id, dtype="int64")
            yield self._batch([sentinel] * self.batch_size, []) if self.buckets else sentinel

    def _sample(self, rec: dict, stream: ShardStream, worker: int) -> dict:
        """A training sample with the stream's bookkeeping as it stands after this record."""
        key = "latent_moments" if "latent_moments" in rec else "pixel_values"
        sample = {key: rec[key], "skips": stream.skips.as_vector(), "worker": np.int64(worker),
                  "position": stream.state.copy(), "data_error": np.int64(0)}
        if self.tokenizer is not None:
            drop = self._caption_dropped(stream.shard, rec["draw"])
            sample["input_ids"] = self.encode_caption("" if drop else rec["caption"])
        return sample

    def _caption_dropped(self, shard: int, draw: int) -> bool:
        """Caption dropout for classifier-free guidance, seeded by the record's place in the stream
        (its shard and draw). The draws are made DROPOUT_BLOCK at a time, the same numbers: a seeded
        generator made right after an image decode costs ~90 us (numpy's code has left the CPU
        caches), ~15 us in a row."""
        first, drops = self._dropouts.get(shard, (0, []))
        if not first <= draw < first + len(drops):
            first = draw
            drops = [np.random.default_rng([self.seed, shard, d, 3]).random() < self.caption_dropout for d in range(first, first + DROPOUT_BLOCK)]
            self._dropouts[shard] = (first, drops)
        return drops[draw - first]

    def _bucketed_batches(self, stream: ShardStream, worker: int) -> Iterator[dict]:
        """Whole batches of one aspect-ratio bucket each (ldm.buckets), with the carry in the position."""
        batcher = BucketBatcher(self.batch_size)
        # A resumed worker first refills its queues with the records it had read but not yielded
        # (a smaller --per_device_train_batch_size than before may already fill some).
        for rec in self._carried_records(stream):
            full = batcher.add(self._sample(rec, stream, worker), [rec["part"], rec["line"], rec["draw"]])
            if full is not None:
                yield self._batch(full, batcher.carry())
        for rec in self.records(stream):
            full = batcher.add(self._sample(rec, stream, worker), [rec["part"], rec["line"], rec["draw"]])
            if full is not None:
                yield self._batch(full, batcher.carry())

    def _carried_records(self, stream: ShardStream) -> Iterator[dict]:
        """The records a resumed bucketed worker had read but not yielded (its saved carry), decoded
        anew through the same guard as any record: one that no longer decodes (a part since
        deleted or cut, cached moments gone, ...) is skipped and counted, never a crash that
        would kill the worker again on every re-run."""
        lines = read_lines((part, line) for part, line, _ in stream.carry)
        # Missing or cut short? One size lookup for all the parts with lines gone (for remote
        # parts that is a listing of their directory, not one request per record).
        gone = sorted({part for part, line, _ in stream.carry if (part, line) not in lines})
        sizes = dict(zip(gone, part_sizes(gone))) if gone else {}
        for part, line, draw in stream.carry:
            raw = lines.get((part, line))
            try:
                if raw is None:
                    raise Skip("missing_part" if sizes[part] < 0 else "truncated_part", f"line {line} can no longer be read")
                caption, key, value = self.decode(raw)
            except Skip as e:
                stream.skips.skip(e.reason, part, line, f"{e} (a record the checkpoint held in its bucket queues)")
                continue
            yield {"part": part, "line": line, "caption": caption, "draw": draw, key: value}

    @staticmethod
    def _batch(samples: List[dict], carry: list) -> dict:
        """Stacked samples; the bookkeeping is the stream's after the last of them, plus the carry."""
        bookkeeping = ("skips", "worker", "position", "data_error")
        batch = stack([{k: v for k, v in s.items() if k not in bookkeeping} for s in samples])
        batch.update({k: samples[-1][k] for k in bookkeeping}, carry=carry)
        return batch
