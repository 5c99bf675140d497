"""What a training step of a preset costs on a GPU: measured (on a GPU) or counted (anywhere).

Measure, on a machine with a CUDA build of Paddle (one process, one GPU, synthetic batch):

    python bench/gpu_step.py --preset ldm_32l --resolution 256 --batch_size 6 \\
        --configs fp32 fp16 bf16 bf16+o2 bf16+recompute bf16+noxformers bf16+cached

prints one row per configuration: median step time (after --warmup steps), images/s, achieved
TFLOP/s (FLOPs per step counted by ldm.flops on the real modules / step time) and peak memory
(paddle.device.cuda.max_memory_allocated; on the CPU the process's peak resident memory). A
configuration is `+`-joined words: fp32, fp16 or bf16 (O1 autocast; fp16 with dynamic loss
scaling); o2 (pure fp16/bf16 weights, `paddle.amp.decorate` level O2 with fp32 master weights in
AdamW); recompute; noxformers (standard attention instead of ppdiffusers' memory-efficient / flash
kernels, on by default where Paddle has them); cached (latents from moments, no encoder run, as
with ldm.cache_latents); fp32vae (encoder kept out of autocast). The step is the training scripts'
(ldm.model.LatentDiffusionModel.forward, AdamW, EMA update). A configuration that fails (out of
memory) prints `failed` and the next one runs. Sharding stage 2 needs several GPUs and is measured
through the Trainer script, whose logs carry the same figures (docs/performance.md).

`--allow_cpu` runs the same measurement on a CPU build (the test suite does, on the tiny preset):
the numbers say nothing about a GPU.

Count, on any machine (docs/performance.md's tables):

    python bench/gpu_step.py --count --preset ldm_32l --resolution 256 512 --batch_size 6

runs one forward of one image per resolution with ldm.flops' counters on, then prints the FLOPs
per image, the images/s that 45% MFU would give on an A100 and an H100, and the memory budget
(weights, gradients, AdamW, EMA, activations) per precision with the largest batch per GPU size.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1024**3
MFU = 0.45
PEAK_TFLOPS = {"A100": 312, "H100 SXM": 989}  # dense bf16 tensor-core peaks (NVIDIA data sheets)
GPU_GIB = (32, 40, 80)
RESERVED_GIB = 2.0  # per GPU, outside the budget: CUDA context, cuDNN workspaces, allocator fragmentation (an assumption)


def preset_models(preset, resolution, vocab_size=30522, max_length=77, seed=0):
    """Fresh autoencoder (frozen), LDMBert and UNet of a preset, as stage 2 builds them."""
    import paddle
    from ppdiffusers import AutoencoderKL

    from ldm.models.ldm import build_text_encoder, build_unet, freeze, init_like_reference

    paddle.seed(seed)
    with open(os.path.join(ROOT, "config", preset, "vae.json")) as f:
        vae = AutoencoderKL(**{k: v for k, v in json.load(f).items() if not k.startswith("_")})
    freeze(vae)
    text_encoder = build_text_encoder(os.path.join(ROOT, "config", preset, "ldmbert.json"), vocab_size, max_length)
    unet = build_unet(os.path.join(ROOT, "config", preset, "unet.json"))
    init_like_reference(text_encoder, unet)
    unet.register_to_config(sample_size=resolution // 2 ** (len(vae.config.block_out_channels) - 1))
    return vae, text_encoder, unet


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------

# Bytes per trainable parameter (weights, fp32 master weights, gradients, AdamW's two moments, the
# fp32 EMA), per frozen autoencoder parameter, and per activation element kept for backward.
# O1 autocast keeps fp32 weights, gradients and optimizer, and casts each weight to 16 bits where an
# op runs in 16 bits: that copy is kept for the op's backward (2 bytes per trainable parameter, freed
# with recompute, which rebuilds it). Paddle's O2 (paddle.amp.decorate, PaddleNLP's
# --fp16_opt_level O2) casts the model to 16 bits and AdamW keeps fp32 master weights and fp32
# moments (multi_precision); gradients are 16-bit (fp32 with PaddleNLP's --amp_master_grad).
PRECISIONS = {
    "fp32": dict(weights=4, casts=0, master=0, grads=4, adam=8, ema=4, frozen=4, act=4),
    "fp16/bf16 O1": dict(weights=4, casts=2, master=0, grads=4, adam=8, ema=4, frozen=4, act=2),
    "bf16 O2": dict(weights=2, casts=0, master=4, grads=2, adam=8, ema=4, frozen=2, act=2),
}


def budget_rows(count, params, sharding_degree=8):
    """Memory per GPU for each configuration: fixed state (GiB) and activations per image (GiB), with
    standard and with memory-efficient attention."""
    trainable, frozen = params["ldmbert"] + params["unet"], params["vae"]
    rows = []
    for name, b in PRECISIONS.items():
        for recompute in (False, True):
            for shards in (1, sharding_degree):
                state = {
                    "weights": trainable * b["weights"] + frozen * b["frozen"] + (0 if recompute else trainable * b["casts"]),
                    "master": trainable * b["master"] / shards,
                    "grads": trainable * b["grads"] / shards,
                    "adam": trainable * b["adam"] / shards,
                    "ema": trainable * b["ema"],
                }
                act = [sum(c.kept(recompute, mea) for c in (count.ldmbert, count.unet)) * b["act"] for mea in (False, True)]
                label = name + (" + recompute" if recompute else "") + (f" + sharding stage2 x{shards}" if shards > 1 else "")
                rows.append((label, {k: v / GB for k, v in state.items()}, [a / GB for a in act]))
    return rows


def num(x: float) -> str:
    """A figure readable at every preset's scale: one decimal when large, three significant digits when small."""
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def count_report(args):
    from ldm.models.flops import count_forward

    for resolution in args.resolution:
        vae, text_encoder, unet = preset_models(args.preset, resolution)
        count = count_forward(vae, text_encoder, unet, resolution, 77)
        params = {"ldmbert": sum(p.size for p in text_encoder.parameters()), "unet": sum(p.size for p in unet.parameters()),
                  "vae": sum(p.size for p in vae.parameters())}
        del vae, text_encoder, unet
        b = args.batch_size
        print(f"\n## {args.preset} at {resolution} px: FLOPs ({(params['ldmbert'] + params['unet']) / 1e9:.3f}B trainable, "
              f"{params['vae'] / 1e6:.1f}M autoencoder)")
        print(f"| quantity | per image | per step (batch {b}) | images/s per GPU at {MFU:.0%} MFU: " + " / ".join(PEAK_TFLOPS) + " |")
        print("|---|---|---|---|")
        rows = [("autoencoder encode, forward (frozen)", count.vae_encode.flops, False),
                ("LDMBert forward (77 tokens)", count.ldmbert.flops, False),
                ("UNet forward", count.unet.flops, False),
                ("train, latents cached: 3 x (LDMBert + UNet)", count.training_flops(cached=True), True),
                ("train, encoder run every step", count.training_flops(cached=False), True),
                ("train, cached, --recompute", count.training_flops(cached=True, recompute=True), True),
                ("train, encoder run, --recompute", count.training_flops(cached=False, recompute=True), True)]
        for label, flops, speed in rows:
            rate = " / ".join(num(MFU * peak * 1e12 / flops) for peak in PEAK_TFLOPS.values()) if speed else ""
            print(f"| {label} | {num(flops / 1e9)} GFLOP | {num(b * flops / 1e12)} TFLOP | {rate} |")

        print(f"\n## {args.preset} at {resolution} px: memory per GPU (GiB; activations: standard / memory-efficient attention)")
        print(f"| configuration | weights | fp32 master | gradients | AdamW | EMA | fixed | activations per image | total at batch {b} | "
              + " | ".join(f"largest batch {g} GB" for g in GPU_GIB) + " |")
        print("|---" * (9 + len(GPU_GIB)) + "|")
        for label, state, act in budget_rows(count, params):
            fixed = sum(state.values())
            biggest = [" / ".join(str(max(0, int((g - RESERVED_GIB - fixed) // a))) for a in act) for g in GPU_GIB]
            print(f"| {label} | " + " | ".join(num(state[k]) for k in ("weights", "master", "grads", "adam", "ema")) + f" | {num(fixed)} | "
                  f"{num(act[0])} / {num(act[1])} | {num(fixed + b * act[0])} / {num(fixed + b * act[1])} | " + " | ".join(biggest) + " |", flush=True)


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def measure(args):
    import paddle

    from ldm.training.ema import EMA
    from ldm.models.flops import count_forward
    from ldm.models.ldm import LatentDiffusionModel
    from ldm.models.recipe import Recipe
    from ldm.training.build import decay_parameter_names

    on_gpu = paddle.is_compiled_with_cuda()
    if not on_gpu and not args.allow_cpu:
        raise SystemExit("error: this Paddle build has no CUDA; install paddlepaddle-gpu (README Install), or use --count, or --allow_cpu for a smoke test")
    if not on_gpu:
        print("(CPU build: peak memory is the process's peak resident memory so far; the numbers say nothing about a GPU)")
    print("| config | step (ms) | images/s | TFLOP/s | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    for resolution in args.resolution:
        forward = None  # FLOPs of one image, counted once per resolution
        for config in args.configs:
            words = set(config.split("+"))
            vae, text_encoder, unet = preset_models(args.preset, resolution)
            if forward is None:
                forward = count_forward(vae, text_encoder, unet, resolution, 77)
            model = LatentDiffusionModel(vae, text_encoder, unet, tokenizer=None, recipe=Recipe())
            model.encode_in_float32 = "fp32vae" in words
            if "recompute" in words:
                model.enable_recompute()
            xformers = "noxformers" not in words and model.enable_memory_efficient_attention()
            decay = decay_parameter_names(model)
            o2 = "o2" in words
            amp = "fp16" in words or "bf16" in words
            dtype = "bfloat16" if "bf16" in words else "float16"
            optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.trainable_parameters(), weight_decay=0.02,
                                               apply_decay_param_fun=lambda n: n in decay, multi_precision=o2)
            if o2:
                model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2", dtype=dtype, master_weight=True)
            ema = EMA(model, 0.9999)
            scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if "fp16" in words else None
            b = args.batch_size
            input_ids = paddle.randint(0, 1000, [b, 77])
            pixels = paddle.randint(0, 256, [b, 3, resolution, resolution]).astype("uint8")
            batch = {"input_ids": input_ids}
            if "cached" in words:
                with paddle.no_grad():
                    batch["latent_moments"] = model.encode_moments(pixels).astype("float16")
            else:
                batch["pixel_values"] = pixels
            step_flops = b * forward.training_flops(cached="cached" in words, recompute="recompute" in words)
            if on_gpu:
                paddle.device.cuda.reset_max_memory_allocated()
            name = f"{args.preset} {resolution}px b{b} {config}{' (xformers on)' if xformers else ''}"
            times = []
            try:
                for i in range(args.warmup + args.steps):
                    if on_gpu:
                        paddle.device.synchronize()
                    t0 = time.perf_counter()
                    with paddle.amp.auto_cast(enable=amp, level="O2" if o2 else "O1", dtype=dtype):
                        loss = model(**batch)
                    (scaler.scale(loss) if scaler else loss).backward()
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.clear_grad(set_to_zero=False)
                    ema.update()
                    if on_gpu:
                        paddle.device.synchronize()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
                seconds = statistics.median(times)
                peak = paddle.device.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                print(f"| {name} | {1000 * seconds:.1f} | {b / seconds:.2f} | {step_flops / seconds / 1e12:.4g} | {peak / GB:.2f} |", flush=True)
            except (MemoryError, RuntimeError) as e:  # out of memory on the device: report it and go on
                print(f"| {name} | failed: {str(e).splitlines()[0][:80]} | | | |", flush=True)
            del model, optimizer, ema, vae, text_encoder, unet, batch
            if on_gpu:
                paddle.device.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ldm_32l", help="config/ preset.")
    parser.add_argument("--resolution", type=int, nargs="+", default=[256], help="Training crop side(s) in pixels.")
    parser.add_argument("--batch_size", type=int, default=6, help="Images per GPU per step (default: the seed's per-device batch).")
    parser.add_argument("--count", action="store_true", help="Count FLOPs and the memory budget (any machine) instead of measuring.")
    parser.add_argument("--configs", nargs="+", default=["fp32", "fp16", "bf16", "bf16+o2", "bf16+recompute", "bf16+noxformers", "bf16+cached"],
                        help="Configurations to measure: +-joined words fp32|fp16|bf16, o2, recompute, noxformers, cached, fp32vae.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    parser.add_argument("--allow_cpu", action="store_true", help="Measure on a CPU build (a smoke test; the numbers say nothing about a GPU).")
    args = parser.parse_args()
    if args.count:
        count_report(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
