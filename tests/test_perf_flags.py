"""GPU speed settings: on where this Paddle build has them, off cleanly on the CPU, and they never change the loss."""
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
    (eager_loss, eager_grads), (static_loss, static_grads) = results
    assert abs(static_loss - eager_loss) <= 1e-5 * abs(eager_loss)
    for e, s in zip(eager_grads, static_grads):
        assert np.abs(e).max() > 0
        np.testing.assert_allclose(s, e, rtol=1e-3, atol=1e-6 * np.abs(e).max())
