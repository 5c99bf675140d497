"""bench/quality.py end to end at a minimal budget (the real scripts, 2 steps a stage, 1 seed), and
the scorer it relies on."""
import json
import re

import numpy as np
from conftest import run_script


def test_the_quality_benchmark_runs_both_stages_samples_and_ends_with_the_median_line(tmp_path):
    """With make demo's preset, so the per-seed demo scores (the demo's prompts, 4 a prompt) are run too."""
    out = tmp_path / "quality"
    res = run_script(["bench/quality.py", "--preset", "demo", "--seeds", "3", "--vae_steps", "2", "--ldm_steps", "2", "--batch_size", "4",
                      "--processes", "1", "--num_parts", "1", "--records_per_part", "16", "--num_prompts", "3",
                      "--samples_per_prompt", "1", "--sample_steps", "4", "--output_dir", str(out),
                      "--stage2_args", "--warmup_steps 1"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    last = re.fullmatch(r"quality: prompt-following (\S+) median (\S+) of 1 seeds \(spread (\S+)\)", lines[-1])
    assert last, lines[-1]
    score, median = float(last.group(1)), float(last.group(2))
    assert 0 <= score <= 1 and median == score
    seed_line = next(line for line in lines if line.startswith("seed 3: "))
    shares = [float(x) for x in re.findall(r"(?:background|shape colour|shape|position) ([0-9.]+)", seed_line)]
    assert len(shares) == 4 and all(0 <= s <= 1 for s in shares)
    assert abs(np.mean(shares) - score) < 2e-3  # the seed's score is the mean of its four attribute shares
    ceiling = lines[lines.index(seed_line) + 1]  # what the seed's autoencoder allows, by the same scorer
    assert "autoencoder's round trip" in ceiling and 0 <= float(ceiling.rsplit("-> ", 1)[1]) <= 1
    demo = re.fullmatch(r"    demo scores: background (\d+)/6, shape colour (\d+)/6, shape (\d+)/6, position (\d+)/6", lines[lines.index(seed_line) + 2])
    assert demo and all(0 <= int(n) <= 6 for n in demo.groups())
    # What the seed's run left: an exported pipeline (the stock layout), its grid and its scores.
    seed_dir = out / "seed-3"
    assert (seed_dir / "ldm" / "model_index.json").is_file() and (seed_dir / "samples.png").is_file()
    assert json.loads((seed_dir / "ldm" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"  # the demo's recipe
    assert json.loads((seed_dir / "ldm" / "unet" / "config.json").read_text())["sample_size"] == 16  # the demo's f=2 autoencoder
    assert json.loads((seed_dir / "scores.json").read_text())["samples"] == 3


def test_the_scorer_reads_back_every_attribute_of_the_sets_own_renders_at_32_px():
    """The benchmark's scale is only as good as its scorer: on real images of the set (rendered at
    64 px as the parts are, resized to the 32 px the model is trained and sampled at), it must read
    background, shape colour, shape and position right every time."""
    from ldm.data.sample_data import SCORES, follows_prompt, random_record

    rng = np.random.default_rng(5)
    matched = dict.fromkeys(SCORES, 0)
    for _ in range(100):
        caption, image = random_record(rng, 64)
        for name, ok in follows_prompt(image.resize((32, 32)), caption).items():
            matched[name] += ok
    assert matched == dict.fromkeys(SCORES, 100)
