"""python -m ldm.data: print, one JSON line each, the records one rank's workers yield in one pass (SPEC section 4).
"""
import argparse
import json
import sys

from ldm.data.records import SKIP_REASONS, SkipCounter, explain_barren, log
from ldm.data.shards import PARTS_PER_WINDOW
from ldm.data.storage import use_part_cache
from ldm.data.stream import TextImageStream


# ---------------------------------------------------------------------------
# python -m ldm.data: print what one rank's workers yield in one pass
# ---------------------------------------------------------------------------


def inspect_pass(file_list, resolution, rank, world_size, num_workers, seed=0, buffer_size=1000, out=None,
                 parts_per_window=PARTS_PER_WINDOW, max_aspect_ratio=None, aspect_ratio_buckets=False, bucket_step=64,
                 allow_missing_parts=False):
    """Print the pass-0 records of each of the rank's workers (to `out`, default the sys.stdout of
    the call, not of the import); return the number read and summed skip counts."""
    out = out or sys.stdout
    stream = TextImageStream(file_list, resolution, seed=seed, buffer_size=buffer_size, rank=rank, world_size=world_size,
                             parts_per_window=parts_per_window, max_aspect_ratio=max_aspect_ratio,
                             aspect_ratio_buckets=aspect_ratio_buckets, bucket_step=bucket_step, allow_missing_parts=allow_missing_parts)
    total = SkipCounter()
    read = 0
    for worker in range(num_workers):
        shard = stream.shard_stream(worker, num_workers, passes=1)
        for rec in stream.records(shard):
            read += 1
            _, h, w = rec["pixel_values"].shape
            out.write(json.dumps({"part": rec["part"], "line": rec["line"], "worker": worker, "caption": rec["caption"], "width": w, "height": h}) + "\n")
        total.update(shard.skips)
    return read, total


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm.data", description="Print, one JSON line each, the records one rank's dataloader workers yield in one pass.")
    parser.add_argument("--file_list", required=True, help="File listing one filelist path (and optional weight) per line.")
    parser.add_argument("--resolution", type=int, default=256, help="Side of the square crop, in pixels; smaller images are skipped.")
    parser.add_argument("--rank", type=int, default=0, help="Which rank's shards to print (0 .. world_size-1).")
    parser.add_argument("--world_size", type=int, default=1, help="Number of training processes the data is sharded over.")
    parser.add_argument("--num_workers", type=int, default=0, help="Dataloader workers per rank; 0 means the main process reads (one shard).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the part order and the shuffle.")
    # --shuffle_buffer is the training scripts' name, so a run's flags can be pasted here; --buffer_size kept for old commands.
    parser.add_argument("--shuffle_buffer", "--buffer_size", dest="shuffle_buffer", type=int, default=1000, help="Lines read and shuffled together (as the training scripts' flag).")
    parser.add_argument("--parts_per_window", type=int, default=PARTS_PER_WINDOW, help="Parts each worker reads side by side into one shuffle window.")
    parser.add_argument("--max_aspect_ratio", type=float, default=None, help="Skip images whose longer side is over this many times the shorter; unset keeps all.")
    parser.add_argument("--aspect_ratio_buckets", action="store_true", help="Crop each image to the aspect-ratio bucket nearest its own (width/height report the bucket).")
    parser.add_argument("--bucket_step", type=int, default=64, help="Bucket sides are multiples of this (the autoencoder factor x the UNet's downsampling: 64 for ldm_32l).")
    parser.add_argument("--allow_missing_parts", action="store_true", help="Go on when a filelist has no existing part (as the training scripts' flag).")
    parser.add_argument("--cache_dir", default=None, help="Local directory that keeps whole copies of remote parts (as the training scripts' flag); unset: streamed.")
    parser.add_argument("--cache_size_gb", type=float, default=100.0, help="Bound of --cache_dir in GiB (as the training scripts' flag).")
    args = parser.parse_args(argv)
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank must be in [0, {args.world_size}), got {args.rank}")
    for flag in ("resolution", "shuffle_buffer", "parts_per_window", "bucket_step", "cache_size_gb"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if args.max_aspect_ratio is not None and args.max_aspect_ratio < 1:
        parser.error(f"--max_aspect_ratio must be >= 1 (longer side over shorter), got {args.max_aspect_ratio}")
    if args.cache_dir:
        use_part_cache(args.cache_dir, args.cache_size_gb)
    try:
        read, skips = inspect_pass(args.file_list, args.resolution, args.rank, args.world_size, max(1, args.num_workers), args.seed,
                                   args.shuffle_buffer, parts_per_window=args.parts_per_window, max_aspect_ratio=args.max_aspect_ratio,
                                   aspect_ratio_buckets=args.aspect_ratio_buckets, bucket_step=args.bucket_step,
                                   allow_missing_parts=args.allow_missing_parts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if read == 0:
        log(f"rank {args.rank} would train on nothing: {explain_barren(skips, args.resolution)}")
    summary = {"read": read, "skipped": {r: skips.get(r, 0) for r in SKIP_REASONS}}
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
