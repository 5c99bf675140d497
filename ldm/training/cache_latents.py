"""Cache the frozen autoencoder's output once, so stage 2 never runs its encoder.

    python -m ldm.cache_latents --file_list F --vae_name_or_path DIR --resolution R --output_dir D

At 256 px the KL-f8 encoder costs a quarter of an ldm_32l training step's FLOPs (273 of 1053 GFLOP
per image, docs/performance.md), and it is frozen: its posterior for an image never changes. This
writes a copy of every part with a fourth column, the posterior's moments (mean and log-variance,
float16, base64) for the centre crop the training stream takes at R px, plus one filelist per
input filelist (same weights) and `D/train.filelist.list`. The seed's three columns stay, so the
parts remain readable by anything that reads the seed format (further columns are ignored).

Column 4 reads `FINGERPRINT/Rpx-centre/CxHxW/WxH/BASE64` (moments' shape, the source image's size
for --max_aspect_ratio): the fingerprint identifies the autoencoder (its config and weights), so
the training scripts use the moments only when they were made by the same autoencoder at the same
resolution (`probe_cache`), and otherwise encode as before.
Records the stream would skip (bad base64, undecodable, smaller than R) are copied unchanged,
so training counts them as it always did.

Runs on several processes (`python -m paddle.distributed.launch --nproc_per_node N
ldm/cache_latents.py ...`, or --gpus): process r caches parts r, r+N, ... Each part is written under a
temporary name and renamed when complete, so re-running after an interruption only caches the
parts not yet done.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ldm.data.records import SkipCounter, Skip, decode_image, format_skips, parse_line
from ldm.data.filelists import Unit, iter_unit_lines, read_file_list
from ldm.data.latent_records import CROP, LatentCache, cache_prefix, moments_column
from ldm.core.process import leave_imports_out_of_gc


WEIGHT_SUFFIXES = (".safetensors", ".pdparams", ".bin")


def autoencoder_fingerprint(vae_dir: str) -> str:
    """16 hex digits that change when anything that shapes the moments changes: the config
    (without `_`-prefixed metadata and `scaling_factor`, which the training step applies
    afterwards) and the bytes of every weight file in the directory."""
    with open(os.path.join(vae_dir, "config.json"), "r", encoding="utf-8") as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "scaling_factor"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(os.listdir(vae_dir)):
        if name.endswith(WEIGHT_SUFFIXES):
            digest.update(name.encode())
            with open(os.path.join(vae_dir, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]



def vae_directory(model_args) -> str:
    """The autoencoder directory a training run uses (its pipeline's vqvae/ with --model_name_or_path)."""
    if model_args.model_name_or_path:
        return os.path.join(model_args.model_name_or_path, "vqvae")
    return model_args.vae_name_or_path


def first_columns(file_list: str, lines: int = 50) -> Iterator[Tuple[str, Optional[bytes]]]:
    """(filelist, column 4 of the first of its first existing part's first `lines` lines that has one, or None)."""
    from ldm.data.filelists import open_part

    for entry in read_file_list(file_list):
        column = None
        for part in entry.parts:
            try:
                f = open_part(part)
            except Skip:
                continue
            with f:
                for _, raw in zip(range(lines), f):
                    fields = raw.rstrip(b"\r\n").split(b"\t", 4)
                    if len(fields) >= 4:
                        column = fields[3]
                        break
            break
        yield entry.path, column


def probe_cache(file_list: str, vae_dir: str, resolution: int) -> Tuple[Optional[LatentCache], str, bool]:
    """Whether a training run can take its latents from column 4: (the cache or None, the start-up
    log line, whether that line is a warning). The cache is used only if the first cached record
    of every filelist was made by this autoencoder (fingerprint) at this resolution and crop."""
    fingerprint = autoencoder_fingerprint(vae_dir)
    prefix = cache_prefix(fingerprint, resolution)
    found = list(first_columns(file_list))
    if all(column is None for _, column in found):
        return None, "Latents: encoded by the autoencoder every step (no cached moments in --file_list's parts; python -m ldm.cache_latents caches them)", False
    for path, column in found:
        if column is None or not column.startswith(prefix.encode()):
            what = "no cached moments" if column is None else f"moments cached as {column[:40].decode('ascii', 'replace').rsplit('/', 2)[0]!r}"
            return None, (f"Latents: encoded by the autoencoder every step: filelist {path} has {what}, but this run needs {prefix.rstrip('/')!r} "
                          f"(autoencoder {vae_dir} at --resolution {resolution}); re-run python -m ldm.cache_latents with them to use a cache"), True
    shape = tuple(int(v) for v in found[0][1][len(prefix):].split(b"/", 1)[0].split(b"x"))
    return LatentCache(prefix, shape), f"Latents: sampled from the moments cached in column 4 (autoencoder {fingerprint}, {resolution} px, {CROP} crop); the encoder does not run", False


def latent_cache_for_run(file_list: str, model_args, resolution: int, aspect_ratio_buckets: bool = False) -> Optional[LatentCache]:
    """The cache a training run reads its latents from (None: it encodes), said in the start-up log."""
    from paddlenlp.utils.log import logger

    cache, message, warning = probe_cache(file_list, vae_directory(model_args), resolution)
    if cache is not None and aspect_ratio_buckets:
        # The moments are of the square centre crop; a bucket crops another rectangle.
        cache, message, warning = None, "Latents: encoded by the autoencoder every step: --aspect_ratio_buckets crops other than the cached square centre crop", True
    (logger.warning if warning else logger.info)(message)
    return cache


# ---------------------------------------------------------------------------
# Writing the cache
# ---------------------------------------------------------------------------


def cache_part(vae, part: str, output: str, resolution: int, prefix: str, batch_size: int, skips: SkipCounter) -> int:
    """Copy one part to `output` with the moments as column 4; return how many records got them."""
    import paddle

    from ldm.models.ldm import posterior_moments

    tmp = f"{output}.tmp-{os.getpid()}"
    cached = 0
    with _gzip_writer(tmp) as out:
        pending: List[Tuple[List[bytes], Optional[np.ndarray], Tuple[int, int]]] = []

        def flush():
            nonlocal cached
            images = [pixels for _, pixels, _ in pending if pixels is not None]
            moments = posterior_moments(vae, paddle.to_tensor(np.stack(images))).numpy() if images else []
            k = 0
            for fields, pixels, size in pending:
                if pixels is None:
                    out.write(b"\t".join(fields) + b"\n")  # unchanged: training skips and counts it as before
                    continue
                out.write(b"\t".join(fields[:3] + [moments_column(prefix, moments[k], size).encode()]) + b"\n")
                k += 1
            cached += k
            pending.clear()

        for line_no, raw in iter_unit_lines(Unit(part, 0, 1), skips):
            fields = raw.rstrip(b"\r\n").split(b"\t")
            caption, data, reason = parse_line(raw)
            pixels, size = None, None
            try:
                if reason is not None:
                    raise Skip(reason, "not 3 tab-separated UTF-8 columns" if reason == "short_line" else "column 3 is not base64")
                pixels = decode_image(data, resolution)
                size = image_size(data)
            except Skip as e:
                skips.skip(e.reason, part, line_no, str(e))
            pending.append((fields, pixels, size))
            if sum(p is not None for _, p, _ in pending) >= batch_size:
                flush()
        flush()
    os.replace(tmp, output)
    return cached


def image_size(data: bytes) -> Tuple[int, int]:
    """(width, height) of the stored image (from its header), for the stream's --max_aspect_ratio check."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def _gzip_writer(path: str):
    from isal import igzip

    return igzip.open(path, "wb")


def plan(file_list: str, output_dir: str) -> Tuple[List[Tuple[str, str]], List[Tuple[str, float, List[str]]]]:
    """(every (input part, output part) pair in order, and the output filelists with their weights and parts)."""
    pairs, lists = [], []
    for i, entry in enumerate(read_file_list(file_list)):
        outputs = [os.path.join(output_dir, f"list{i:03d}", f"part-{j:05d}.gz") for j in range(len(entry.parts))]
        pairs.extend(zip(entry.parts, outputs))
        lists.append((os.path.join(output_dir, f"list{i:03d}.filelist"), entry.weight, outputs))
    return pairs, lists


def write_lists(output_dir: str, lists) -> str:
    for path, _, parts in lists:
        _write_text(path, "".join(p + "\n" for p in parts))
    file_list = os.path.join(output_dir, "train.filelist.list")
    _write_text(file_list, "".join(f"{path} {weight:g}\n" for path, weight, _ in lists))
    return file_list


def _write_text(path: str, text: str) -> None:
    with open(f"{path}.tmp-{os.getpid()}", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{path}.tmp-{os.getpid()}", path)


def main(argv=None) -> int:
    leave_imports_out_of_gc()  # the collector's full passes skip the libraries imported above
    parser = argparse.ArgumentParser(prog="python -m ldm.cache_latents", description=__doc__.splitlines()[0])
    parser.add_argument("--file_list", required=True, help="File list list of the parts to cache (the training --file_list).")
    parser.add_argument("--vae_name_or_path", required=True, help="Local directory of the frozen autoencoder stage 2 will use (train_vae.py's output, or a pipeline's vqvae/).")
    parser.add_argument("--resolution", type=int, default=256, help="Training --resolution in pixels: the moments are of the stream's centre crop at this size.")
    parser.add_argument("--output_dir", required=True, help="Where the cached parts, their filelists and train.filelist.list go.")
    parser.add_argument("--batch_size", type=int, default=16, help="Images encoded together.")
    parser.add_argument("--num_threads", type=int, default=0, help="CPU threads per process; 0 shares the cores between the local processes.")
    parser.add_argument("--trust_pickle", action="store_true", help="Also read pickled autoencoder weights (diffusers' .bin, model_state.pdparams): a pickle can run code while it loads, so only for files you trust.")
    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.batch_size <= 0:
        parser.error("--resolution and --batch_size must be > 0")

    import paddle
    import paddle.distributed as dist
    from tqdm.auto import tqdm

    from ldm.models.ldm import load_autoencoder
    from ldm.training.runtime import require_writable_dir, set_cpu_threads

    world, rank = dist.get_world_size(), max(0, dist.get_rank())
    if world > 1:
        dist.init_parallel_env()
    set_cpu_threads(args.num_threads)
    try:
        require_writable_dir(args.output_dir)
        pairs, lists = plan(args.file_list, args.output_dir)
        vae = load_autoencoder(args.vae_name_or_path, trust_pickle=args.trust_pickle)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    vae.eval()
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % scale:
        print(f"error: --resolution {args.resolution} is not a multiple of the autoencoder's downsampling factor {scale}", file=sys.stderr)
        return 2
    prefix = cache_prefix(autoencoder_fingerprint(args.vae_name_or_path), args.resolution)
    for _, _, parts in lists:
        os.makedirs(os.path.dirname(parts[0]), exist_ok=True)

    # Process r caches parts r, r+N, ... (STYLE 7: stride); a part already cached is kept.
    mine = pairs[rank::world]
    todo = [(src, dst) for src, dst in mine if not os.path.isfile(dst)]
    skips, cached, start = SkipCounter(), 0, time.time()
    skips.where = f"rank {rank}"
    with paddle.no_grad():
        for src, dst in tqdm(todo, desc="cache_latents", unit="part", disable=rank > 0):
            cached += cache_part(vae, src, dst, args.resolution, prefix, args.batch_size, skips)
    elapsed = time.time() - start
    print(f"rank {rank}: cached {cached} records in {len(todo)} parts ({len(mine) - len(todo)} already done) in {elapsed:.1f} s "
          f"({cached / max(elapsed, 1e-9):.1f} images/s); left uncached (training skips them): {format_skips(skips)}", file=sys.stderr, flush=True)
    if world > 1:
        dist.barrier()  # the lists name every rank's parts
    if rank == 0:
        file_list = write_lists(args.output_dir, lists)
        print(f"wrote {file_list}: train with --file_list {file_list} and the same autoencoder and --resolution {args.resolution}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
