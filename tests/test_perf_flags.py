"""GPU speed settings: on where this Paddle build has them, off cleanly on the CPU, and they never change the loss."""
import gc

import numpy as np
import paddle

from test_cache_latents import first_batch, tiny_model


def test_memory_efficient_attention_only_where_the_kernels_exist(shapes, vae_dir):
    """ppdiffusers would raise on a build without memory_efficient_attention; the model keeps standard attention there."""
    from ppdiffusers.models.attention_processor import AttnProcessor, AttnProcessor2_5, XFormersAttnProcessor
    from ppdiffusers.utils.import_utils import is_ppxformers_available

    model = tiny_model(shapes, vae_dir)  # create_model enables it by default (--enable_xformers_memory_efficient_attention)
    processors = {type(p) for p in model.unet.attn_processors.values()}
    if is_ppxformers_available():
        assert processors == {XFormersAttnProcessor}
    else:
        assert not model.enable_memory_efficient_attention()
        assert processors <= {AttnProcessor, AttnProcessor2_5} and XFormersAttnProcessor not in processors


def test_to_static_gives_the_eager_loss_and_gradients(shapes, vae_dir):
    """--to_static compiles UNet and LDMBert (paddle.jit.to_static, SOT): same loss and gradients as eager."""
    model = tiny_model(shapes, vae_dir)
    with paddle.no_grad():
        # The reference's zero-initialised output convolutions would leave LDMBert without gradient.
        for p in model.trainable_parameters():
            if not p.abs().max():
                p.set_value(paddle.randn(p.shape) * 0.05)
    batch = first_batch(shapes["file_list"], model)
    results = []
    # SOT calls gc.collect() after translating each frame (paddle/jit/sot/.../executor_cache.py,
    # start_translate): ~100 times for this model, each walking every object this pytest process
    # holds (~0.25 s apiece, most of the test's time). gc.freeze() leaves the objects that exist now
    # out of those collections; the translation and what it yields are the same.
    gc.freeze()
    try:
        for compiled in (False, True):
            if compiled:
                model.compile_static()
            model.train()
            paddle.seed(11)
            loss = model(**batch)
            loss.backward()
            grads = [p.grad.numpy().copy() for p in (model.unet.conv_in.weight, model.text_encoder.model.embed_tokens.weight)]
            model.clear_gradients()
            results.append((float(loss), grads))
    finally:
        gc.unfreeze()
    (eager_loss, eager_grads), (static_loss, static_grads) = results
    assert abs(static_loss - eager_loss) <= 1e-5 * abs(eager_loss)
    for e, s in zip(eager_grads, static_grads):
        assert np.abs(e).max() > 0
        np.testing.assert_allclose(s, e, rtol=1e-3, atol=1e-6 * np.abs(e).max())


def test_recompute_runs_each_block_forward_again_in_backward(shapes, vae_dir):
    """--recompute (create_model(recompute=True), as both scripts call it) keeps no activations of a
    checkpointed block and runs its forward again during backward: a forward pre-hook counts 2 calls
    per step of a UNet ResNet block and of an LDMBert layer where a plain step makes 1. Loss and
    gradients are those of the plain step (test_distributed_correctness checks whole runs)."""
    from ldm.training.args import ModelArguments
    from ldm.models.recipe import Recipe
    from ldm.training.build import create_model

    from conftest import ROOT

    model_args = ModelArguments(vae_name_or_path=str(vae_dir), tokenizer_name=shapes["tokenizer"], model_max_length=16,
                                text_encoder_config_file=f"{ROOT}/config/tiny/ldmbert.json", unet_config_file=f"{ROOT}/config/tiny/unet.json")
    results = {}
    for recompute in (False, True):
        model = create_model(model_args, 32, seed=3, recompute=recompute, recipe=Recipe(prediction_type="v_prediction"))
        model.train()
        with paddle.no_grad():
            # The reference's zero-initialised output convs would leave conv_in and LDMBert without gradient.
            paddle.seed(7)
            for p in model.trainable_parameters():
                if not p.abs().max():
                    p.set_value(paddle.randn(p.shape) * 0.05)
        blocks = {"unet": model.unet.down_blocks[0].resnets[0], "ldmbert": model.text_encoder.model.layers[0]}
        calls = {name: 0 for name in blocks}

        def counter(name):
            def hook(layer, inputs):
                calls[name] += 1
            return hook

        hooks = [block.register_forward_pre_hook(counter(name)) for name, block in blocks.items()]
        batch = first_batch(shapes["file_list"], model)
        paddle.seed(11)
        loss = model(**batch)
        forward_calls = dict(calls)
        loss.backward()
        for h in hooks:
            h.remove()
        grads = [p.grad.numpy().copy() for p in (model.unet.conv_in.weight, model.text_encoder.model.embed_tokens.weight)]
        results[recompute] = (float(loss), forward_calls, dict(calls), grads)
    (plain_loss, plain_fwd, plain_calls, plain_grads), (rec_loss, rec_fwd, rec_calls, rec_grads) = results[False], results[True]
    assert plain_fwd == rec_fwd == {"unet": 1, "ldmbert": 1}
    assert plain_calls == {"unet": 1, "ldmbert": 1}, plain_calls
    assert rec_calls == {"unet": 2, "ldmbert": 2}, rec_calls
    assert rec_loss == plain_loss
    for a, b in zip(plain_grads, rec_grads):
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7 * np.abs(a).max())
