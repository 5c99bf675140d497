"""What the training scripts look at besides the training loss: a fixed batch for the logged images.

The images logged at --image_logging_steps are always made from the same inputs (the first
records of the data, read once at start-up, never caption-dropped; or --validation_prompts)
and the same noise, so one cell of the grid can be compared across steps and across runs.
"""
import itertools
from typing import List, Optional

import numpy as np


def fixed_log_batch(file_list: str, resolution: int, count: int = 8, tokenizer=None, max_length: int = 77,
                    prompts: Optional[List[str]] = None, seed: int = 0) -> Optional[dict]:
    """The first `count` readable records of the data (rank 0's first pass, whatever the world
    size), as a batch {"pixel_values", "input_ids"?}; `prompts` replace their captions.
    None if the data has no readable record (the training stream then stops with the reason)."""
    import paddle

    from ldm.data.stream import TextImageStream

    stream = TextImageStream(file_list, resolution, seed=seed, rank=0, world_size=1)
    records = list(itertools.islice(stream.records(stream.shard_stream(0, 1)), count))
    if not records:
        return None
    batch = {"pixel_values": paddle.to_tensor(np.stack([r["pixel_values"] for r in records]))}
    if tokenizer is not None:
        from ldm.data.tokenizer import CaptionEncoder

        captions = list(prompts) if prompts else [r["caption"] for r in records]
        encode = CaptionEncoder(tokenizer, max_length)
        batch["input_ids"] = paddle.to_tensor(np.stack([encode(c) for c in captions]))
    return batch


class Validator:
    """A validation loss that is comparable across steps and across runs (improved-diffusion style).

    The first `count` records of --eval_file_list are encoded once (the posterior's mean), and each
    gets a fixed noise and a fixed timestep, spread evenly over [0, T): record i is noised at
    t_i = floor((i + 0.5) T / count). The loss is the plain MSE of what the UNet predicts (epsilon or
    v), unweighted (no min-SNR, no offset noise or input perturbation: those change the training
    signal, not what is being measured), averaged overall and per timestep quartile
    (`validation/loss_q1` is t in [0, T/4), ...). Nothing random is drawn at evaluation time, so the
    training RNG is untouched.
    """

    def __init__(self, model, file_list: str, count: int, resolution: int, batch_size: int, seed: int = 0):
        import paddle

        from ldm.models.ldm import evaluating

        batch = fixed_log_batch(file_list, resolution, count, model.tokenizer, model.tokenizer.model_max_length, seed=seed)
        if batch is None:
            raise ValueError(f"--eval_file_list {file_list!r} has no readable record at --resolution {resolution}")
        self.model = model
        self.batch_size = max(1, batch_size)
        self.input_ids = batch["input_ids"]
        n = self.input_ids.shape[0]
        with paddle.no_grad(), evaluating(model):
            latents = [self._encode(batch["pixel_values"][i : i + self.batch_size]) for i in range(0, n, self.batch_size)]
        self.latents = paddle.concat(latents)
        steps = model.noise_scheduler.config.num_train_timesteps
        self.timesteps = paddle.to_tensor(((np.arange(n) + 0.5) * steps / n).astype("int64"))
        self.quartile = (np.arange(n) + 0.5) * 4 // n  # which quarter of [0, T) each record's timestep is in
        self.noise = paddle.to_tensor(np.random.default_rng([seed, 7]).standard_normal(self.latents.shape).astype("float32"))

    def _encode(self, pixel_values):
        import paddle

        from ldm.models.ldm import to_model_range

        vae = self.model.vae
        with paddle.amp.auto_cast(enable=False):
            pixels = to_model_range(pixel_values)
            dist = getattr(vae.encode(pixels), "latent_dist", None)
            latents = dist.mean if dist is not None else vae.encode(pixels).latents
        return latents * self.model.scaling_factor

    def losses(self) -> dict:
        """{"validation/loss": ..., "validation/loss_q1" ... "_q4": ...} for the model's current weights."""
        import paddle

        from ldm.models.ldm import evaluating
        from ldm.models.recipe import training_target

        model, scheduler = self.model, self.model.noise_scheduler
        per_record = []
        with paddle.no_grad(), evaluating(model):
            for i in range(0, self.latents.shape[0], self.batch_size):
                sl = slice(i, i + self.batch_size)
                latents, noise, t = self.latents[sl], self.noise[sl], self.timesteps[sl]
                noisy = scheduler.add_noise(latents, noise, t)
                target = training_target(scheduler, latents, noise, t, model.recipe.prediction_type)
                pred = model.unet(noisy, t, model.text_encoder(self.input_ids[sl])[0]).sample
                per_record.append(((pred.astype("float32") - target) ** 2).mean(axis=[1, 2, 3]))
        values = paddle.concat(per_record).numpy().astype(np.float64)
        out = {"validation/loss": float(values.mean())}
        for q in range(4):
            picked = values[self.quartile == q]
            if picked.size:
                out[f"validation/loss_q{q + 1}"] = float(picked.mean())
        return out
