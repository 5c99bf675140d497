"""Time per optimizer step: our Trainer's step against a bare Paddle loop, same model, batch and data.

    python bench/train_step.py [--preset tiny] [--resolution 32] [--batch_size 8] [--steps 12] [--warmup 3]
                               [--workers 1] [--cached] [--to_static]

Builds the preset from scratch (random autoencoder from config/PRESET/vae.json, tokenizer and
shapes data generated into a temporary directory; nothing downloaded), then in one process:
  * bare:  `loss = model(**batch); loss.backward(); opt.step(); opt.clear_grad()` over a
           paddle.io.DataLoader of the same stream (AdamW, same settings), with each step split into
           data wait, autoencoder encode (or sampling the cached moments), LDMBert forward, UNet forward,
           backward (UNet and LDMBert) and optimizer, timed by forward hooks;
  * ours:  train_txt2img_laion400m_trainer.py's StreamTrainer (PaddleNLP Trainer) on the same
           model and data, its step timed from one optimizer step's end to the next (data wait included).
The two take turns step by step (the bare steps run in the Trainer's step-end callback), so a change
of load on a shared machine hits both alike; each figure is the median over the steps after --warmup. `--cached` runs ldm.cache_latents on the data and
trains from the moments, `--to_static` compiles UNet and LDMBert (ldm.model.compile_static); the bare
loop then also runs the plain way in the same turns, and the speed-up is printed.
Last line: `train_step: ours N ms, bare M ms, ratio R`.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(tmp, preset, resolution, records):
    """Shapes data a little larger than the crop, a tokenizer from its captions, a random autoencoder."""
    from ppdiffusers import AutoencoderKL

    from ldm.data.sample_data import write_sample_dataset
    from ldm.data.tokenizer import build_vocab, iter_captions, write_tokenizer

    file_list = write_sample_dataset(os.path.join(tmp, "data"), num_parts=2, records_per_part=records // 2, size=resolution + 8, seed=1)
    tokenizer = write_tokenizer(build_vocab(lambda: iter_captions(file_list)), os.path.join(tmp, "tokenizer"), model_max_length=16)
    with open(os.path.join(ROOT, "config", preset, "vae.json")) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    vae_dir = os.path.join(tmp, "vae")
    AutoencoderKL(**config).save_pretrained(vae_dir)
    return file_list, tokenizer, vae_dir


def build_model(args, tokenizer, vae_dir):
    from ldm.training.args import ModelArguments
    from ldm.training.build import create_model

    model_args = ModelArguments(vae_name_or_path=vae_dir, tokenizer_name=tokenizer, model_max_length=16,
                                text_encoder_config_file=os.path.join(ROOT, "config", args.preset, "ldmbert.json"),
                                unet_config_file=os.path.join(ROOT, "config", args.preset, "unet.json"))
    return create_model(model_args, args.resolution, seed=23)


def dataset(args, model, file_list, latent_cache=None):
    from ldm.data.stream import TextImageStream
    from ldm.data.progress import as_paddle_dataset

    extra = {"latent_cache": latent_cache} if latent_cache else {}
    stream = TextImageStream(file_list, args.resolution, model.tokenizer, 16, 0.1, buffer_size=64, seed=23, rank=0, world_size=1, **extra)
    return as_paddle_dataset(stream)


class PhaseClock:
    """Wall time of a step's phases, from forward hooks and wrappers (CPU kernels run synchronously;
    on a GPU each mark would need a device sync)."""

    def __init__(self, model):
        self.times = {}
        self._t = None
        # encode_latents = latents_from_moments(encode_moments(...)): two calls in a row, both "encode".
        encode, from_moments = model.encode_moments, model.latents_from_moments
        model.encode_moments = lambda *a, **k: self._timed("encode", encode, *a, **k)
        model.latents_from_moments = lambda *a, **k: self._timed("encode", from_moments, *a, **k)
        for name, layer in (("ldmbert_fwd", model.text_encoder), ("unet_fwd", model.unet)):
            layer.register_forward_pre_hook(lambda *_: self._start())
            layer.register_forward_post_hook(lambda *_, name=name: self._stop(name))

    def _start(self):
        self._t = time.perf_counter()

    def _stop(self, name):
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._t

    def _timed(self, name, fn, *a, **k):
        self._start()
        out = fn(*a, **k)
        self._stop(name)
        return out


class BareLoop:
    """The plainest Paddle loop over the same model, one step at a time, for each variant
    {name: (dataset, to_static on?)}: `loss = model(**batch); loss.backward(); opt.step(); opt.clear_grad()`,
    each step split into phases."""

    def __init__(self, model, clock, variants, args):
        import paddle
        from paddle.io import DataLoader

        from ldm.training.build import decay_parameter_names

        decay = decay_parameter_names(model)
        if args.optimizer == "sgd":  # no state: for presets whose AdamW state does not fit in this machine's memory
            self.optimizer = paddle.optimizer.SGD(learning_rate=1e-4, parameters=model.trainable_parameters())
        else:
            self.optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.trainable_parameters(), weight_decay=0.02,
                                                    apply_decay_param_fun=lambda name: name in decay)
        self.model, self.clock, self.variants = model, clock, variants
        self.loaders = {name: iter(DataLoader(data, batch_size=args.batch_size, num_workers=args.workers, drop_last=True))
                        for name, (data, _) in variants.items()}
        self.rows = {name: [] for name in variants}

    def step(self, name):
        import paddle

        from ldm.data.progress import BOOKKEEPING_KEY

        paddle.jit.enable_to_static(self.variants[name][1])  # compiled layers run eagerly when off
        self.model.train()
        self.clock.times = {}
        t0 = time.perf_counter()
        batch = next(self.loaders[name])
        batch.pop(BOOKKEEPING_KEY)  # the stream's position and skips (StreamProgress reads them in ours)
        t1 = time.perf_counter()
        loss = self.model(**batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.clear_grad()
        t4 = time.perf_counter()
        paddle.jit.enable_to_static(True)
        phases = dict(self.clock.times)
        self.rows[name].append({"data": t1 - t0, **phases, "loss_etc": (t2 - t1) - sum(phases.values()), "backward": t3 - t2,
                                "optimizer": t4 - t3, "step": t4 - t0})


def interleaved(model, data, bare, args, steps, out_dir):
    """Our StreamTrainer for `steps` optimizer steps, with one step of each bare variant run right
    after each of ours (in the Trainer's step-end callback), so that both see the same load.
    Ours is timed from the end of the bare steps to the Trainer's next step end (data wait included)."""
    from paddlenlp.trainer import TrainerCallback

    from ldm.training.args import LDMTrainingArguments
    from ldm.training.trainer import StreamTrainer

    ours = []
    mark = [0.0]

    class TakeTurns(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            mark[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            ours.append(time.perf_counter() - mark[0])
            for name in bare.variants:
                bare.step(name)
            mark[0] = time.perf_counter()

    training_args = LDMTrainingArguments(output_dir=out_dir, per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
                                         weight_decay=0.02, max_steps=steps, logging_steps=10**9, save_steps=10**9,
                                         image_logging_steps=0, dataloader_num_workers=args.workers, seed=23, max_grad_norm=-1,
                                         lr_scheduler_type="constant", disable_tqdm=True, report_to=["none"])
    StreamTrainer(model=model, args=training_args, train_dataset=data, callbacks=[TakeTurns()]).train()
    return ours[args.warmup:]


def median_ms(values):
    return 1000 * statistics.median(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="config/ preset: tiny, ldm_12l or ldm_32l.")
    parser.add_argument("--resolution", type=int, default=32, help="Training crop side in pixels.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per step.")
    parser.add_argument("--steps", type=int, default=16, help="Timed steps per loop (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=3, help="Steps run before timing starts.")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (0: read in the training process).")
    parser.add_argument("--cached", action="store_true", help="Train from latents cached by ldm.cache_latents (no encoder run); "
                        "the bare loop also runs on the encoded data, step for step, for the speed-up.")
    parser.add_argument("--to_static", action="store_true", help="Compile UNet and LDMBert with paddle.jit.to_static (SOT); "
                        "the bare loop also runs eagerly, step for step, for the speed-up.")
    parser.add_argument("--threads", type=int, default=0, help="Paddle CPU threads of the training process (0: as the training scripts, the cores the data workers leave).")
    parser.add_argument("--skip_trainer", action="store_true", help="Only the bare loop and its breakdown.")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                        help="The bare loop's optimizer; sgd keeps no state (ldm_12l's AdamW state is 16 GB), with --skip_trainer.")
    args = parser.parse_args()
    if args.optimizer == "sgd" and not args.skip_trainer:
        parser.error("--optimizer sgd compares nothing with the Trainer (which uses AdamW): add --skip_trainer")

    from paddlenlp.utils.log import logger

    from ldm.training.runtime import set_cpu_threads

    logger.set_level("WARNING")  # the Trainer's argument dump would bury the table

    threads = set_cpu_threads(args.threads, args.workers)  # as the training scripts: the cores the data workers leave
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        records = max(64, 2 * args.batch_size * total)  # the stream repeats its passes
        file_list, tokenizer, vae_dir = make_inputs(tmp, args.preset, args.resolution, records=records)
        model = build_model(args, tokenizer, vae_dir)
        clock = PhaseClock(model)
        trainable = sum(p.size for p in model.trainable_parameters())
        print(f"preset {args.preset}: {trainable / 1e6:.1f}M trainable, {args.resolution} px, batch {args.batch_size}, "
              f"{args.workers} worker(s), {threads} thread(s)", flush=True)
        # What is measured: the bare loop as it is, and with the latents cached / the models compiled.
        variants = {"plain": (dataset(args, model, file_list), False)}
        data = variants["plain"][0]
        if args.cached:
            from ldm.training import cache_latents

            start = time.perf_counter()
            cache_latents.main(["--file_list", file_list, "--vae_name_or_path", vae_dir, "--resolution", str(args.resolution),
                                "--output_dir", os.path.join(tmp, "cache"), "--batch_size", str(args.batch_size)])
            print(f"cache_latents: {time.perf_counter() - start:.1f} s for {records} records", flush=True)
            cached_list = os.path.join(tmp, "cache", "train.filelist.list")
            latent_cache, message, _ = cache_latents.probe_cache(cached_list, vae_dir, args.resolution)
            print(message, flush=True)
            data = dataset(args, model, cached_list, latent_cache)
        if args.to_static:
            model.compile_static()
        name = "+".join(w for w, on in (("cached", args.cached), ("to_static", args.to_static)) if on) or "plain"
        variants[name] = (data, args.to_static)

        # Ours and the bare loop take turns step by step, on the same model and data.
        bare = BareLoop(model, clock, variants, args)
        if args.skip_trainer:
            for _ in range(total):
                for k in variants:
                    bare.step(k)
            ours = []
        else:
            ours = interleaved(model, data, bare, args, total, os.path.join(tmp, "out"))
        bare = {k: rows[args.warmup:] for k, rows in bare.rows.items()}

    print(f"\n| phase (bare loop{', ' + name if name != 'plain' else ''}) | median ms | share of the step |")
    print("|---|---|---|")
    rows = bare[name]
    step_ms = median_ms([r["step"] for r in rows])
    for k in ("data", "encode", "ldmbert_fwd", "unet_fwd", "loss_etc", "backward", "optimizer"):
        if k in rows[0]:
            ms = median_ms([r[k] for r in rows])
            print(f"| {k} | {ms:.1f} | {ms / step_ms:.0%} |")
    print(f"| step | {step_ms:.1f} | images/s {1000 * args.batch_size / step_ms:.1f} |")
    if name != "plain":
        plain_ms = median_ms([r["step"] for r in bare["plain"]])
        print(f"\n{name}: bare step {step_ms:.1f} ms ({1000 * args.batch_size / step_ms:.1f} images/s) against plain "
              f"{plain_ms:.1f} ms ({1000 * args.batch_size / plain_ms:.1f} images/s), speed-up {plain_ms / step_ms:.2f}x")
    if ours:
        ours_ms = median_ms(ours)
        print(f"\nours (StreamTrainer, {name}) images/s {1000 * args.batch_size / ours_ms:.1f}")
        print(f"train_step: ours {ours_ms:.1f} ms, bare {step_ms:.1f} ms, ratio {ours_ms / step_ms:.2f}")


if __name__ == "__main__":
    main()
