"""How long a checkpoint save takes: our save path's throughput on this disk, and what it means for ldm_32l.

    python bench/checkpoint_write.py [--gb 2] [--files 2] [--dir DIR] [--repeats 3]

Writes `--gb` GB of random float32 tensors as `--files` safetensors files through
ldm.checkpoint_io.write_safetensors (temporary name, write, fsync, rename, directory fsync, then the
CRC32C read-back the manifest records), then checks them as a resume does
(ldm.checkpoint.checkpoint_problem: sizes, headers, CRC32C), and deletes them. Each figure is the
best of `--repeats`. The estimate scales the measured GB/s to ldm_32l's rank-0 save under
DataParallel: fp32 weights 5.8 GB + EMA 5.8 GB + AdamW moments 11.6 GB = 23.3 GB (1.454B
parameters x 4 bytes x 4), against the launcher's grace between SIGTERM and SIGKILL.
Last line: `checkpoint_write: N GB/s (write+fsync+crc32c), ldm_32l save ~S s; verify M GB/s, ~V s`.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LDM_32L_BYTES = 1.454e9 * 4 * 4  # weights + EMA + two AdamW moments, float32


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="Gigabytes written per repeat (RAM: twice this is held while writing).")
    parser.add_argument("--files", type=int, default=2, help="Number of safetensors files the gigabytes are split into.")
    parser.add_argument("--dir", default=None, help="Directory on the disk to measure (default: a temporary directory under the repo).")
    parser.add_argument("--repeats", type=int, default=3, help="Repeats; the median is reported, and the slowest.")
    args = parser.parse_args()

    import numpy as np

    from ldm.training.checkpoint import MANIFEST, checkpoint_problem
    from ldm.training.checkpoint_io import write_json, write_safetensors

    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    per_file = int(args.gb * 1e9 / args.files / 4)
    rng = np.random.default_rng(0)
    tensors = [{"w": rng.standard_normal(per_file, dtype=np.float32)} for _ in range(args.files)]
    total = sum(t["w"].nbytes for t in tensors)
    write_times, verify_times = [], []
    try:
        for _ in range(args.repeats):
            shutil.rmtree(os.path.join(root, "checkpoint-1"), ignore_errors=True)
            path = os.path.join(root, "checkpoint-1")
            os.makedirs(path)
            start = time.time()
            files = {f"part{i}.safetensors": write_safetensors(os.path.join(path, f"part{i}.safetensors"), t) for i, t in enumerate(tensors)}
            write_times.append(time.time() - start)
            write_json(os.path.join(path, MANIFEST), {"step": 1, "files": {n: {"size": s, "crc32c": c} for n, (s, c) in files.items()}})
            start = time.time()
            assert checkpoint_problem(path) is None
            verify_times.append(time.time() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_gbs, verify_gbs = total / statistics.median(write_times) / 1e9, total / statistics.median(verify_times) / 1e9
    slowest = total / max(write_times) / 1e9
    print(json.dumps({"bytes": total, "write_s": write_times, "verify_s": verify_times}))
    print(f"slowest write: {slowest:.2f} GB/s, ldm_32l save ~{LDM_32L_BYTES / 1e9 / slowest:.0f} s")
    print(f"checkpoint_write: {write_gbs:.2f} GB/s (write+fsync+crc32c), ldm_32l save ~{LDM_32L_BYTES / 1e9 / write_gbs:.0f} s; "
          f"verify {verify_gbs:.2f} GB/s, ~{LDM_32L_BYTES / 1e9 / verify_gbs:.0f} s")


if __name__ == "__main__":
    main()
