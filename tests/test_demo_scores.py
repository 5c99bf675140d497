"""The demo's scores (SPEC section 1): what ldm.sample_data reads from a sample's pixels."""
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.data.sample_data import COLOURS, POSITIONS, SCORES, SHAPES, caption_for, draw_shape, follows_prompt, random_record, read_shape


def drawn(shape, position, size=32, colour="red", background="blue", radius=0.25, dx=0.0):
    cx, cy = POSITIONS[position]
    return draw_shape(shape, colour, background, (cx + dx, cy), radius, size)


@pytest.mark.parametrize("size", [32, 64])
def test_every_shape_and_position_drawn_scores_right(size):
    for shape, position, (colour, background) in zip(*zip(*itertools.product(SHAPES, POSITIONS)), itertools.cycle(itertools.permutations(COLOURS, 2))):
        image = drawn(shape, position, size, colour, background)
        assert read_shape(image) == (background, colour, shape, position)


def test_training_images_score_right_as_the_model_sees_them():
    """The generator's jittered records, drawn at 64 px and resized to 32 (as --resolution 32
    does) and blurred a little, all match their captions on all four scores."""
    rng = np.random.default_rng(5)
    for _ in range(60):
        caption, image = random_record(rng, 64)
        for seen in (image, image.resize((32, 32), Image.BICUBIC), image.resize((32, 32), Image.BILINEAR).filter(ImageFilter.GaussianBlur(0.6))):
            assert follows_prompt(seen, caption) == dict.fromkeys(SCORES, True), caption


def test_off_prompt_images_score_wrong():
    for (shape, other_shape), position in itertools.product(itertools.permutations(SHAPES, 2), POSITIONS):
        assert follows_prompt(drawn(shape, position), caption_for(other_shape, "red", "blue", position)) == {
            "background": True, "shape colour": True, "shape": False, "position": True}
    for (position, other_position), shape in itertools.product(itertools.permutations(POSITIONS, 2), SHAPES):
        assert follows_prompt(drawn(shape, position), caption_for(shape, "red", "blue", other_position)) == {
            "background": True, "shape colour": True, "shape": True, "position": False}
    assert follows_prompt(drawn("circle", "on the left"), caption_for("circle", "yellow", "white", "on the left")) == {
        "background": False, "shape colour": False, "shape": True, "position": True}


def test_no_object_scores_only_the_background():
    plain = Image.new("RGB", (32, 32), COLOURS["green"])
    speckled = np.array(plain)
    speckled[5, 7] = speckled[20, 11] = COLOURS["red"]  # two stray pixels are no shape
    for image in (plain, Image.fromarray(speckled)):
        assert read_shape(image) == ("green", None, None, None)
        assert follows_prompt(image, caption_for("square", "red", "green", "in the middle")) == {
            "background": True, "shape colour": False, "shape": False, "position": False}


def test_the_largest_object_counts_and_a_fringe_does_not_stretch_it():
    """A stray blob elsewhere is not the object; one-pixel fringes of a third colour along the
    edges (as ringing between two colours leaves) do not make a square look like a circle."""
    image = np.array(drawn("square", "on the right", 64))
    image[4:8, 4:8] = COLOURS["red"]
    image[46:51, 32] = image[46:51, 57] = COLOURS["black"]  # one-pixel spurs of the colour red and blue mix to
    assert read_shape(Image.fromarray(image)) == ("blue", "red", "square", "on the right")


def test_sample_grid_counts_every_score(stock_pipeline_dir, tmp_path):
    from ldm.evaluation.sampling import sample_grid

    prompts = [caption_for("circle", "red", "blue", "on the left"), "not a caption of the sample data"]
    path, matches, total = sample_grid(str(stock_pipeline_dir), prompts, 2, str(tmp_path / "grid.png"), steps=2)
    assert total == 2 and list(matches) == list(SCORES) and all(0 <= n <= total for n in matches.values())
    grid = Image.open(path)
    assert grid.size[1] >= 2 * (96 + 14) and grid.size[0] >= 2 * 96  # two rows of two cells (>= 96 px), each under a caption line
