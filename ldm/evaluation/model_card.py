"""The model card (README.md) of an exported pipeline directory, in the model-hub convention.

YAML front matter (`library_name`, `pipeline_tag`, `license`, `tags`) and a body saying what a
user needs to trust or reproduce the model: architecture and parameter counts, the data (file
lists, records seen, records skipped by reason), steps, batch, recipe flags, the last validation
loss by timestep quartile and FID, and the command that trained it.

The figures come from the run's own records, never from defaults: the newest complete
checkpoint's args.json, trainer_state.json and data_position_rank*.json (skip counts of every
rank and worker), the VisualDL records under the run's runs/ directory (validation losses), an
ldm.evaluate fid.csv if given, and the command line. Whatever is absent is written as
"not measured" / "not recorded", so a card never claims what the run did not record.
"""
import csv
import glob
import json
import os
import re
import shlex
from typing import Dict, List, Optional

NOT_MEASURED = "not measured"
NOT_RECORDED = "not recorded"
COMMAND_HEADING = "## Training command"


# ---------------------------------------------------------------------------
# Gathering the facts
# ---------------------------------------------------------------------------


# PyTorch diffusers' LDMTextToImagePipeline pads and truncates every prompt to 77 tokens,
# whatever the tokenizer says (ppdiffusers' uses tokenizer.model_max_length); LDMBert attends to
# the padding too, so only a model trained with --model_max_length 77 (the default) samples the
# same through that pipeline. Others load and compute the same, but need their own tokenization.
DIFFUSERS_PROMPT_TOKENS = 77


def diffusers_caveat(pipe) -> str:
    """'' or one line on why PyTorch diffusers' stock pipeline call will not sample this model as trained."""
    positions = int(pipe.bert.config.max_position_embeddings)
    if positions == DIFFUSERS_PROMPT_TOKENS:
        return ""
    what = ("fails (IndexError in the position embedding)" if positions < DIFFUSERS_PROMPT_TOKENS
            else f"truncates prompts to {DIFFUSERS_PROMPT_TOKENS} of the {positions} tokens the model was trained on")
    return (f"this model reads {positions}-token prompts (--model_max_length {positions}), but PyTorch diffusers' LDMTextToImagePipeline "
            f"pads every prompt to {DIFFUSERS_PROMPT_TOKENS} tokens, so its stock __call__ {what}; the weights load and compute the same, "
            f"tokenize with max_length={positions} and run the components yourself, or train with --model_max_length {DIFFUSERS_PROMPT_TOKENS}")


def collect(pipe, model_dir: str, license: str = "other", weights: str = "", fid_csv: Optional[str] = None,
            command: Optional[List[str]] = None) -> dict:
    """Everything the card says, as a dict (JSON-able). `model_dir` is what the model was read
    from (a pipeline directory holding the run's checkpoints, or a checkpoint-N); `command` the
    training command line, if this is the run itself (`sys.argv`)."""

    checkpoint, run_dir = find_checkpoint(model_dir)
    args = read_json_or_none(os.path.join(checkpoint, "args.json")) if checkpoint else None
    state = read_json_or_none(os.path.join(checkpoint, "trainer_state.json")) if checkpoint else None
    if weights in ("", "pipeline") and args and checkpoint and run_dir == os.path.abspath(model_dir):
        # A run's final directory holds what its final save applied: the EMA weights with --use_ema.
        weights = "EMA (the run's --use_ema)" if args.get("use_ema") else "raw (the run had no EMA)"
    return {
        "license": license,
        "weights": weights,
        "parameters": parameter_counts(pipe),
        "config": architecture(pipe),
        "checkpoint": checkpoint,
        "args": args,
        "step": int(state["global_step"]) if state and "global_step" in state else None,
        "data": data_counts(checkpoint) if checkpoint else None,
        "validation": last_validation(run_dir) if run_dir else {},
        "fid": read_fid(fid_csv) if fid_csv else [],
        "diffusers_caveat": diffusers_caveat(pipe),
        "command": "python " + " ".join(shlex.quote(a) for a in command) if command else recorded_command(model_dir, run_dir),
    }


def find_checkpoint(model_dir: str):
    """(the checkpoint whose records describe the model, the run directory), or (None, None).
    A checkpoint-N describes itself; a run's final directory is described by its newest
    complete checkpoint: both scripts write one at the last step before the final save, so it
    holds the final step, skip counts and arguments.

    Local to the calling process: only rank 0 writes the card, so a collective here (as
    `latest_checkpoint`'s broadcast) would wait for ranks that have left (gloo: a TIMEOUT and no
    card after every multi-process run; NCCL: a hang at the final save)."""
    from ldm.training.checkpoint import CHECKPOINT_RE, complete_checkpoints

    model_dir = os.path.abspath(model_dir)
    if CHECKPOINT_RE.match(os.path.basename(model_dir)):
        return model_dir, os.path.dirname(model_dir)
    complete = complete_checkpoints(model_dir)
    return (complete[-1], model_dir) if complete else (None, model_dir)


def read_json_or_none(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def parameter_counts(pipe) -> Dict[str, int]:
    return {name: int(sum(int(p.numel()) for p in getattr(pipe, name).parameters())) for name in ("unet", "bert", "vqvae")}


def architecture(pipe) -> Dict[str, dict]:
    """The config entries that say how big each part is."""
    def pick(config, keys):
        return {k: config[k] for k in keys if k in config}

    return {
        "unet": pick(pipe.unet.config, ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim", "attention_head_dim", "sample_size", "in_channels")),
        "bert": pick(pipe.bert.config.to_dict(), ("encoder_layers", "d_model", "encoder_attention_heads", "encoder_ffn_dim", "vocab_size", "max_position_embeddings")),
        "vqvae": dict(pick(pipe.vqvae.config, ("block_out_channels", "latent_channels", "layers_per_block", "scaling_factor")), _class_name=type(pipe.vqvae).__name__),
        "scheduler": pick(pipe.scheduler.config, ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "rescale_betas_zero_snr", "timestep_spacing")),
    }


def data_counts(checkpoint: str) -> dict:
    """Skips by reason summed over every rank's and worker's saved position (cumulative over the
    run: a resumed worker carries its counts on), and the ranks that saved one. At 32 GPUs x 6
    workers that is 32 small JSON files."""
    from ldm.data.records import SKIP_REASONS, skips_from_vector

    totals = {r: 0 for r in SKIP_REASONS}
    files = sorted(glob.glob(os.path.join(checkpoint, "data_position_rank*.json")))
    world_size = None
    for path in files:
        position = read_json_or_none(path) or {}
        world_size = position.get("world_size", world_size)
        for worker in (position.get("workers") or {}).values():
            for reason, n in skips_from_vector(worker.get("skips", [])).items():
                totals[reason] += n
    return {"skips": totals, "world_size": world_size, "ranks_recorded": len(files)}


def last_validation(run_dir: str) -> dict:
    """{'step': N, 'validation/loss': x, 'validation/loss_q1': ...} at the last step that logged
    a validation loss, from the VisualDL records under run_dir/runs (either script); {} if none."""
    files = [f for f in glob.glob(os.path.join(run_dir, "runs", "**", "vdlrecords*"), recursive=True) if os.path.isfile(f)]
    if not files:
        return {}
    from visualdl import LogReader

    found: Dict[str, tuple] = {}
    unreadable = []
    for path in files:
        try:
            found_here = validation_scalars(LogReader(file_path=path))
        except Exception:  # noqa: BLE001 - a record file cut off by a kill mid-write raises protobuf's DecodeError
            unreadable.append(os.path.relpath(path, run_dir))
            continue
        for name, (step, value) in found_here.items():
            if name not in found or step >= found[name][0]:
                found[name] = (step, value)
    if "validation/loss" not in found:
        return {"unreadable": unreadable} if unreadable else {}
    step = found["validation/loss"][0]
    return {"step": step, **{name: value for name, (s, value) in found.items() if s == step}, "unreadable": unreadable}


def validation_scalars(reader) -> Dict[str, tuple]:
    """{'validation/loss...': (last step, value)} of one VisualDL record file."""
    found = {}
    for tag in reader.get_tags().get("scalar", []):
        if "validation/loss" in tag:
            records = reader.get_data("scalar", tag)
            if records:
                last = max(records, key=lambda r: r.id)
                found[tag[tag.index("validation/loss"):]] = (int(last.id), float(last.value))
    return found


def read_fid(path: str) -> List[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def recorded_command(model_dir: str, run_dir: Optional[str]) -> Optional[str]:
    """The training command a run's own card recorded (the final directory's README.md)."""
    for directory in (model_dir, run_dir):
        card = os.path.join(directory or "", "README.md")
        if directory and os.path.isfile(card):
            with open(card, encoding="utf-8") as f:
                match = re.search(re.escape(COMMAND_HEADING) + r"\n+```(?:bash)?\n(.*?)\n```", f.read(), re.S)
            if match and match.group(1).strip() != NOT_RECORDED:
                return match.group(1).strip()
    return None


# ---------------------------------------------------------------------------
# Writing it
# ---------------------------------------------------------------------------


def write_card(directory: str, card: dict) -> str:
    path = os.path.join(directory, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(card))
    return path


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M ({n:,})"


def render(card: dict) -> str:
    layout = card.get("layout", "diffusers")
    library = "diffusers" if layout == "diffusers" else "ppdiffusers"
    params, config, args = card["parameters"], card["config"], card.get("args") or {}
    weights = card.get("weights") if card.get("weights") not in (None, "", "pipeline") else "as the source pipeline directory held them"
    lines = ["---", f"library_name: {library}", "pipeline_tag: text-to-image", f"license: {card['license']}", "tags:"]
    lines += [f"- {t}" for t in ("text-to-image", "latent-diffusion", "ldm", "ldmbert", library, "paddlepaddle")]
    lines += ["---", "", "# Latent diffusion text-to-image model (LDMBert + UNet)", ""]
    lines += [f"An `LDMTextToImagePipeline` trained with this repository's PaddlePaddle LDM toolkit, in the **{layout}** layout "
              f"({'PyTorch `diffusers`' if layout == 'diffusers' else '`ppdiffusers`'} loads it as it is). Weights: {weights}.", ""]

    size = int(config["unet"].get("sample_size", 0)) * 2 ** (len(config["vqvae"].get("block_out_channels", [0])) - 1)
    lines += ["## Use it", "", "```python"]
    if layout == "diffusers":
        lines += ["from diffusers import LDMTextToImagePipeline", "pipe = LDMTextToImagePipeline.from_pretrained(\"PATH\")"]
    else:
        lines += ["from ppdiffusers import LDMTextToImagePipeline", "pipe = LDMTextToImagePipeline.from_pretrained(\"PATH\")"]
    latent = int(config["unet"].get("sample_size", 0))
    lines += [f"image = pipe([\"a prompt\"], height={latent * 8}, width={latent * 8}, guidance_scale=7.5).images[0]", "```", "",
              f"The model was trained at {size}x{size} pixels. The pipeline makes latents of `height // 8` whatever the autoencoder's "
              f"downsampling factor, so `height={latent * 8}` gives this model's {latent}x{latent} latents ({size}x{size} pixels).", ""]
    if layout == "diffusers" and card.get("diffusers_caveat"):
        lines += [f"**Note:** {card['diffusers_caveat']}.", ""]

    lines += ["## Architecture", "", "| part | class | parameters | size |", "|---|---|---|---|"]
    unet, bert, vae = config["unet"], config["bert"], config["vqvae"]
    lines += [f"| UNet | UNet2DConditionModel | {millions(params['unet'])} | channels {unet.get('block_out_channels')}, "
              f"{unet.get('layers_per_block')} layer(s) per block, cross-attention {unet.get('cross_attention_dim')}, latents {latent}x{latent}x{unet.get('in_channels')} |",
              f"| text encoder | LDMBertModel | {millions(params['bert'])} | {bert.get('encoder_layers')} layers, d_model {bert.get('d_model')}, "
              f"{bert.get('encoder_attention_heads')} heads, vocabulary {bert.get('vocab_size')}, {bert.get('max_position_embeddings')} tokens |",
              f"| autoencoder (frozen) | {vae.get('_class_name')} | {millions(params['vqvae'])} | channels {vae.get('block_out_channels')}, "
              f"{vae.get('latent_channels')} latent channels, factor {2 ** (len(vae.get('block_out_channels', [0])) - 1)}, scaling factor {vae.get('scaling_factor')} |",
              f"| trained (UNet + text encoder) | | {millions(params['unet'] + params['bert'])} | |", ""]
    sched = config["scheduler"]
    lines += [f"Noise schedule: {sched.get('num_train_timesteps')} steps, {sched.get('beta_schedule')} betas {sched.get('beta_start')}-{sched.get('beta_end')}, "
              f"prediction type {sched.get('prediction_type')}, zero terminal SNR {sched.get('rescale_betas_zero_snr', False)}.", ""]

    lines += ["## Training", ""]
    if not card.get("checkpoint"):
        lines += [f"Training records: {NOT_RECORDED} (the model was exported from a directory without the run's checkpoints).", ""]
    else:
        lines += training_lines(card, args)

    lines += ["## Evaluation", ""]
    val = card.get("validation") or {}
    if val.get("unreadable"):
        lines += [f"- Unreadable VisualDL record files (cut off mid-write?), left out: {', '.join(val['unreadable'])}"]
    if "step" in val:
        quartiles = ", ".join(f"q{q} {val[f'validation/loss_q{q}']:.5f}" for q in range(1, 5) if f"validation/loss_q{q}" in val)
        lines += [f"- Validation loss at step {val['step']}: {val['validation/loss']:.5f}" + (f" (by timestep quartile, q1 = least noisy: {quartiles})" if quartiles else ""),]
    elif val.get("unreadable"):
        lines += [f"- Validation loss: {NOT_RECORDED} (its VisualDL record files are unreadable)."]
    elif (card.get("args") or {}).get("eval_file_list"):
        lines += [f"- Validation loss: {NOT_RECORDED} (no VisualDL records of it under the run's runs/)."]
    else:
        lines += [f"- Validation loss: {NOT_MEASURED} (the run had no --eval_file_list)."]
    if card.get("fid"):
        for row in card["fid"]:
            lines += [f"- FID {float(row['fid']):.3f} at guidance {row.get('guidance_scale')} ({row.get('num_images')} images, "
                      f"{row.get('scheduler')} {row.get('num_inference_steps')} steps; python -m ldm.evaluate)"]
    else:
        lines += [f"- FID: {NOT_MEASURED}."]
    lines += ["", COMMAND_HEADING, "", "```bash", card.get("command") or NOT_RECORDED, "```", ""]
    return "\n".join(lines)


def training_lines(card: dict, args: dict) -> List[str]:
    data = card.get("data") or {}
    world = data.get("world_size") or 1
    batch = args.get("train_batch_size", args.get("per_device_train_batch_size"))
    accumulation = args.get("gradient_accumulation_steps", 1)
    step = card.get("step")
    total_batch = batch * accumulation * world if batch else None
    skips = {r: n for r, n in (data.get("skips") or {}).items() if n}
    lines = [f"- Steps: {step if step is not None else NOT_RECORDED} (checkpoint {os.path.basename(card['checkpoint'])})",
             f"- Batch: {batch} per device x {accumulation} accumulation x {world} process(es) = {total_batch} images per step",
             f"- Records seen: {step * total_batch if step is not None and total_batch else NOT_RECORDED} (steps x batch)",
             f"- Records skipped: {', '.join(f'{r} {n}' for r, n in sorted(skips.items(), key=lambda kv: -kv[1])) or 'none'}"
             f" (summed over the {data.get('ranks_recorded', 0)} rank(s) that saved a data position)",
             f"- Data: --file_list `{args.get('file_list', NOT_RECORDED)}`" + (f", validation --eval_file_list `{args['eval_file_list']}`" if args.get("eval_file_list") else ""),
             f"- Resolution: {args.get('resolution', NOT_RECORDED)} px" + (", aspect-ratio buckets" if args.get("aspect_ratio_buckets") else ""),
             f"- Optimiser: AdamW, learning rate {args.get('learning_rate')}, weight decay {args.get('adam_weight_decay', args.get('weight_decay'))}, "
             f"schedule {args.get('lr_scheduler', args.get('lr_scheduler_type'))}, warmup {args.get('lr_warmup_steps', args.get('warmup_steps'))} steps",
             f"- EMA: " + (f"decay {args.get('ema_decay')}" if args.get("use_ema") else "off"),
             f"- Mixed precision: " + ("fp16" if args.get("fp16") else "bf16" if args.get("bf16") else "off (float32)")]
    recipe = ("prediction_type", "snr_gamma", "zero_terminal_snr", "noise_offset", "input_perturbation", "caption_dropout",
              "timestep_bias_strategy", "max_aspect_ratio")
    lines += ["- Recipe: " + ", ".join(f"--{k} {args[k]}" for k in recipe if k in args), f"- Seed: {args.get('seed')}", ""]
    lines += [f"Every argument of the run is in `{os.path.basename(card['checkpoint'])}/args.json` of its output directory.", ""]
    return lines
