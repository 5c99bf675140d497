"""Wrong presets and flags stop both training scripts at start-up with one line naming them (exit 2)."""
import json
import sys

import pytest

from conftest import ldm_args, run_script
from ldm.training.args import DataArguments, LDMTrainingArguments, LoopArguments, ModelArguments, parse_args
from ldm.models.autoencoder import build_autoencoder
from ldm.models.ldm import build_text_encoder, build_unet


def with_typo(tmp_path, preset, key):
    """A copy of config/tiny/<preset> with one misspelt key added."""
    config = json.load(open(f"config/tiny/{preset}"))
    config[key] = 1
    path = tmp_path / preset
    path.write_text(json.dumps(config))
    return str(path)


def error_line(res):
    """The run's one error line, which must also be its last line on stderr."""
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], res.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("build,preset,key", [
    (lambda path: build_unet(path), "unet.json", "attention_head_dims"),
    (lambda path: build_text_encoder(path, 100, 16), "ldmbert.json", "encoder_layer"),
    (lambda path: build_autoencoder(path), "vae.json", "latent_chanels"),
])
def test_unknown_preset_key_is_named(tmp_path, build, preset, key):
    with pytest.raises(ValueError, match=f"unknown key '{key}'"):
        build(with_typo(tmp_path, preset, key))
    build(f"config/tiny/{preset}")  # the committed preset itself is accepted


TRAINER = (ModelArguments, DataArguments, LDMTrainingArguments)
LOOP = (ModelArguments, DataArguments, LoopArguments)
TRAINER_OK = ["--output_dir", "out", "--max_steps", "10"]


@pytest.mark.parametrize("classes,argv,named", [
    (TRAINER, ["--output_dir", "out"], "--max_steps must be > 0, got -1"),  # paddlenlp's default means epochs
    (TRAINER, TRAINER_OK + ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be > 0"),
    (TRAINER, TRAINER_OK + ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be > 0"),
    (TRAINER, TRAINER_OK + ["--logging_steps", "0"], "--logging_steps must be > 0"),
    (TRAINER, TRAINER_OK + ["--save_steps", "-5"], "--save_steps must be > 0, got -5"),
    (TRAINER, TRAINER_OK + ["--parts_per_window", "0"], "--parts_per_window must be > 0"),
    (TRAINER, TRAINER_OK + ["--max_aspect_ratio", "0.5"], "--max_aspect_ratio must be >= 1"),
    (LOOP, ["--train_batch_size", "0"], "--train_batch_size must be > 0"),
    (LOOP, ["--gradient_accumulation_steps", "-1"], "--gradient_accumulation_steps must be > 0"),
    (LOOP, ["--logging_steps", "0"], "--logging_steps must be > 0"),
    (LOOP, ["--save_steps", "0"], "--save_steps must be > 0"),
    (LOOP, ["--max_train_steps", "0"], "--max_train_steps must be > 0"),
    (LOOP, ["--resolution", "0"], "--resolution must be > 0"),
])
def test_non_positive_counts_stop_at_parse_time(monkeypatch, capsys, tmp_path, classes, argv, named):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        parse_args(*classes)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and named in err[-1]


def test_valid_counts_parse(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["script.py", *TRAINER_OK, "--max_aspect_ratio", "3"])
    _, data_args, training_args = parse_args(*TRAINER)
    assert training_args.max_steps == 10 and data_args.max_aspect_ratio == 3.0 and data_args.parts_per_window >= 1


def test_trainer_script_names_a_bad_flag_and_a_bad_preset_key(shapes, vae_dir, tmp_path):
    res = run_script(ldm_args(shapes, vae_dir, tmp_path / "a", 0), timeout=120)
    assert res.returncode == 2 and "--max_steps must be > 0, got 0" in error_line(res)
    unet = with_typo(tmp_path, "unet.json", "cross_attention_dims")
    res = run_script(ldm_args(shapes, vae_dir, tmp_path / "b", 2, ["--unet_config_file", unet]), timeout=120)
    assert res.returncode == 2 and f"--unet_config_file '{unet}': unknown key 'cross_attention_dims'" in error_line(res)


def test_no_trainer_script_names_a_bad_flag_and_a_bad_preset_key(shapes, vae_dir, tmp_path):
    def args(out, *extra):
        return ["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "2",
                "--max_train_steps", "2", "--vae_name_or_path", str(vae_dir), "--file_list", shapes["file_list"],
                "--text_encoder_config_file", "config/tiny/ldmbert.json", "--unet_config_file", "config/tiny/unet.json",
                "--tokenizer_name", shapes["tokenizer"], "--model_max_length", "16", "--resolution", "32", *extra]

    res = run_script(args(tmp_path / "a", "--logging_steps", "0"), timeout=120)
    assert res.returncode == 2 and "--logging_steps must be > 0, got 0" in error_line(res)
    ldmbert = with_typo(tmp_path, "ldmbert.json", "encoder_layer")
    res = run_script(args(tmp_path / "b", "--text_encoder_config_file", ldmbert), timeout=120)
    assert res.returncode == 2 and f"--text_encoder_config_file '{ldmbert}': unknown key 'encoder_layer'" in error_line(res)


def test_train_vae_names_a_bad_preset_key(shapes, tmp_path):
    vae = with_typo(tmp_path, "vae.json", "latent_chanels")
    res = run_script(["train_vae.py", "--do_train", "--file_list", shapes["file_list"], "--output_dir", str(tmp_path / "vae"),
                      "--resolution", "32", "--max_steps", "2", "--vae_config_file", vae], timeout=120)
    assert res.returncode == 2 and "unknown key 'latent_chanels'" in error_line(res)
