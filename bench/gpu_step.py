"""What a training step of a preset costs on a GPU: measured (on a GPU) or counted (anywhere).

Measure, on a machine with a CUDA build of Paddle (one process, one GPU, synthetic batch):

    python bench/gpu_step.py --preset ldm_32l --resolution 256 --batch_size 8 \
        --configs fp16 bf16 fp16+recompute bf16+recompute bf16+noxformers bf16+cached

prints per configuration the median step time (after --warmup steps), images/s and peak GPU
memory (paddle.device.cuda.max_memory_allocated). A configuration is `+`-joined words: fp32, fp16
(O1 autocast, dynamic loss scaling), bf16; recompute; noxformers (standard attention instead of
ppdiffusers' memory-efficient / flash kernels, on by default when available); cached (latents from
moments, no encoder run, as with ldm.cache_latents); fp32vae (encoder kept out of autocast).
The step is the training scripts' (ldm.model.LatentDiffusionModel.forward, AdamW, EMA update).

Count, on any machine (the table of README "GPU plan"):

    python bench/gpu_step.py --count --preset ldm_32l --resolution 256 512 --batch_size 8

runs one forward of batch 1 per resolution with hooks that count multiply-adds of every
convolution, linear layer and attention product, and the bytes of what backward keeps (see
`count`), then prints FLOPs and memory per step for --batch_size.
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
GB = 1024**3


def preset_models(preset, resolution, vocab_size=30522, max_length=77, seed=0):
    """Fresh autoencoder (frozen), LDMBert and UNet of a preset, as stage 2 builds them."""
    import paddle
    from ppdiffusers import AutoencoderKL

    from ldm.model import build_text_encoder, build_unet, init_like_reference

    paddle.seed(seed)
    with open(os.path.join(ROOT, "config", preset, "vae.json")) as f:
        vae = AutoencoderKL(**{k: v for k, v in json.load(f).items() if not k.startswith("_")})
    text_encoder = build_text_encoder(os.path.join(ROOT, "config", preset, "ldmbert.json"), vocab_size, max_length)
    unet = build_unet(os.path.join(ROOT, "config", preset, "unet.json"))
    init_like_reference(text_encoder, unet)
    unet.register_to_config(sample_size=resolution // 2 ** (len(vae.config.block_out_channels) - 1))
    return vae, text_encoder, unet


# ---------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------

CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "LDMBertEncoderLayer")  # what --recompute recomputes


class Counter:
    """Forward hooks on every leaf layer: multiply-adds (Conv2D, Linear, attention's two matmuls)
    and the bytes of the leaf outputs, which is roughly what autograd keeps for backward (one saved
    tensor per op; an estimate, good to ~30%). Outputs inside a recompute unit (a ResnetBlock2D,
    a transformer block, an LDMBert layer) are also summed per unit: with --recompute backward keeps
    only each unit's input, plus one unit's internals at a time."""

    def __init__(self, model):
        import paddle.nn as nn

        self.macs = 0
        self.saved = 0  # elements kept for backward without recompute
        self.attention_probs = 0  # elements of softmax(QK^T): what memory-efficient attention never stores
        self.unit_inputs = 0  # elements of the recompute units' inputs (what recompute keeps of them)
        self.unit_peak = 0  # the largest unit's internals (rebuilt one unit at a time in backward)
        self.inside = 0  # elements kept inside recompute units (what recompute frees)
        self._unit, self._unit_sum = None, 0
        for layer in model.sublayers(include_self=True):
            name = type(layer).__name__
            if name in CHECKPOINT_UNITS:
                layer.register_forward_pre_hook(self._enter)
                layer.register_forward_post_hook(self._leave)
            if name in ("Attention", "LDMBertAttention"):  # the query projection's output gives the shapes
                query = layer.to_q if name == "Attention" else layer.q_proj
                query.register_forward_post_hook(lambda _, inputs, output, attn=layer: self._attention(attn, output))
            if not layer.sublayers() or isinstance(layer, (nn.Conv2D, nn.Linear)):
                layer.register_forward_post_hook(self._leaf)

    def _enter(self, layer, inputs):
        if self._unit is None:
            self._unit, self._unit_sum = layer, 0
            self.unit_inputs += inputs[0].size

    def _leave(self, layer, inputs, output):
        if self._unit is layer:
            self.unit_peak = max(self.unit_peak, self._unit_sum)
            self.inside += self._unit_sum
            self._unit = None

    def _leaf(self, layer, inputs, output):
        import paddle.nn as nn

        out = output[0] if isinstance(output, (tuple, list)) else output
        if not hasattr(out, "size"):
            return
        if isinstance(layer, nn.Conv2D):
            w = layer.weight.shape  # [out, in/groups, kh, kw]
            self.macs += out.size * w[1] * w[2] * w[3]
        elif isinstance(layer, nn.Linear):
            self.macs += out.size * layer.weight.shape[0]  # paddle Linear weight is [in, out]
        self.saved += out.size
        if self._unit is not None:
            self._unit_sum += out.size

    def _attention(self, layer, query):
        batch, queries = query.shape[0], query.shape[1]  # [batch, tokens, heads x head dim]
        if type(layer).__name__ == "LDMBertAttention":
            heads, inner, keys = layer.num_heads, layer.inner_dim, queries
        else:
            heads, inner = layer.heads, layer.inner_dim
            keys = getattr(layer, "_count_keys", None) or queries  # set in count() for cross-attention
        self.macs += 2 * batch * queries * keys * inner  # QK^T and probs @ V
        self.attention_probs += batch * heads * queries * keys
        self.saved += 2 * batch * heads * queries * keys  # scores and probs
        if self._unit is not None:
            self._unit_sum += 2 * batch * heads * queries * keys


def count(preset, resolution, max_length=77):
    """FLOPs and kept elements of one image's forward through each model of the preset."""
    import paddle

    vae, text_encoder, unet = preset_models(preset, resolution, max_length=max_length)
    for layer in unet.sublayers():
        if type(layer).__name__ == "BasicTransformerBlock" and layer.attn2 is not None:
            layer.attn2._count_keys = max_length  # cross-attention: the keys are the caption's tokens
    latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    out = {}
    with paddle.no_grad():
        c = Counter(vae.encoder)
        vae.encode(paddle.zeros([1, 3, resolution, resolution]))
        out["vae_encode"] = c
        c = Counter(text_encoder)
        hidden = text_encoder(paddle.zeros([1, max_length], dtype="int64"))[0]
        out["ldmbert"] = c
        c = Counter(unet)
        unet(paddle.zeros([1, unet.config.in_channels, latent, latent]), paddle.to_tensor([500]), hidden)
        out["unet"] = c
    params = {"ldmbert": sum(p.size for p in text_encoder.parameters() if p.name.find("to_logits") < 0),
              "unet": sum(p.size for p in unet.parameters()), "vae": sum(p.size for p in vae.parameters())}
    return out, params


def count_report(args):
    rows = []
    for resolution in args.resolution:
        counted, params = count(args.preset, resolution)
        b = args.batch_size
        f = {k: 2 * c.macs for k, c in counted.items()}  # FLOPs = 2 x multiply-adds
        train = 3 * (f["ldmbert"] + f["unet"])  # forward + backward (input and weight gradients: 2x forward)
        trainable = params["ldmbert"] + params["unet"]
        act = counted["ldmbert"].saved + counted["unet"].saved
        probs = counted["ldmbert"].attention_probs + counted["unet"].attention_probs
        rows.append((resolution, f, train, trainable, act, probs, params))
        print(f"\n## {args.preset} at {resolution} px, batch {b}")
        print("| quantity | per image | per step (batch %d) |" % b)
        print("|---|---|---|")
        print(f"| autoencoder encode, forward (frozen) | {f['vae_encode'] / 1e9:.1f} GFLOP | {b * f['vae_encode'] / 1e12:.2f} TFLOP |")
        print(f"| LDMBert forward ({77} tokens) | {f['ldmbert'] / 1e9:.1f} GFLOP | {b * f['ldmbert'] / 1e12:.2f} TFLOP |")
        print(f"| UNet forward | {f['unet'] / 1e9:.1f} GFLOP | {b * f['unet'] / 1e12:.2f} TFLOP |")
        print(f"| train step, latents cached: 3 x (LDMBert + UNet) | {train / 1e9:.1f} GFLOP | {b * train / 1e12:.2f} TFLOP |")
        print(f"| train step, encoder run | {(train + f['vae_encode']) / 1e9:.1f} GFLOP | {b * (train + f['vae_encode']) / 1e12:.2f} TFLOP |")
        print(f"| + recompute (one more forward) | {(train + f['vae_encode'] + f['ldmbert'] + f['unet']) / 1e9:.1f} GFLOP | |")
        print(f"| weights fp32 ({trainable / 1e9:.3f}B trainable + {params['vae'] / 1e6:.1f}M autoencoder) | | {(trainable + params['vae']) * 4 / GB:.1f} GiB |")
        print(f"| gradients fp32 | | {trainable * 4 / GB:.1f} GiB |")
        print(f"| AdamW moments (2 x fp32) | | {trainable * 8 / GB:.1f} GiB |")
        print(f"| EMA (fp32, --use_ema) | | {trainable * 4 / GB:.1f} GiB |")
        for label, nbytes in (("fp32", 4), ("fp16/bf16", 2)):
            print(f"| activations kept for backward, {label} | {act * nbytes / GB:.2f} GiB | {b * act * nbytes / GB:.1f} GiB |")
        print(f"| of which attention probabilities (memory-efficient attention keeps none), fp16 | {probs * 2 * 2 / GB:.2f} GiB | {b * probs * 2 * 2 / GB:.1f} GiB |")
        rc = counted["ldmbert"].unit_inputs + counted["unet"].unit_inputs + max(counted["ldmbert"].unit_peak, counted["unet"].unit_peak)
        outside = act - counted["ldmbert"].inside - counted["unet"].inside
        print(f"| activations with recompute, fp16/bf16 | {(rc + outside) * 2 / GB:.2f} GiB | {b * (rc + outside) * 2 / GB:.1f} GiB |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ldm_32l", help="config/ preset.")
    parser.add_argument("--resolution", type=int, nargs="+", default=[256], help="Training crop side(s) in pixels.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per GPU per step.")
    parser.add_argument("--count", action="store_true", help="Count FLOPs and memory (any machine) instead of measuring on a GPU.")
    parser.add_argument("--configs", nargs="+", default=["fp16", "bf16", "fp16+recompute", "bf16+recompute", "bf16+noxformers", "bf16+cached"],
                        help="Configurations to measure: +-joined words fp32|fp16|bf16, recompute, noxformers, cached, fp32vae.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    parser.add_argument("--allow_cpu", action="store_true", help="Run the measurement on a CPU build (a smoke test; numbers mean nothing for a GPU).")
    args = parser.parse_args()
    if args.count:
        count_report(args)
        return
    measure(args)


def measure(args):
    import paddle

    if not paddle.is_compiled_with_cuda() and not args.allow_cpu:
        raise SystemExit("error: this Paddle build has no CUDA; install paddlepaddle-gpu (README Install), or use --count, or --allow_cpu for a smoke test")
    on_gpu = paddle.is_compiled_with_cuda()
    from ldm.model import LatentDiffusionModel, Recipe, decay_parameter_names
    from ldm.ema import EMA

    print("| config | step (ms) | images/s | peak memory (GiB) |")
    print("|---|---|---|---|")
    for resolution in args.resolution:
        for config in args.configs:
            words = set(config.split("+"))
            vae, text_encoder, unet = preset_models(args.preset, resolution)
            model = LatentDiffusionModel(vae, text_encoder, unet, tokenizer=None, recipe=Recipe())
            model.encode_in_float32 = "fp32vae" in words
            if "recompute" in words:
                model.enable_recompute()
            xformers = "noxformers" not in words and model.enable_memory_efficient_attention()
            decay = decay_parameter_names(model)
            optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.trainable_parameters(), weight_decay=0.02,
                                               apply_decay_param_fun=lambda n: n in decay)
            ema = EMA(model, 0.9999)
            dtype = "bfloat16" if "bf16" in words else "float16"
            amp = "fp16" in words or "bf16" in words
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
            if on_gpu:
                paddle.device.cuda.reset_max_memory_allocated()
            times = []
            try:
                for i in range(args.warmup + args.steps):
                    if on_gpu:
                        paddle.device.synchronize()
                    t0 = time.perf_counter()
                    with paddle.amp.auto_cast(enable=amp, level="O1", dtype=dtype):
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
                ms = 1000 * statistics.median(times)
                peak = paddle.device.cuda.max_memory_allocated() / GB if on_gpu else float("nan")
                print(f"| {args.preset} {resolution}px b{b} {config}{' (xformers on)' if xformers else ''} | {ms:.0f} | {1000 * b / ms:.2f} | {peak:.1f} |", flush=True)
            except (MemoryError, RuntimeError) as e:  # out of memory on the device: report it and go on
                print(f"| {args.preset} {resolution}px b{b} {config} | failed: {str(e).splitlines()[0][:80]} | | |", flush=True)
            del model, optimizer, ema, vae, text_encoder, unet, batch
            if on_gpu:
                paddle.device.cuda.empty_cache()


if __name__ == "__main__":
    main()
