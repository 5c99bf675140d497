"""Built-in sample dataset: coloured shapes on coloured backgrounds.

Written in the seed's part format (SPEC section 2) so the whole pipeline runs with
nothing downloaded. Captions name the shape, its colour, the background colour and
where the shape sits, e.g. "a red circle on a blue background, on the left".
Colours are the easiest thing for a tiny text-to-image model to learn, which is
what makes the demo's samples visibly follow their prompts within minutes on a CPU.
"""
import argparse
import base64
import gzip
import io
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"on the left": (0.36, 0.5), "on the right": (0.64, 0.5), "in the middle": (0.5, 0.5)}


def draw_shape(shape, colour, background, centre, radius, size):
    """Return a size x size RGB image of one filled shape."""
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    cx, cy = centre[0] * size, centre[1] * size
    r = radius * size
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    return image


def caption_for(shape, colour, background, position):
    return f"a {colour} {shape} on a {background} background, {position}"


def random_record(rng, size):
    """One (caption, image) pair; foreground and background colours always differ."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLOURS)
    colour, background = rng.choice(names, size=2, replace=False)
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    cx, cy = POSITIONS[position]
    # Small jitter in place and size so the model learns a distribution, not fixed images.
    # Shapes are large (a fifth of the image or more) so their colour carries weight in the loss.
    centre = (cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.06, 0.06))
    radius = rng.uniform(0.22, 0.30)
    return caption_for(shape, colour, background, position), draw_shape(shape, colour, background, centre, radius, size)


def encode_line(caption, image, fmt="JPEG"):
    """One record in the seed's format: caption, placeholder, base64 image."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=95) if fmt == "JPEG" else image.save(buf, format=fmt)
    return f"{caption}\t_\t{base64.b64encode(buf.getvalue()).decode('ascii')}\n"


def write_sample_dataset(out_dir, num_parts=4, records_per_part=500, size=64, seed=0):
    """Write gzipped parts, a filelist and a file list list; return the list's path."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    part_paths = []
    for p in range(num_parts):
        path = os.path.join(out_dir, f"part-{p:05d}.gz")
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for _ in range(records_per_part):
                f.write(encode_line(*random_record(rng, size)))
        part_paths.append(path)
    filelist = os.path.join(out_dir, "shapes.filelist")
    with open(filelist, "w") as f:
        f.write("\n".join(part_paths) + "\n")
    file_list = os.path.join(out_dir, "train.filelist.list")
    with open(file_list, "w") as f:
        f.write(filelist + "\n")
    return file_list


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="data/shapes", help="Directory the parts and lists are written to.")
    parser.add_argument("--num_parts", type=int, default=4, help="Number of gzipped part files.")
    parser.add_argument("--records_per_part", type=int, default=500, help="Captioned images in each part.")
    parser.add_argument("--size", type=int, default=64, help="Side of the square images, in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generator; the same seed writes the same data.")
    args = parser.parse_args()
    file_list = write_sample_dataset(args.output_dir, args.num_parts, args.records_per_part, args.size, args.seed)
    print(file_list)


if __name__ == "__main__":
    main()


def parse_caption(caption):
    """(shape, colour, background, position) of a caption written by caption_for, else None."""
    words = caption.replace(",", "").split()
    try:
        colour, shape, background = words[1], words[2], words[5]
        position = " ".join(words[7:])
    except IndexError:
        return None
    if colour in COLOURS and background in COLOURS and shape in SHAPES and position in POSITIONS:
        return shape, colour, background, position
    return None


def nearest_colour(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLOURS, key=lambda name: float(((np.asarray(COLOURS[name]) - rgb) ** 2).sum()))


def follows_prompt(image, caption):
    """(background matches, shape colour matches) for a generated image and its prompt.

    The background is read from the image border, the shape's colour from a small patch
    at the centre the caption's position names; each is snapped to the nearest palette colour.
    """
    _, colour, background, position = parse_caption(caption)
    arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    cx, cy = POSITIONS[position]
    x, y, r = int(cx * w), int(cy * h), max(1, w // 16)
    patch = arr[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3)
    return nearest_colour(np.median(border, axis=0)) == background, nearest_colour(np.median(patch, axis=0)) == colour
