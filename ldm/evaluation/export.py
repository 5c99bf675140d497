"""Share a trained model: a pipeline directory in Paddle's layout, in PyTorch diffusers' layout, or both.

    python -m ldm.export --model_dir DIR --output_dir OUT --format diffusers [--no_ema] [--license mit]

DIR is a pipeline directory or a `checkpoint-N` of either training script (EMA weights unless
--no_ema), read through `ldm.loading.load_pipeline`, so an export samples what generate.py
samples. The two layouts hold the same weights:
  * paddle: what stock `ppdiffusers.LDMTextToImagePipeline.from_pretrained` loads (Linear
    weights stored [in, out], `model_index.json` naming ppdiffusers). The training scripts'
    default final directory.
  * diffusers: what PyTorch `diffusers.LDMTextToImagePipeline.from_pretrained` loads as it is
    (Linear weights [out, in], `model_index.json` naming diffusers and transformers classes),
    written by ppdiffusers' own `save_pretrained(..., to_diffusers=True)`; safetensors only.
    ppdiffusers reads it back too (its loader maps the names), which is how the tests check it
    without PyTorch; `bench/torch_parity.py` checks it in PyTorch.
Every exported directory gets a model card (README.md, `ldm.model_card`).
"""
import argparse
import json
import os
import sys
from typing import List, Optional

from ldm.evaluation.model_card import diffusers_caveat

FORMATS = ("paddle", "diffusers", "both")
# With --export_format both the diffusers copy goes into this subdirectory of the output
# directory: the top level stays the Paddle layout every existing command reads (SPEC section 3).
DIFFUSERS_SUBDIR = "diffusers"
# What a diffusers-layout model_index.json may name: diffusers' and transformers' classes, and
# diffusers' own LDMBert, which lives in its pipeline package (["latent_diffusion", "LDMBertModel"],
# exactly as diffusers' CompVis/ldm-text2im-large-256 names it).
DIFFUSERS_LIBRARIES = ("diffusers", "transformers", "latent_diffusion")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pdparams", ".pdopt", ".pkl", ".pickle")


def export_dirs(output_dir: str, export_format: str) -> List[tuple]:
    """[(layout, directory)] that `--export_format` writes for a run's final `output_dir`."""
    if export_format not in FORMATS:
        raise ValueError(f"--export_format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    if export_format == "both":
        return [("paddle", output_dir), ("diffusers", os.path.join(output_dir, DIFFUSERS_SUBDIR))]
    return [(export_format, output_dir)]


def save_layout(pipe, output_dir: str, layout: str) -> None:
    """Write `pipe` in one layout ('paddle' or 'diffusers')."""
    if layout == "paddle":
        pipe.save_pretrained(output_dir)
        return
    pipe.save_pretrained(output_dir, to_diffusers=True)
    caveat = diffusers_caveat(pipe)
    if caveat:
        print(f"warning: {output_dir}: {caveat}", file=sys.stderr)
    _drop_local_paths(os.path.join(output_dir, "tokenizer", "tokenizer_config.json"))
    check_diffusers_dir(output_dir)


def _drop_local_paths(tokenizer_config: str) -> None:
    """paddlenlp records where the training tokenizer's special_tokens_map.json was on the
    training machine (an absolute path); a shared model should not carry it, and transformers
    needs it not (the map is saved beside it)."""
    if not os.path.isfile(tokenizer_config):
        return
    with open(tokenizer_config, encoding="utf-8") as f:
        config = json.load(f)
    if config.pop("special_tokens_map_file", None) is not None:
        with open(tokenizer_config, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)


def check_diffusers_dir(path: str) -> None:
    """Raise ValueError unless `path` is what PyTorch users get: no pickled file anywhere, and a
    model_index.json naming diffusers/transformers classes alone. Guards against a ppdiffusers
    upgrade quietly writing `.pdparams` or Paddle library names into the export."""
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    components = [name for name, entry in index.items() if isinstance(entry, list) and entry]
    for name in components:
        if index[name][0] not in DIFFUSERS_LIBRARIES:
            raise ValueError(f"diffusers export {path}: model_index.json names {index[name][0]}.{index[name][1]} for {name}, not a diffusers or transformers class")
        # Only the components' folders: a run's final directory also holds its checkpoint-N/
        # (optimizer and RNG state are Paddle pickles), which no diffusers loader reads.
        for root, _, files in os.walk(os.path.join(path, name)):
            for file in files:
                if file.endswith(PICKLE_SUFFIXES):
                    raise ValueError(f"diffusers export {path}: {os.path.join(root, file)} is a pickle; the export must be safetensors only")


def export_pipeline(pipe, output_dir: str, export_format: str, card: Optional[dict] = None) -> List[str]:
    """Write `pipe` in `export_format` ('paddle', 'diffusers' or 'both'), each directory with its
    model card (`card`: the facts `ldm.model_card.collect` gathered); returns the directories."""
    from ldm.evaluation.model_card import write_card

    written = []
    for layout, directory in export_dirs(output_dir, export_format):
        save_layout(pipe, directory, layout)
        if card is not None:
            write_card(directory, dict(card, layout=layout))
        written.append(directory)
    return written


def save_final(model, output_dir: str, export_format: str = "paddle", weights: str = "", command: Optional[List[str]] = None) -> List[str]:
    """A run's final save of `model` (an ldm.models.ldm.LatentDiffusionModel): the pipeline in `export_format` (ldm.export: paddle in output_dir,
    diffusers in output_dir or, for 'both', output_dir/diffusers/), each with a model card
    built from the run's newest checkpoint in output_dir and `command` (the training command
    line). Returns the directories written."""
    from ldm.evaluation.model_card import collect

    pipe = model.to_pipeline()
    try:
        card = collect(pipe, output_dir, weights=weights, command=command)
    except Exception as e:  # noqa: BLE001 - weeks of training must not be lost to a card's unreadable log file
        from paddlenlp.utils.log import logger

        logger.warning(f"model card not written ({type(e).__name__}: {e}); the weights are saved; python -m ldm.export writes one later")
        card = None
    return export_pipeline(pipe, output_dir, export_format, card)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ldm.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="A pipeline directory or a checkpoint-N directory of either training script.")
    parser.add_argument("--output_dir", required=True, help="Where the exported pipeline directory (and its README.md model card) is written.")
    parser.add_argument("--format", choices=FORMATS, default="diffusers",
                        help=f"diffusers: PyTorch diffusers' layout (safetensors, loads in diffusers.LDMTextToImagePipeline); paddle: "
                             f"ppdiffusers' layout; both: paddle in --output_dir and diffusers in --output_dir/{DIFFUSERS_SUBDIR}/.")
    parser.add_argument("--no_ema", action="store_true", help="From a checkpoint, export the raw trained weights instead of its EMA weights.")
    parser.add_argument("--license", default="other", help="The model card's license (a model-hub license id, e.g. mit, apache-2.0, openrail); 'other' if unset.")
    parser.add_argument("--fid_csv", help="fid.csv written by python -m ldm.evaluate for this model, quoted in the model card (else the card says FID was not measured).")
    parser.add_argument("--trust_pickle", action="store_true", help="Also read pickled weights (an old Trainer checkpoint's model_state.pdparams): only for files you trust.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from ldm.evaluation.loading import load_pipeline
    from ldm.evaluation.model_card import collect
    from ldm.training.runtime import exit_on_bad_input, require_writable_dir

    try:
        if os.path.abspath(args.output_dir) == os.path.abspath(args.model_dir):
            raise ValueError("--output_dir must differ from --model_dir (the export would overwrite the weights it reads)")
        if args.fid_csv and not os.path.isfile(args.fid_csv):
            raise ValueError(f"--fid_csv {args.fid_csv!r} does not exist")
        require_writable_dir(args.output_dir)
        pipe, weights = load_pipeline(args.model_dir, use_ema=not args.no_ema, trust_pickle=args.trust_pickle)
        card = collect(pipe, args.model_dir, license=args.license, weights=weights, fid_csv=args.fid_csv)
    except ValueError as e:
        exit_on_bad_input(e)
    for directory in export_pipeline(pipe, args.output_dir, args.format, card):
        print(f"wrote {directory} ({weights} weights) with its model card {os.path.join(directory, 'README.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
