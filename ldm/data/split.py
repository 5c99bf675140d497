"""Hold out parts of a file list for validation: `python -m ldm.split --file_list F --output_dir D`.

Writes D/train.filelist.list and D/eval.filelist.list (each with one filelist per input filelist,
keeping the weights), so training never reads what the validation loss and FID are measured on.
The held-out parts are the last `--eval_parts` parts of each filelist (a whole part: no record of
it can leak into training through the stream's line-stride splitting).
"""
import argparse
import os
import sys

from ldm.data.filelists import read_file_list
from ldm.data.storage import is_remote


def split_file_list(file_list: str, output_dir: str, eval_parts: int = 1):
    """Write the two file lists; return their paths and the part counts (train, eval)."""
    if eval_parts < 1:
        raise ValueError(f"--eval_parts must be >= 1, got {eval_parts}")
    entries = read_file_list(file_list)
    os.makedirs(output_dir, exist_ok=True)
    lists = {"train": [], "eval": []}
    counts = {"train": 0, "eval": 0}
    for i, entry in enumerate(entries):
        if len(entry.parts) <= eval_parts:
            raise ValueError(f"{entry.path} has {len(entry.parts)} part(s): holding out {eval_parts} would leave none to train on")
        for kind, parts in (("train", entry.parts[:-eval_parts]), ("eval", entry.parts[-eval_parts:])):
            path = os.path.join(output_dir, f"{kind}-{i:03d}-{os.path.basename(entry.path)}")
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(p if is_remote(p) else os.path.abspath(p) for p in parts) + "\n")
            lists[kind].append(f"{os.path.abspath(path)} {entry.weight:g}")
            counts[kind] += len(parts)
    out = {}
    for kind, lines in lists.items():
        out[kind] = os.path.join(output_dir, f"{kind}.filelist.list")
        with open(out[kind], "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return out, counts


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm.split", description=__doc__.splitlines()[0])
    parser.add_argument("--file_list", required=True, help="The file list list to split (SPEC section 2).")
    parser.add_argument("--output_dir", required=True, help="Where train.filelist.list, eval.filelist.list and their filelists go.")
    parser.add_argument("--eval_parts", type=int, default=1, help="Parts held out from the end of each filelist.")
    args = parser.parse_args(argv)
    try:
        paths, counts = split_file_list(args.file_list, args.output_dir, args.eval_parts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"train: {paths['train']} ({counts['train']} parts)\neval: {paths['eval']} ({counts['eval']} parts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
