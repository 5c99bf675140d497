"""Sharing a model: --export_format and `python -m ldm.export` (the PyTorch diffusers layout), the
model card, and `python -m ldm.evaluate --folders A B`.

PyTorch is not in the suite: the diffusers layout is checked by reading it back with ppdiffusers'
diffusers reader (same images for the same seed) and against the weight names and shapes
diffusers' classes define, tabulated below from diffusers' source; `bench/torch_parity.py` runs
the real PyTorch classes where they are installed."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from conftest import ldm_args, run_script
from ldm.evaluation.export import DIFFUSERS_SUBDIR

STEPS = 2
# The Trainer script's checkpoint-N keeps its weights in the Trainer's model_state.pdparams (a
# pickle we wrote ourselves), so exporting it needs --trust_pickle; the explicit loop's needs not.
TRUST = ["--trust_pickle"]


@pytest.fixture(scope="module")
def run(shapes, vae_dir, tmp_path_factory):
    """A 2-step tiny Trainer run with validation, exported as --export_format both."""
    out = tmp_path_factory.mktemp("export") / "run"
    res = run_script(ldm_args(shapes, vae_dir, out, STEPS, ["--save_steps", str(STEPS), "--use_ema", "--ema_decay", "0.5",
                                                            "--eval_file_list", shapes["file_list"], "--eval_records", "8",
                                                            "--eval_steps", str(STEPS), "--export_format", "both"]))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def read_index(path):
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)


def front_matter(card_text):
    assert card_text.startswith("---\n")
    head = card_text.split("---\n")[1]
    keys = {}
    for line in head.splitlines():
        if ":" in line and not line.startswith("-"):
            k, v = line.split(":", 1)
            keys[k.strip()] = v.strip()
    return keys, [ln[2:] for ln in head.splitlines() if ln.startswith("- ")]


# ---------------------------------------------------------------------------
# --export_format both, the layouts and the model card
# ---------------------------------------------------------------------------


def test_export_format_both_writes_each_layout_with_a_card(run):
    paddle_index, diffusers_index = read_index(run), read_index(run / "diffusers")
    assert paddle_index["unet"] == ["ppdiffusers", "UNet2DConditionModel"]
    # diffusers' own naming: its classes, transformers' tokenizer, and diffusers' LDMBert (in its pipeline package).
    assert {k: v for k, v in diffusers_index.items() if isinstance(v, list)} == {
        "bert": ["latent_diffusion", "LDMBertModel"], "scheduler": ["diffusers", "DDIMScheduler"], "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vqvae": ["diffusers", "AutoencoderKL"]}
    files = [os.path.relpath(os.path.join(r, f), run / "diffusers") for r, _, fs in os.walk(run / "diffusers") for f in fs]
    weights = sorted(f for f in files if f.endswith((".safetensors", ".bin", ".pdparams", ".pt", ".pth", ".ckpt")))
    assert weights == ["bert/model.safetensors", "unet/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors"]
    assert "special_tokens_map_file" not in json.loads((run / "diffusers" / "tokenizer" / "tokenizer_config.json").read_text())

    for layout, directory in (("ppdiffusers", run), ("diffusers", run / "diffusers")):
        card = (directory / "README.md").read_text()
        keys, tags = front_matter(card)
        assert keys["library_name"] == layout and keys["pipeline_tag"] == "text-to-image" and keys["license"] == "other"
        assert "text-to-image" in tags
        assert f"- Steps: {STEPS} (checkpoint checkpoint-{STEPS})" in card
        assert f"- Records seen: {STEPS * 4} (steps x batch)" in card
        assert "- Records skipped: none" in card and "- EMA: decay 0.5" in card
        assert f"- Validation loss at step {STEPS}: " in card and "q4 " in card
        assert "- FID: not measured." in card
        assert "--export_format both" in card.split("## Training command")[1]
    # The tiny preset reads 16-token prompts; the diffusers card says what that means there.
    assert "pads every prompt to 77 tokens" in (run / "diffusers" / "README.md").read_text()


def test_diffusers_check_refuses_pickles_and_paddle_names(run, tmp_path):
    """The guard on every diffusers export (a ppdiffusers upgrade writing .pdparams or Paddle names
    would otherwise reach PyTorch users silently); a run's checkpoint-N/ beside it is not its business."""
    import shutil

    from ldm.evaluation.export import check_diffusers_dir

    check_diffusers_dir(str(run / "diffusers"))
    copy = tmp_path / "d"
    shutil.copytree(run / "diffusers", copy)
    shutil.copytree(run / f"checkpoint-{STEPS}", copy / f"checkpoint-{STEPS}")  # pickles outside the components: fine
    check_diffusers_dir(str(copy))
    (copy / "bert" / "model_state.pdparams").write_bytes(b"")
    with pytest.raises(ValueError, match="model_state.pdparams is a pickle"):
        check_diffusers_dir(str(copy))
    (copy / "bert" / "model_state.pdparams").unlink()
    (copy / "model_index.json").write_text((copy / "model_index.json").read_text().replace('"diffusers"', '"ppdiffusers"'))
    with pytest.raises(ValueError, match="names ppdiffusers"):
        check_diffusers_dir(str(copy))


def test_card_counts_skips_and_says_not_measured(run, tmp_path):
    """A checkpoint whose data positions recorded skips, exported without the run's VisualDL
    records: the card sums the skips over ranks and workers and says what was not measured."""
    import shutil

    ckpt = tmp_path / f"checkpoint-{STEPS}"
    shutil.copytree(run / f"checkpoint-{STEPS}", ckpt)
    from ldm.data.records import SKIP_REASONS

    position = json.loads((ckpt / "data_position_rank0.json").read_text())
    vector = [0] * len(SKIP_REASONS)
    vector[SKIP_REASONS.index("too_small")], vector[SKIP_REASONS.index("bad_base64")] = 5, 2
    position["workers"] = {"0": dict(position["workers"]["0"], skips=vector), "1": dict(position["workers"]["0"], skips=vector)}
    (ckpt / "data_position_rank0.json").write_text(json.dumps(position))
    (ckpt / "data_position_rank1.json").write_text(json.dumps(position))
    # The run's VisualDL records, cut off mid-write as a kill leaves them: left out and named, no crash.
    # (Where the cut lands decides whether the reader fails: at a record boundary the prefix reads fine,
    # as happened in one make test. So the cut is moved from the middle until this reader fails on it.)
    from visualdl import LogReader

    from ldm.evaluation.model_card import validation_scalars

    record = next(p for p in sorted((run / "runs").rglob("vdlrecords*")) if p.is_file() and p.stat().st_size > 100)
    (tmp_path / "runs").mkdir()
    data, cut_file = record.read_bytes(), tmp_path / "runs" / record.name
    for cut in range(len(data) // 2, len(data), 3):
        cut_file.write_bytes(data[:cut])
        try:
            validation_scalars(LogReader(file_path=str(cut_file)))
        except Exception:  # noqa: BLE001 - protobuf's DecodeError, as the card's reader meets it
            break
    else:
        pytest.fail(f"no cut of {record.name} made it unreadable")
    out = tmp_path / "exported"
    res = run_script(["-m", "ldm.export", "--model_dir", str(ckpt), "--output_dir", str(out), "--format", "diffusers", "--license", "mit", *TRUST])
    assert res.returncode == 0, res.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert front_matter(card)[0]["license"] == "mit"
    assert "- Records skipped: too_small 20, bad_base64 8 (summed over the 2 rank(s)" in card
    assert f"- Unreadable VisualDL record files (cut off mid-write?), left out: runs/{record.name}" in card
    assert "- Validation loss: not recorded (its VisualDL record files are unreadable)." in card and "- FID: not measured." in card
    assert "```bash\nnot recorded\n```" in card
    assert "EMA" in card.split("Weights: ")[1].split("\n")[0]


# ---------------------------------------------------------------------------
# The diffusers layout samples what the model samples
# ---------------------------------------------------------------------------


def sample(model_dir, use_ema=True):
    from ldm.evaluation.loading import generate, load_pipeline, to_uint8_array, trained_size

    pipe, _ = load_pipeline(str(model_dir), use_ema=use_ema, trust_pickle=True)
    size = trained_size(pipe)
    prompts = ["a red circle", "a blue square on a green background"]
    return to_uint8_array(generate(pipe, prompts, size, size, num_inference_steps=3, guidance_scale=7.5, seed=11))


def test_diffusers_export_samples_the_same_images(run, tmp_path):
    """checkpoint-N -> python -m ldm.export --format diffusers -> ppdiffusers' diffusers reader:
    the same images, bit for bit, as the checkpoint and the run's own directories (the same
    float32 weights, only transposed and renamed)."""
    out = tmp_path / "diffusers"
    res = run_script(["-m", "ldm.export", "--model_dir", str(run / f"checkpoint-{STEPS}"), "--output_dir", str(out), "--format", "diffusers", *TRUST])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pads every prompt to 77 tokens" in res.stderr  # the tiny preset's 16-token prompts (ldm.export.diffusers_caveat)
    original = sample(run / f"checkpoint-{STEPS}")
    for directory in (out, run / "diffusers", run):
        images = sample(directory)
        assert images.shape == original.shape == (2, 32, 32, 3)
        assert np.abs(images.astype(int) - original.astype(int)).max() == 0, directory
    # --no_ema exports the raw weights: other images (EMA decay 0.5 over 2 steps differs from raw).
    raw = tmp_path / "raw"
    assert run_script(["-m", "ldm.export", "--model_dir", str(run / f"checkpoint-{STEPS}"), "--output_dir", str(raw), "--no_ema", *TRUST]).returncode == 0
    assert np.array_equal(sample(raw), sample(run / f"checkpoint-{STEPS}", use_ema=False))
    assert not np.array_equal(sample(raw), original)


def test_export_bad_input_is_one_line(run, tmp_path):
    res = run_script(["-m", "ldm.export", "--model_dir", str(run), "--output_dir", str(run)])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --output_dir must differ")
    res = run_script(["-m", "ldm.export", "--model_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")])
    assert res.returncode == 2 and "neither model_index.json" in res.stderr.strip().splitlines()[-1]
    res = run_script(["train_txt2img_laion400m_no_trainer.py", "--export_format", "onnx", "--output_dir", str(tmp_path / "x")])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --export_format must be paddle, diffusers or both")


# ---------------------------------------------------------------------------
# Weight names and shapes diffusers' classes expect (from diffusers' module definitions:
# models/unets/unet_2d_condition.py, unet_2d_blocks.py, resnet.py, transformers/transformer_2d.py,
# attention.py (BasicTransformerBlock, FeedForward with GEGLU), attention_processor.py
# (Attention), autoencoders/vae.py (Encoder/Decoder), autoencoder_kl.py, and
# pipelines/latent_diffusion/pipeline_latent_diffusion.py (LDMBert*)). Linear weights are
# torch's [out, in]; convolutions [out, in, kh, kw].
# ---------------------------------------------------------------------------


def linear(name, out, inp, bias=True):
    return {f"{name}.weight": (out, inp), **({f"{name}.bias": (out,)} if bias else {})}


def conv(name, out, inp, k):
    return {f"{name}.weight": (out, inp, k, k), f"{name}.bias": (out,)}


def norm(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def resnet(name, inp, out, temb=None):
    """ResnetBlock2D: conv_shortcut only when the channels change; time_emb_proj only with a time embedding."""
    t = {**norm(f"{name}.norm1", inp), **conv(f"{name}.conv1", out, inp, 3), **norm(f"{name}.norm2", out), **conv(f"{name}.conv2", out, out, 3)}
    if temb:
        t.update(linear(f"{name}.time_emb_proj", out, temb))
    if inp != out:
        t.update(conv(f"{name}.conv_shortcut", out, inp, 1))
    return t


def transformer_2d(name, c, cross):
    """Transformer2DModel (use_linear_projection False: 1x1 conv projections; inner dim = c) with one BasicTransformerBlock."""
    b = f"{name}.transformer_blocks.0"
    t = {**norm(f"{name}.norm", c), **conv(f"{name}.proj_in", c, c, 1), **conv(f"{name}.proj_out", c, c, 1)}
    for attn, kv in (("attn1", c), ("attn2", cross)):
        t.update({**linear(f"{b}.{attn}.to_q", c, c, False), **linear(f"{b}.{attn}.to_k", c, kv, False),
                  **linear(f"{b}.{attn}.to_v", c, kv, False), **linear(f"{b}.{attn}.to_out.0", c, c)})
    t.update({**norm(f"{b}.norm1", c), **norm(f"{b}.norm2", c), **norm(f"{b}.norm3", c),
              **linear(f"{b}.ff.net.0.proj", 8 * c, c), **linear(f"{b}.ff.net.2", c, 4 * c)})  # GEGLU: 2 x (4 c)
    return t


def diffusers_unet(cfg):
    ch, layers, cross = cfg["block_out_channels"], cfg["layers_per_block"], cfg["cross_attention_dim"]
    temb = 4 * ch[0]
    t = {**conv("conv_in", ch[0], cfg["in_channels"], 3), **linear("time_embedding.linear_1", temb, ch[0]), **linear("time_embedding.linear_2", temb, temb)}
    out_c = ch[0]
    for i, kind in enumerate(cfg["down_block_types"]):
        in_c, out_c = out_c, ch[i]
        for j in range(layers):
            t.update(resnet(f"down_blocks.{i}.resnets.{j}", in_c if j == 0 else out_c, out_c, temb))
            if kind.startswith("CrossAttn"):
                t.update(transformer_2d(f"down_blocks.{i}.attentions.{j}", out_c, cross))
        if i < len(ch) - 1:
            t.update(conv(f"down_blocks.{i}.downsamplers.0.conv", out_c, out_c, 3))
    t.update({**resnet("mid_block.resnets.0", ch[-1], ch[-1], temb), **transformer_2d("mid_block.attentions.0", ch[-1], cross),
              **resnet("mid_block.resnets.1", ch[-1], ch[-1], temb)})
    rev = list(reversed(ch))
    out_c = rev[0]
    for i, kind in enumerate(cfg["up_block_types"]):
        prev, out_c, in_c = out_c, rev[i], rev[min(i + 1, len(ch) - 1)]
        for j in range(layers + 1):
            skip = in_c if j == layers else out_c
            t.update(resnet(f"up_blocks.{i}.resnets.{j}", (prev if j == 0 else out_c) + skip, out_c, temb))
            if kind.startswith("CrossAttn"):
                t.update(transformer_2d(f"up_blocks.{i}.attentions.{j}", out_c, cross))
        if i < len(ch) - 1:
            t.update(conv(f"up_blocks.{i}.upsamplers.0.conv", out_c, out_c, 3))
    t.update({**norm("conv_norm_out", ch[0]), **conv("conv_out", cfg["out_channels"], ch[0], 3)})
    return t


def vae_mid(name, c):
    """UNetMidBlock2D of the autoencoder: resnet, a single-head Attention with biases and group_norm, resnet."""
    a = f"{name}.attentions.0"
    return {**resnet(f"{name}.resnets.0", c, c), **resnet(f"{name}.resnets.1", c, c), **norm(f"{a}.group_norm", c),
            **linear(f"{a}.to_q", c, c), **linear(f"{a}.to_k", c, c), **linear(f"{a}.to_v", c, c), **linear(f"{a}.to_out.0", c, c)}


def diffusers_autoencoder_kl(cfg):
    ch, layers, lat = cfg["block_out_channels"], cfg["layers_per_block"], cfg["latent_channels"]
    t = {**conv("encoder.conv_in", ch[0], cfg["in_channels"], 3)}
    out_c = ch[0]
    for i in range(len(ch)):
        in_c, out_c = out_c, ch[i]
        for j in range(layers):
            t.update(resnet(f"encoder.down_blocks.{i}.resnets.{j}", in_c if j == 0 else out_c, out_c))
        if i < len(ch) - 1:
            t.update(conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", out_c, out_c, 3))
    t.update({**vae_mid("encoder.mid_block", ch[-1]), **norm("encoder.conv_norm_out", ch[-1]), **conv("encoder.conv_out", 2 * lat, ch[-1], 3),
              **conv("quant_conv", 2 * lat, 2 * lat, 1), **conv("post_quant_conv", lat, lat, 1),
              **conv("decoder.conv_in", ch[-1], lat, 3), **vae_mid("decoder.mid_block", ch[-1])})
    rev = list(reversed(ch))
    out_c = rev[0]
    for i in range(len(ch)):
        prev, out_c = out_c, rev[i]
        for j in range(layers + 1):
            t.update(resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else out_c, out_c))
        if i < len(ch) - 1:
            t.update(conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", out_c, out_c, 3))
    t.update({**norm("decoder.conv_norm_out", ch[0]), **conv("decoder.conv_out", cfg["out_channels"], ch[0], 3)})
    return t


def diffusers_ldmbert(cfg):
    """LDMBertModel: model (LDMBertEncoder: embeddings, layers, final layer_norm) and to_logits.
    Its attention's q/k/v have no bias, out_proj has one."""
    d, inner, vocab = cfg["d_model"], cfg["encoder_attention_heads"] * cfg["head_dim"], cfg["vocab_size"]
    t = {"model.embed_tokens.weight": (vocab, d), "model.embed_positions.weight": (cfg["max_position_embeddings"], d),
         **norm("model.layer_norm", d), **linear("to_logits", vocab, d)}
    for i in range(cfg["encoder_layers"]):
        p = f"model.layers.{i}"
        t.update({**linear(f"{p}.self_attn.q_proj", inner, d, False), **linear(f"{p}.self_attn.k_proj", inner, d, False),
                  **linear(f"{p}.self_attn.v_proj", inner, d, False), **linear(f"{p}.self_attn.out_proj", d, inner),
                  **norm(f"{p}.self_attn_layer_norm", d), **linear(f"{p}.fc1", cfg["encoder_ffn_dim"], d),
                  **linear(f"{p}.fc2", d, cfg["encoder_ffn_dim"]), **norm(f"{p}.final_layer_norm", d)})
    return t


@pytest.mark.parametrize("part,weights_file,table", [
    ("unet", "diffusion_pytorch_model.safetensors", diffusers_unet),
    ("vqvae", "diffusion_pytorch_model.safetensors", diffusers_autoencoder_kl),
    ("bert", "model.safetensors", diffusers_ldmbert),
])
def test_diffusers_weight_names_and_shapes(run, part, weights_file, table):
    directory = run / "diffusers" / part
    expected = table(json.loads((directory / "config.json").read_text()))
    got = {k: tuple(v.shape) for k, v in load_file(str(directory / weights_file)).items()}
    assert sorted(set(expected) - set(got)) == [], "missing"
    assert sorted(set(got) - set(expected)) == [], "unexpected"
    assert {k: got[k] for k in expected if got[k] != expected[k]} == {}


# ---------------------------------------------------------------------------
# python -m ldm.evaluate --folders A B
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """A random-weight Inception in pytorch-fid's file format (test_evaluate's writer)."""
    import paddle

    from ldm.evaluation import inception
    from test_evaluate import torch_names, write_pytorch_fid_file

    paddle.seed(7)
    net = inception.FIDInceptionV3()
    for name, p in net.named_parameters():
        if name.endswith("bn.bias"):
            p.set_value(paddle.full(p.shape, 0.1))  # keeps activations alive through 94 layers
    return write_pytorch_fid_file(str(tmp_path_factory.mktemp("fidw") / "pt_inception-random.pth"), torch_names(net.state_dict()))


def image_folder(path, seed, n, sizes=((32, 32),)):
    rng = np.random.default_rng(seed)
    path.mkdir()
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        array = (rng.uniform(0, 1, (h, w, 3)) * rng.uniform(0, 255, 3)).astype(np.uint8)
        Image.fromarray(array).save(path / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (path / "notes.txt").write_text("not an image")
    return str(path)


def fid_line(res):
    assert res.returncode == 0, res.stderr[-3000:]
    return float(res.stdout.strip().splitlines()[-1].split("FID:")[1])


def test_fid_between_folders(fid_weights, tmp_path):
    from ldm.evaluation import evaluate
    from ldm.evaluation import inception

    a = image_folder(tmp_path / "a", 1, 4, sizes=((32, 32), (40, 24)))
    b = image_folder(tmp_path / "b", 2, 3)
    fid = fid_line(run_script(["-m", "ldm.evaluate", "--folders", a, b, "--inception_weights", fid_weights, "--batch_size", "4"]))
    # The existing code path: pool3 features of the decoded images, the covariance route of pytorch-fid.
    net = inception.load_fid_inception(fid_weights)
    feats = []
    for folder in (a, b):
        files = evaluate.folder_images(folder)
        assert len(files) == len(os.listdir(folder)) - 1  # notes.txt is not an image
        feats.append(np.concatenate([inception.pool3_features(net, np.asarray(Image.open(f).convert("RGB"))[None]) for f in files]))
    expected = evaluate.frechet_distance(*evaluate.statistics(feats[0]), *evaluate.statistics(feats[1]))
    assert fid > 1e-3 and fid == pytest.approx(expected, rel=1e-5)
    # Identical folders: 0, up to float64 rounding of the trace terms.
    assert abs(fid_line(run_script(["-m", "ldm.evaluate", "--folders", b, b, "--inception_weights", fid_weights]))) < 1e-6 * max(1.0, fid)


def test_fid_folders_bad_input(fid_weights, tmp_path):
    a = image_folder(tmp_path / "a", 1, 3)
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "x.png")
    res = run_script(["-m", "ldm.evaluate", "--folders", a, str(tmp_path / "one"), "--inception_weights", fid_weights])
    assert res.returncode == 2 and "holds 1 image file(s)" in res.stderr.strip().splitlines()[-1]
    res = run_script(["-m", "ldm.evaluate", "--folders", a, a])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --inception_weights is required")
    (tmp_path / "a" / "zz.png").write_bytes(b"\x89PNG broken")
    res = run_script(["-m", "ldm.evaluate", "--folders", a, a, "--inception_weights", fid_weights])
    assert res.returncode == 2 and "cannot read" in res.stderr and "zz.png" in res.stderr


def test_no_trainer_script_exports_diffusers_layout(shapes, vae_dir, tmp_path):
    """The explicit loop's final save with --export_format diffusers: the top-level directory is
    the PyTorch layout with its card, and this project's loaders still read it."""
    from ldm.evaluation.loading import load_pipeline

    out = tmp_path / "run"
    res = run_script(["train_txt2img_laion400m_no_trainer.py", "--output_dir", str(out), "--train_batch_size", "4",
                      "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--max_train_steps", "1", "--logging_steps", "1",
                      "--save_steps", "1", "--seed", "23", "--num_workers", "0", "--vae_name_or_path", str(vae_dir),
                      "--text_encoder_config_file", "config/tiny/ldmbert.json", "--unet_config_file", "config/tiny/unet.json",
                      "--file_list", shapes["file_list"], "--model_max_length", "16", "--tokenizer_name", shapes["tokenizer"],
                      "--resolution", "32", "--image_logging_steps", "0", "--export_format", "diffusers"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_index(out)["unet"] == ["diffusers", "UNet2DConditionModel"] and not (out / DIFFUSERS_SUBDIR).exists()
    card = (out / "README.md").read_text()
    assert "- Steps: 1 (checkpoint checkpoint-1)" in card and "- EMA: off" in card
    assert "```bash\npython train_txt2img_laion400m_no_trainer.py --output_dir" in card
    pipe, _ = load_pipeline(str(out))
    assert type(pipe.bert).__name__ == "LDMBertModel"
