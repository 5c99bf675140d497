"""FLOPs (and what backward keeps) of a training step, counted on the real modules, not a formula.

One forward of one image through the frozen autoencoder's encoder, LDMBert and the UNet runs with
hooks on every layer (`Counter`):

* FLOPs = 2 x the multiply-adds of every `Conv2D` and `Linear` and of attention's two matrix
  products (QK^T and probabilities x V, with the real key count: the caption's tokens in
  cross-attention). Left out: biases, norms, activations, softmax, the noise schedule and the
  optimizer (few FLOPs next to these, though not free in time).
* A training image costs 3 x the forward of LDMBert and UNet (backward computes input and weight
  gradients, 2 x forward), plus the encoder's forward when the latents are not cached (frozen: no
  backward), plus one more forward of LDMBert and UNet with --recompute (`training_flops`).

The training scripts count once at start-up (`flops_per_training_image`; on a GPU that is one
forward of one image, on the CPU less than one training step of one image) and log the achieved
`tflops_per_device`; bench/gpu_step.py uses the same count for its TFLOP/s and its budget
(docs/performance.md).
"""
from dataclasses import dataclass

import paddle
import paddle.nn as nn

# What --recompute checkpoints: ppdiffusers' gradient checkpointing wraps every ResNet block and
# transformer block of the UNet, and LDMBert's every encoder layer.
CHECKPOINT_UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "LDMBertEncoderLayer")


class Counter:
    """Forward hooks on every layer of `model`, removed by `remove()`. Counts multiply-adds (Conv2D,
    Linear, attention's two matmuls) and the elements of every leaf layer's output, roughly what
    autograd keeps for backward (one saved tensor per op; an estimate, good to ~30%), plus attention
    scores and probabilities. Elements inside a recompute unit are also summed per unit: with
    --recompute backward keeps only each unit's input, and rebuilds one unit's internals at a time."""

    def __init__(self, model: nn.Layer):
        self.macs = 0
        self.attention_macs = 0  # of which attention's two matmuls (not layers: paddle.flops leaves them out)
        self.saved = 0  # elements kept for backward without recompute
        self.attention = 0  # of which attention scores and probabilities: what memory-efficient attention never stores
        self.unit_inputs = 0  # elements of the recompute units' inputs (what recompute keeps of them)
        self.inside = 0  # elements kept inside recompute units (what recompute frees)
        self.inside_attention = 0  # of which attention scores and probabilities
        # The largest unit's internals, with and without attention (rebuilt one unit at a time in backward).
        self.unit_peak, self.unit_peak_no_attention = 0, 0
        self._unit, self._unit_sum, self._unit_attention = None, 0, 0
        self._handles = []
        self._queries = {}  # attention layer -> its query projection's output shape
        for layer in model.sublayers(include_self=True):
            name = type(layer).__name__
            if name in CHECKPOINT_UNITS:
                self._hook(layer.register_forward_pre_hook(self._enter))
                self._hook(layer.register_forward_post_hook(self._leave))
            if name in ("Attention", "LDMBertAttention"):
                # Every processor projects the queries first, then the keys: the two outputs give
                # the attention's shape (keys are the caption's tokens in cross-attention).
                query, key = (layer.to_q, layer.to_k) if name == "Attention" else (layer.q_proj, layer.k_proj)
                self._hook(query.register_forward_post_hook(lambda _, i, out, attn=layer: self._queries.__setitem__(id(attn), out.shape)))
                self._hook(key.register_forward_post_hook(lambda _, i, out, attn=layer: self._attention(attn, out.shape[1])))
            if not layer.sublayers() or isinstance(layer, (nn.Conv2D, nn.Linear)):
                self._hook(layer.register_forward_post_hook(self._leaf))

    def _hook(self, handle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def kept(self, recompute: bool = False, memory_efficient_attention: bool = False) -> int:
        """Elements kept for backward. With --recompute: each unit's input, the largest unit's
        internals (rebuilt during backward) and everything outside the units. Memory-efficient /
        flash attention keeps no attention scores or probabilities."""
        if not recompute:
            return self.saved - (self.attention if memory_efficient_attention else 0)
        outside = self.saved - self.inside - (self.attention - self.inside_attention if memory_efficient_attention else 0)
        return outside + self.unit_inputs + (self.unit_peak_no_attention if memory_efficient_attention else self.unit_peak)

    def _enter(self, layer, inputs):
        if self._unit is None:
            self._unit, self._unit_sum, self._unit_attention = layer, 0, 0
            self.unit_inputs += inputs[0].size

    def _leave(self, layer, inputs, output):
        if self._unit is layer:
            self.unit_peak = max(self.unit_peak, self._unit_sum)
            self.unit_peak_no_attention = max(self.unit_peak_no_attention, self._unit_sum - self._unit_attention)
            self.inside += self._unit_sum
            self.inside_attention += self._unit_attention
            self._unit = None

    def _keep(self, elements: int, attention: bool = False) -> None:
        self.saved += elements
        self.attention += elements if attention else 0
        if self._unit is not None:
            self._unit_sum += elements
            self._unit_attention += elements if attention else 0

    def _leaf(self, layer, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not hasattr(out, "size"):
            return
        if isinstance(layer, nn.Conv2D):
            w = layer.weight.shape  # [out, in / groups, kh, kw]
            self.macs += out.size * w[1] * w[2] * w[3]
        elif isinstance(layer, nn.Linear):
            self.macs += out.size * layer.weight.shape[0]  # paddle's Linear weight is [in, out]
        self._keep(out.size)

    def _attention(self, layer, keys: int):
        batch, queries = self._queries[id(layer)][:2]  # [batch, tokens, heads x head dim]
        heads = layer.num_heads if type(layer).__name__ == "LDMBertAttention" else layer.heads
        self.attention_macs += 2 * batch * queries * keys * layer.inner_dim  # QK^T and probabilities @ V
        self.macs += 2 * batch * queries * keys * layer.inner_dim
        self._keep(2 * batch * heads * queries * keys, attention=True)  # scores and probabilities


@dataclass
class ForwardCount:
    """One image's forward through each model: `Counter`s of the encoder, LDMBert and UNet."""

    vae_encode: Counter
    ldmbert: Counter
    unet: Counter

    def training_flops(self, cached: bool, recompute: bool = False) -> float:
        """FLOPs of one training image: forward + backward (3 x forward) of LDMBert and UNet, the
        frozen encoder's forward unless the latents are cached, one more forward with --recompute."""
        trained = self.ldmbert.flops + self.unet.flops
        return 3 * trained + (0 if cached else self.vae_encode.flops) + (trained if recompute else 0)


@paddle.no_grad()
def count_forward(vae, text_encoder, unet, resolution: int, max_length: int) -> ForwardCount:
    """Run one image (zeros: FLOPs do not depend on the values) through the encoder, LDMBert
    (`max_length` tokens, as the tokenizer pads them) and the UNet at `resolution` with counters on,
    in eval mode, leaving the training RNG and the models' modes as they were."""
    from ldm.models.ldm import evaluating
    from ldm.core.rng import preserved_rng

    def counted(layer, run):
        counter = Counter(layer)
        try:
            with evaluating(layer):
                return counter, run()
        finally:
            counter.remove()

    with preserved_rng():
        vae_c, _ = counted(vae.encoder, lambda: vae.encode(paddle.zeros([1, vae.config.in_channels, resolution, resolution])))
        latent = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        bert_c, hidden = counted(text_encoder, lambda: text_encoder(paddle.zeros([1, max_length], dtype="int64"))[0])
        unet_c, _ = counted(unet, lambda: unet(paddle.zeros([1, unet.config.in_channels, latent, latent]), paddle.to_tensor([500]), hidden))
    return ForwardCount(vae_c, bert_c, unet_c)


def flops_per_training_image(model, resolution: int, cached: bool, recompute: bool) -> float:
    """What the training scripts log `tflops_per_device` from: `ForwardCount.training_flops` of the
    model (a LatentDiffusionModel) at the training resolution, counted once at start-up (before
    --to_static compiles the model) and said in the start-up log. With --aspect_ratio_buckets the
    images are buckets of about resolution^2 pixels; the count is the square's."""
    from paddlenlp.utils.log import logger

    count = count_forward(model.vae, model.text_encoder, model.unet, resolution, model.tokenizer.model_max_length)
    flops = count.training_flops(cached, recompute)
    logger.info(f"FLOPs per training image at {resolution} px: {flops / 1e9:.2f} GFLOP (counted on the modules: "
                f"3 x forward of LDMBert and UNet{'' if cached else ' + encoder forward'}{' + recompute forward' if recompute else ''}); "
                f"logged as tflops_per_device = images_per_second_per_device x this")
    return flops
