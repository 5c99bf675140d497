"""Where one stage-2 training step's time goes on the CPU, by kind of work, and its FLOP/s against the machine's peak.

    python bench/step_profile.py [--unet_config config/demo/unet.json] [--batch_size 8] [--threads 1]
                                 [--steps 10] [--warmup 3]

The model is `make demo`'s stage 2 (defaults: LDMBert config/tiny/ldmbert.json, UNet
config/demo/unet.json, the f=2 autoencoder config/demo/vae.json, 32 px, 16 tokens), built by the
training scripts' own `ldm.training.build.create_model`, and each step is what the scripts run from cached
latents: `loss = model(input_ids, latent_moments); loss.backward(); AdamW step; clear_grad`. The
defaults are one of the demo's 2 processes on 2 cores: 8 images and 1 thread (weights are random:
time and FLOPs do not depend on them).

The steps are timed plainly (median), then run again under Paddle's profiler, and each operator's
CPU time (forward and its _grad) is put in one kind:
  convolution  conv2d and its gradient;
  attention    the matmuls outside nn.Linear (QK^T and probabilities x V, in the UNet and LDMBert),
               softmax, and their gradients (op_seconds says how the matmuls' backward is split);
  linear       nn.Linear's matmul (the projections of attention and feed-forward, the time embedding;
               its bias add is in other ops);
  norm         group_norm, layer_norm;
  optimizer    AdamW's update and clearing the gradients;
  other ops    every other operator: element-wise, activations, reshapes, the loss, ...;
  overhead     the step's wall time (profiled) less the operators' time: Python, the autograd
               engine's bookkeeping and the dispatch between operators.
FLOPs per step are ldm.models.flops' count (3 x the forward of LDMBert and UNet per image, cached
latents; docs/performance.md says what is counted), against two peaks: the cores' (nominal clock
x fp32 FLOPs a cycle from the CPU's vector units, for the threads used) and what Paddle itself
reaches on a large matmul here (the practical ceiling of its kernels).
Last line: `step_profile: N ms per step, convolution P%, attention P%, ..., F GFLOP/s = P% of peak`.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KINDS = ("convolution", "attention", "linear", "norm", "optimizer", "other ops", "overhead")


def kind_of(op_name):
    """The kind (KINDS) of one profiled operator by its name: forward ops are named `conv2d dygraph`,
    backward ones `Global_Conv2dGradNodeFinal`; a matmul's kind is decided by where it runs (`op_seconds`)."""
    name = op_name.lower().replace("global_", "").split(" ")[0]
    if "conv2d" in name or "conv_transpose" in name:
        return "convolution"
    if name.startswith("softmax"):
        return "attention"
    if "norm" in name:
        return "norm"
    if "adam" in name:
        return "optimizer"
    return "other ops"


def op_seconds(roots):
    """{kind: seconds} over the profiled operators (each top-level operator once: not its inner
    events). Forward ops sit under their layer's event (its class name): a matmul inside a `Linear`
    (nn.Linear, ppdiffusers' LoRACompatibleLinear) is linear, any other (QK^T, probabilities x V) attention. Backward nodes carry no layer, so the
    matmuls' backward time (MatmulGradNode) is split between linear and attention as their forward
    time is (the backward of a matmul is two matmuls of the forward's sizes)."""
    from paddle.profiler.profiler_statistic import TracerEventType

    seconds = dict.fromkeys(KINDS, 0.0)
    matmul = {"linear": 0.0, "attention": 0.0, "backward": 0.0}

    def walk(node, in_linear):
        if node.type == TracerEventType.Operator:
            took = (node.end_ns - node.start_ns) / 1e9
            name = node.name.lower()
            if name.startswith("matmul"):
                matmul["linear" if in_linear else "attention"] += took
            elif "matmulgrad" in name:
                matmul["backward"] += took
            else:
                seconds[kind_of(node.name)] += took
            return
        for child in node.children_node:
            walk(child, in_linear or (node.type == TracerEventType.Forward and node.name.endswith("Linear")))

    for root in roots:
        walk(root, False)
    forward = matmul["linear"] + matmul["attention"]
    for kind in ("linear", "attention"):
        seconds[kind] += matmul[kind] + (matmul["backward"] * matmul[kind] / forward if forward else 0.0)
    return seconds


def build(args, tmp):
    """The demo's stage-2 model from scratch, and one batch of it (captions of the sample data,
    cached-latent moments as ldm.cache_latents stores them)."""
    import paddle
    from ppdiffusers import AutoencoderKL

    from ldm.training.args import ModelArguments
    from ldm.training.build import create_model
    from ldm.training.runs import TOKENS
    from ldm.data.sample_data import random_record
    from ldm.data.tokenizer import build_vocab, write_tokenizer
    import numpy as np

    rng = np.random.default_rng(0)
    captions = [random_record(rng, 8)[0] for _ in range(max(64, args.batch_size))]
    tokenizer = write_tokenizer(build_vocab(lambda: captions), os.path.join(tmp, "tokenizer"), model_max_length=TOKENS)
    with open(os.path.join(ROOT, args.vae_config)) as f:
        vae_config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    AutoencoderKL(**vae_config).save_pretrained(os.path.join(tmp, "vae"))
    model_args = ModelArguments(vae_name_or_path=os.path.join(tmp, "vae"), tokenizer_name=tokenizer, model_max_length=TOKENS,
                                text_encoder_config_file=os.path.join(ROOT, args.ldmbert_config),
                                unet_config_file=os.path.join(ROOT, args.unet_config))
    model = create_model(model_args, args.resolution, seed=23)
    ids = model.tokenizer(captions[: args.batch_size], padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pd").input_ids
    with paddle.no_grad():
        moments = model.encode_moments(paddle.rand([args.batch_size, 3, args.resolution, args.resolution]) * 255)
    return model, {"input_ids": ids, "latent_moments": moments}


def peak_flops(threads):
    """(nominal peak of `threads` cores, its description): clock from /proc/cpuinfo x fp32 FLOPs
    a cycle. Two FMA pipes a core (AMD Zen, Intel since Haswell), each 8 fp32 lanes wide (256-bit;
    Zen 4 runs AVX-512 as two 256-bit halves; Intel server cores with two 512-bit FMA units would
    double this)."""
    mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    flops_per_cycle = 2 * 8 * 2  # pipes x lanes x (multiply + add)
    return threads * mhz * 1e6 * flops_per_cycle, f"{threads} core(s) x {mhz / 1000:.2f} GHz x {flops_per_cycle} FLOP/cycle"


def paddle_matmul_flops(n=1024, repeats=10):
    """FLOP/s of Paddle's own fp32 matmul on n x n matrices (the best of `repeats`)."""
    import paddle

    a, b = paddle.randn([n, n]), paddle.randn([n, n])
    (a @ b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        (a @ b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ldmbert_config", default="config/tiny/ldmbert.json", help="LDMBert config (as make demo).")
    parser.add_argument("--unet_config", default="config/demo/unet.json", help="UNet config (as make demo).")
    parser.add_argument("--vae_config", default="config/demo/vae.json", help="Autoencoder config: sets the latents' size (as make demo, f=2).")
    parser.add_argument("--resolution", type=int, default=32, help="Training image side in pixels.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per step (make demo: 16 over 2 processes = 8 each).")
    parser.add_argument("--threads", type=int, default=1, help="Paddle CPU threads (make demo: 1 per process on 2 cores).")
    parser.add_argument("--steps", type=int, default=10, help="Steps timed, and steps profiled.")
    parser.add_argument("--warmup", type=int, default=3, help="Steps run first, untimed.")
    args = parser.parse_args()

    import paddle
    import paddle.profiler as profiler
    from paddle.profiler.profiler_statistic import StatisticData
    from paddlenlp.utils.log import logger

    from ldm.models.flops import flops_per_training_image
    from ldm.training.build import decay_parameter_names
    from ldm.training.runtime import set_cpu_threads

    logger.set_level("WARNING")
    set_cpu_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, batch = build(args, tmp)
    flops = args.batch_size * flops_per_training_image(model, args.resolution, cached=True, recompute=False)
    decay = decay_parameter_names(model)
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.trainable_parameters(), weight_decay=0.02,
                                       apply_decay_param_fun=lambda name: name in decay)
    model.train()

    def step():
        start = time.perf_counter()
        loss = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)  # the step is done (CPU kernels run synchronously; this keeps a GPU run honest too)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    plain = statistics.median(step() for _ in range(args.steps))

    # The same steps under the profiler: operators' CPU time, by kind.
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda _: None)  # no trace file
    prof.start()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
        prof.step()
    profiled = (time.perf_counter() - start) / args.steps
    prof.stop()
    seconds = {kind: s / args.steps for kind, s in op_seconds(prof.profiler_result.get_data().values()).items()}
    seconds["overhead"] = max(0.0, profiled - sum(seconds.values()))
    items = StatisticData(prof.profiler_result.get_data(), prof.profiler_result.get_extra_info()).event_summary.items
    ops = {name: item.cpu_time / 1e9 / args.steps for name, item in items.items()}

    peak, peak_how = peak_flops(args.threads)
    matmul = paddle_matmul_flops()
    achieved = flops / plain
    print(f"demo stage-2 step: {args.batch_size} images at {args.resolution} px, {args.threads} thread(s); "
          f"{sum(p.size for p in model.trainable_parameters()) / 1e6:.2f}M trainable parameters")
    print(f"step: {1000 * plain:.1f} ms (median of {args.steps}); under the profiler {1000 * profiled:.1f} ms")
    print("\n| kind | ms per step (profiled) | share |\n|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {1000 * seconds[kind]:.1f} | {seconds[kind] / profiled:.0%} |")
    print("\nslowest operators (ms per step): " + ", ".join(f"{n} {1000 * s:.1f}" for n, s in sorted(ops.items(), key=lambda x: -x[1])[:12]))
    print(f"\nFLOPs per step (ldm.models.flops, {args.batch_size} images): {flops / 1e9:.2f} GFLOP -> {achieved / 1e9:.2f} GFLOP/s")
    print(f"peak: {peak / 1e9:.0f} GFLOP/s nominal ({peak_how}); Paddle's 1024^3 matmul here: {matmul / 1e9:.1f} GFLOP/s")
    print(f"step_profile: {1000 * plain:.0f} ms per step, " + ", ".join(f"{k} {seconds[k] / profiled:.0%}" for k in KINDS)
          + f", {achieved / 1e9:.2f} GFLOP/s = {achieved / peak:.1%} of peak ({achieved / matmul:.1%} of Paddle's matmul)")


if __name__ == "__main__":
    main()
