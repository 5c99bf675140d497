"""Built-in sample dataset: coloured shapes on coloured backgrounds.

Written in the seed's part format (SPEC section 2) so the whole pipeline runs with
nothing downloaded. Captions name the shape, its colour, the background colour and
where the shape sits, e.g. "a red circle on a blue background, on the left".
Colours are the easiest thing for a tiny text-to-image model to learn; shape and position
come later, and `read_shape` reads all four back from a generated image for the demo's scores.
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
# Left and right sit a fifth of the image from the middle: far enough apart (6 px at 32 px,
# 1.6 latent pixels at f=4) that where the shape is carries weight in the loss.
POSITIONS = {"on the left": (0.3, 0.5), "on the right": (0.7, 0.5), "in the middle": (0.5, 0.5)}
# What the demo's shape score reads: a triangle's rows widen from its apex down (the top third
# of its rows is a fifth as wide as the bottom third); circle and square taper alike but a
# circle fills pi/4 of its bounding box and a square all of it.
TAPERS = {"triangle": 0.2, "round or square": 1.0}
FILL_RATIOS = {"circle": np.pi / 4, "square": 1.0}
SCORES = ("background", "shape colour", "shape", "position")


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
    centre = (cx + rng.uniform(-0.03, 0.03), cy + rng.uniform(-0.06, 0.06))
    radius = rng.uniform(0.22, 0.28)
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


def largest_region(mask):
    """The largest 4-connected region of a boolean mask (empty if the mask is)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    return labels == 1 + int(np.bincount(labels.ravel())[1:].argmax())


def distance_to(arr, colour):
    return ((arr - np.asarray(COLOURS[colour], dtype=np.float64)) ** 2).sum(axis=-1)


def classify(value, references):
    """The key of `references` whose value is nearest to `value`."""
    return min(references, key=lambda k: abs(references[k] - value))


def read_shape(image):
    """What a generated image shows: (background, shape colour, shape, position), each read
    from the pixels alone, or None for the three object attributes when there is no object.

    The background is the palette colour nearest the border's median; the object's colour the
    one nearest the median of the largest region of pixels of another palette colour; the
    object is the largest region of pixels nearer its colour than the background's. Its shape is
    a triangle if its rows widen downwards (TAPERS), else a circle or a square by the share of
    its bounding box it fills (FILL_RATIOS); its position the POSITIONS entry nearest the x of
    its centroid."""
    from scipy import ndimage

    arr = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = nearest_colour(np.median(border, axis=0))
    palette = np.asarray(list(COLOURS.values()), dtype=np.float64)
    nearest = ((arr[:, :, None, :] - palette) ** 2).sum(axis=-1).argmin(axis=-1)
    candidate = largest_region(nearest != list(COLOURS).index(background))
    # A few stray pixels are no object (under 1% of the image; the data's shapes fill 10% or more).
    if candidate.sum() < max(4, 0.01 * h * w):
        return background, None, None, None
    colour = nearest_colour(np.median(arr[candidate], axis=0))
    # The object: pixels nearer its colour than the background's. (Blurred edges mix the two
    # into a third palette colour now and then, which would stretch the bounding box.)
    # Opening with a 3 x 3 square drops the one-pixel fringes that blur and ringing leave
    # along edges, which would stretch the bounding box too.
    mask = largest_region(ndimage.binary_opening(distance_to(arr, colour) < distance_to(arr, background), np.ones((3, 3), bool)))
    if not mask.any():
        return background, colour, None, None
    ys, xs = np.nonzero(mask)
    widths = mask[ys.min() : ys.max() + 1].sum(axis=1)
    third = max(1, len(widths) // 3)
    taper = widths[:third].mean() / widths[-third:].mean()
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * len(widths))
    shape = "triangle" if classify(taper, TAPERS) == "triangle" else classify(fill, FILL_RATIOS)
    centre_x = (xs.mean() + 0.5) / w
    return (background, colour, shape,
            classify(centre_x, {name: xy[0] for name, xy in POSITIONS.items()}))


def follows_prompt(image, caption):
    """{score name: whether the image matches its prompt's background colour, shape colour,
    shape and position} for a generated image and its prompt (SCORES; see read_shape)."""
    seen = read_shape(image)
    _, colour, background, position = wanted = parse_caption(caption)
    return dict(zip(SCORES, (seen[0] == background, seen[1] == colour, seen[2] == wanted[0], seen[3] == position)))
