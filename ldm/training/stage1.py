"""Stage 1: the image autoencoder (AutoencoderKL) that stage 2 trains on top of, frozen.

Loss as in the LDM paper's KL autoencoders (CompVis `LPIPSWithDiscriminator`), per pixel:
    L1(x, x_rec) + kl_weight * KL(q(z|x) || N(0, I)) + d_weight * g_loss
where g_loss = -D(x_rec) is the patch-GAN discriminator's verdict (ldm.discriminator), switched on
after --disc_start optimizer steps, and d_weight = disc_weight * the adaptive weight (the
reconstruction's gradient norm over the adversarial one's at the decoder's last layer). The
discriminator learns with the hinge loss on real images and reconstructions. Left out: the
perceptual (LPIPS) term, whose VGG16 weights come from a model hub (nothing here downloads).
After training, `scaling_factor` is set to 1 / std of the latents so stage 2's diffusion
sees unit-variance latents (the LDM paper, section 4.3.2 and appendix D.1; 0.18215 for KL-f8).

How the two networks train inside the one-optimizer PaddleNLP Trainer (and why that is exact):
CompVis steps two Adams per batch, one for the autoencoder and one for the discriminator D.
Here the training model owns D and one forward returns the sum of both losses,
    loss = [L1 + kl_weight * KL + d_weight * g_loss] + hinge(D(x), D(x_rec.detach()))
with g_loss computed through D's weights frozen (`discriminator.frozen`), so backward sends the
first bracket's gradient only to the autoencoder and the hinge loss's only to D: exactly the two
gradients CompVis' two optimizers see. Adam works weight by weight, so the Trainer's one Adam over
both sets (same learning rate, betas (0.5, 0.9), no weight decay: CompVis' settings for both) is
those two Adams, and the Trainer's machinery covers D with no extra code:
  * gradient accumulation scales and sums both losses alike;
  * with DataParallel both sets of gradients are averaged in the same all-reduce;
  * D's weights are in the model's state dict and its Adam moments in the optimizer's, so a
    checkpoint saves them and a resume restores them; a skipped non-finite step skips both.
The one difference: D learns from this forward's reconstruction (simultaneous updates), where
CompVis runs a second forward after the autoencoder's step (alternating updates).
Before --disc_start D is not run at all (CompVis runs it and multiplies its losses by 0): each of
its weights gets an exact zero gradient instead, so DataParallel's all-reduce (which waits for
every trainable weight) completes and Adam leaves them unchanged (zero moments, zero update).
The EMA (--use_ema) averages the autoencoder only: D is frozen while the trainer builds it.
"""
import contextlib
from typing import Dict, Optional

import numpy as np
import paddle
import paddle.nn as nn
from ppdiffusers import AutoencoderKL

from ldm.models.discriminator import NLayerDiscriminator, adaptive_weight, frozen, hinge_d_loss
from ldm.models.ldm import evaluating, to_model_range, to_uint8
from ldm.training.trainer import StreamTrainer


class LossTerms:
    """Running means of the loss's parts between two log lines, kept on the device (no host sync per step)."""

    def __init__(self):
        self.sums: Dict[str, paddle.Tensor] = {}
        self.count = 0

    def add(self, terms: Dict[str, paddle.Tensor]) -> None:
        for name, value in terms.items():
            value = paddle.to_tensor(value, dtype="float32") if not isinstance(value, paddle.Tensor) else value.detach().astype("float32")
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def pop_means(self) -> Dict[str, float]:
        means = {name: float(total) / self.count for name, total in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means


class AutoencoderTrainingModel(nn.Layer):
    """The autoencoder with its stage-1 loss (module docstring); `discriminator=None` trains without the adversarial term."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float = 1e-6, discriminator: Optional[NLayerDiscriminator] = None,
                 disc_start: int = 50001, disc_weight: float = 0.5):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.discriminator = discriminator
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.global_step = 0  # optimizer steps done; the trainer sets it before each forward
        self.loss_terms = LossTerms()

    def adversarial(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.disc_start

    def forward(self, pixel_values=None, **kwargs):
        pixel_values = to_model_range(pixel_values)
        posterior = self.vae.encode(pixel_values).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        rec_loss = (reconstruction - pixel_values).abs().mean()
        pixels_per_image = pixel_values[0].numel().astype("float32")
        kl_loss = posterior.kl().mean() / pixels_per_image
        loss = rec_loss + self.kl_weight * kl_loss
        terms = {"rec_loss": rec_loss, "kl_loss": kl_loss}
        if self.adversarial():
            with frozen(self.discriminator):  # the generator's term trains the autoencoder only
                g_loss = -self.discriminator(reconstruction).mean()
            d_weight = self.disc_weight * adaptive_weight(rec_loss, g_loss, self.vae.decoder.conv_out.weight)
            # Real and reconstructed images in separate calls: batch norm normalises each batch by its own statistics (as CompVis).
            logits_real = self.discriminator(pixel_values)
            logits_fake = self.discriminator(reconstruction.detach())
            d_loss = hinge_d_loss(logits_real, logits_fake)
            loss = loss + d_weight * g_loss + d_loss
            terms.update(g_loss=g_loss, d_weight=d_weight, disc_loss=d_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
        elif self.discriminator is not None:
            # Not yet in (see the module docstring): an exact zero gradient for every weight of D.
            loss = loss + 0.0 * paddle.add_n([p.sum() for p in self.discriminator.parameters() if not p.stop_gradient])
            terms.update(d_weight=0.0, disc_loss=0.0)
        self.loss_terms.add(terms)
        return loss

    @paddle.no_grad()
    def log_images(self, batch, num_inference_steps: int = 0):
        images = to_model_range(batch["pixel_values"])
        with evaluating(self):
            out = self.vae(images, sample_posterior=False).sample
        return {"reconstruction": to_uint8(out), "input": to_uint8(images)}

    @paddle.no_grad()
    def measure_scaling_factor(self, batches) -> float:
        """1 / std of posterior samples over the given image batches."""
        with evaluating(self):
            latents = [self.vae.encode(to_model_range(b)).latent_dist.sample() for b in batches]
        std = float(paddle.concat(latents).std())
        return 1.0 / max(std, 1e-8)


def psnr(reconstruction: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images (N, ...): 10 log10(255^2 / MSE), capped at 100 dB for identical images."""
    diff = reconstruction.astype(np.float64) - original.astype(np.float64)
    mse = (diff**2).reshape(len(diff), -1).mean(axis=1)
    return 10.0 * np.log10(255.0**2 / np.maximum(mse, 255.0**2 * 1e-10))


class ReconstructionValidator:
    """Reconstruction quality on images the run does not train on: the first `count` readable records
    of --eval_file_list, read once. Deterministic (the posterior's mean is decoded, nothing random is
    drawn), so it compares across steps and runs. `losses()` is what the trainer logs every --eval_steps."""

    def __init__(self, model: AutoencoderTrainingModel, file_list: str, count: int, resolution: int, batch_size: int, seed: int = 0):
        from ldm.training.validation import fixed_log_batch

        batch = fixed_log_batch(file_list, resolution, count, seed=seed)
        if batch is None:
            raise ValueError(f"--eval_file_list {file_list!r} has no readable record at --resolution {resolution}")
        self.model = model
        self.images = batch["pixel_values"]
        self.batch_size = max(1, batch_size)

    @property
    def count(self) -> int:
        return self.images.shape[0]

    @paddle.no_grad()
    def measure(self) -> Dict[str, np.ndarray]:
        """Per image: "l1", the training loss's reconstruction term, and "psnr" (dB) of the
        reconstruction as the uint8 image a user would see."""
        vae, l1, db = self.model.vae, [], []
        with evaluating(vae):
            for i in range(0, self.count, self.batch_size):
                images = to_model_range(self.images[i : i + self.batch_size])
                reconstruction = vae(images, sample_posterior=False).sample
                l1.append((reconstruction - images).abs().mean(axis=[1, 2, 3]).numpy())
                db.append(psnr(to_uint8(reconstruction), to_uint8(images)))
        return {"l1": np.concatenate(l1), "psnr": np.concatenate(db)}

    def losses(self) -> dict:
        values = self.measure()
        return {"validation/loss": float(values["l1"].mean()), "validation/psnr": float(values["psnr"].mean())}


class AutoencoderTrainer(StreamTrainer):
    """The StreamTrainer with what the adversarial term needs: the step count in the model (for
    --disc_start), the loss's parts in the logs, and an EMA of the autoencoder only."""

    def __init__(self, model: AutoencoderTrainingModel, *args, **kwargs):
        # StreamTrainer builds the EMA from the model's trainable weights: D is frozen meanwhile.
        # (The optimizer and DataParallel come later, in train(), and see D trainable.)
        with frozen(model.discriminator) if model.discriminator is not None else contextlib.nullcontext():
            super().__init__(model, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False):
        self.model.global_step = self.state.global_step
        return super().compute_loss(model, inputs, return_outputs)

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "loss" in logs:
            logs.update(self.model.loss_terms.pop_means())
        super().log(logs, **kwargs)
