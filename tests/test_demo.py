"""demo.py's own logic (the training it runs is the scripts' tests' business): how it splits
the batch over processes and starts them."""
import os
import sys

from conftest import run_script

from ldm.training.runs import trainer


def test_one_process_runs_the_script_two_go_through_paddles_launcher(tmp_path):
    assert trainer(1, "train_vae.py", str(tmp_path)) == [sys.executable, "train_vae.py"]
    cmd = trainer(2, "train_vae.py", str(tmp_path / "logs"))
    assert cmd[:3] == [sys.executable, "-m", "paddle.distributed.launch"] and cmd[-1] == "train_vae.py"
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[cmd.index("--log_dir") + 1] == str(tmp_path / "logs")


def test_a_batch_that_does_not_split_over_the_processes_stops_at_start_up(tmp_path):
    res = run_script(["demo.py", "--batch_size", "15", "--processes", "2", "--output_dir", str(tmp_path)], timeout=60)
    assert res.returncode == 2 and "--batch_size 15 must split evenly over --processes 2" in res.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def test_the_default_is_one_process_per_core_up_to_two_on_a_cpu():
    """A machine that gives us one core runs the plain script (no launcher); more cores, 2 processes."""
    code = ("import os, sys; sys.path.insert(0, '.'); os.sched_setaffinity(0, {cores}); import demo; "
            "print('processes', demo.default_processes())")
    one = run_script(["-c", code.format(cores="{0}")], timeout=120)
    assert one.returncode == 0 and "processes 1" in one.stdout, one.stderr[-2000:]
    if len(os.sched_getaffinity(0)) >= 2:
        two = run_script(["-c", code.format(cores="os.sched_getaffinity(0)")], timeout=120)
        assert two.returncode == 0 and "processes 2" in two.stdout, two.stderr[-2000:]


def test_the_demo_unet_reads_the_caption_at_both_levels_and_attends_to_itself_at_8x8():
    """config/demo/unet.json: two levels, 16x16 and 8x8 (the 3-seed quality figures of docs/quality.md
    are this UNet's; a third, 4x4 level cost the same step time). At the 16x16 latents, where the shape's edges are
    drawn, both attention layers read the caption (the cheapest way to give that level the text:
    self-attention over 256 positions would cost more); at 8x8 the usual self- then cross-attention,
    which also gives every position the whole image (left, middle or right)."""
    import json

    import paddle
    from ppdiffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(json.load(open("config/demo/unet.json")))
    first = lambda block: block.attentions[0].transformer_blocks[0]
    text_width = unet.config.cross_attention_dim
    for block in (unet.down_blocks[0], unet.up_blocks[-1]):  # 16x16: 32 channels, keys from the 64-wide text
        assert first(block).attn1.to_k.weight.shape[0] == text_width and first(block).attn2.to_k.weight.shape[0] == text_width
    for block in (unet.down_blocks[1], unet.up_blocks[0], unet.mid_block):  # 8x8
        attention = block.attentions[0].transformer_blocks[0]
        assert not attention.only_cross_attention
    sizes = []
    hook = unet.mid_block.register_forward_post_hook(lambda layer, inputs, output: sizes.append(output.shape[-1]))
    out = unet(paddle.randn([1, 4, 16, 16]), paddle.to_tensor([10]), paddle.randn([1, 16, text_width])).sample
    hook.remove()
    assert out.shape == [1, 4, 16, 16] and sizes == [8]  # the bottleneck is 8x8: no 4x4 level
