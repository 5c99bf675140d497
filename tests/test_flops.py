"""The FLOP counter (ldm.flops) against a hand count and against Paddle's own paddle.flops, and
bench/gpu_step.py's measurement run on the CPU (what a GPU user runs, so it keeps working)."""
import re

import paddle
import paddle.nn as nn
from paddle.hapi.dynamic_flops import count_linear

from conftest import run_script
from ldm.flops import Counter, count_forward


def test_counter_counts_a_convolution_as_by_hand_and_as_paddle_flops():
    conv = nn.Conv2D(8, 16, 3, padding=1, bias_attr=False)
    counter = Counter(conv)
    with paddle.no_grad():
        conv(paddle.zeros([1, 8, 10, 10]))
    counter.remove()
    by_hand = 16 * 10 * 10 * (8 * 3 * 3)  # one multiply-add per output element per input tap
    assert counter.macs == by_hand and counter.flops == 2 * by_hand
    assert paddle.flops(nn.Sequential(conv), [1, 8, 10, 10]) == by_hand  # (it sums sublayers only)


def test_counter_agrees_with_paddle_flops_on_the_tiny_unet():
    """paddle.flops hooks Conv2D and Linear too (plus one add per output for a conv's bias, left
    out here) and does not see attention's matmuls, which are not layers: the rest must agree."""
    from bench.gpu_step import preset_models

    vae, text_encoder, unet = preset_models("tiny", 32)
    count = count_forward(vae, text_encoder, unet, 32, 77)
    hidden = text_encoder(paddle.zeros([1, 77], dtype="int64"))[0]

    class UNetOnLatents(nn.Layer):  # paddle.flops feeds one tensor
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x):
            return self.unet(x, paddle.to_tensor([500]), hidden).sample

    def conv_without_bias(m, x, y):
        m.total_ops += int(y.numel()) * int(m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3])

    # paddle.flops picks its counter by exact class, and ppdiffusers' layers are subclasses
    # (LoRACompatibleConv, LoRACompatibleLinear): name them, with paddle's own Linear counter.
    custom = {type(m): conv_without_bias for m in unet.sublayers() if isinstance(m, nn.Conv2D)}
    custom.update({type(m): count_linear for m in unet.sublayers() if isinstance(m, nn.Linear)})
    with paddle.no_grad():
        theirs = paddle.flops(UNetOnLatents(), [1, 4, 8, 8], custom_ops=custom)
    assert count.unet.attention_macs > 0
    assert count.unet.macs - count.unet.attention_macs == theirs
    # Counting removed its hooks: the model runs as before.
    assert all(not layer._forward_post_hooks for layer in unet.sublayers(include_self=True))
    # Training costs 3 forwards of what is trained, plus the encoder unless cached, plus one with recompute.
    trained = count.ldmbert.flops + count.unet.flops
    assert count.training_flops(cached=True) == 3 * trained
    assert count.training_flops(cached=False, recompute=True) == 4 * trained + count.vae_encode.flops


def test_gpu_step_measures_on_the_cpu():
    res = run_script(["bench/gpu_step.py", "--preset", "tiny", "--resolution", "32", "--batch_size", "2", "--configs", "fp32",
                      "fp32+recompute", "fp32+cached", "--steps", "2", "--warmup", "1", "--allow_cpu"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| config | step (ms) | images/s | TFLOP/s | peak memory (GiB) |" in res.stdout
    rows = [line.split("|")[1:-1] for line in res.stdout.splitlines() if re.match(r"\| tiny 32px b2 ", line)]
    assert [r[0].split()[-1] for r in rows] == ["fp32", "fp32+recompute", "fp32+cached"], res.stdout
    for name, ms, images, tflops, memory in rows:
        assert float(ms) > 0 and float(images) > 0 and float(tflops) > 0 and float(memory) > 0, res.stdout
    # Same step, fewer FLOPs counted: no encoder with cached latents, one more forward with recompute.
    rates = {r[0].split()[-1]: float(r[3]) / float(r[2]) for r in rows}  # TFLOP per image
    assert rates["fp32+cached"] < rates["fp32"] < rates["fp32+recompute"]
