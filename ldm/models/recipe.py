"""The training recipe's math: the noise schedule, timestep and noise sampling, the prediction
target, SNR and min-SNR weights, and what a pipeline directory says it was trained with.
"""
import dataclasses
from dataclasses import dataclass
import os
from typing import Collection, Optional

import numpy as np
import paddle
from ppdiffusers import DDIMScheduler

from ldm.core.files import read_json


# The noise schedule of the LDM paper's text-to-image models (and of the seed).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class Recipe:
    """The training objective (the defaults are the LDM paper's and the seed's). See README "Recipe"."""

    prediction_type: str = "epsilon"  # or "v_prediction" (Salimans & Ho 2022)
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off
    zero_terminal_snr: bool = False  # rescaled betas: SNR(T) = 0 (Lin et al. 2024)
    noise_offset: float = 0.0  # per-(image, channel) constant added to the noise (offset noise)
    input_perturbation: float = 0.0  # extra noise on the model's input only (Ning et al. 2023)
    # Timestep bias (diffusers' train_text_to_image_sdxl flags): draw the `portion` of the
    # timesteps at one end `multiplier` times as often. "later" (noisier) timesteps are where
    # the layout is decided: from pure noise only the caption says where the object goes.
    timestep_bias_strategy: str = "none"  # "none", "later" (high t) or "earlier" (low t)
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    # The noise schedule of the pipeline directory a run continues (its scheduler config's betas,
    # steps and timestep spacing): it wins over SCHEDULE, so the model keeps training, and is
    # exported, as it was trained (`continued_recipe`). None from scratch.
    trained_schedule: Optional[dict] = None

    def check(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"--prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            # At t = T the input is pure noise, so predicting that noise teaches nothing (Lin et al. 2024, 3.2).
            raise ValueError("--zero_terminal_snr needs --prediction_type v_prediction: at zero SNR the noise is the input itself")
        for flag in ("snr_gamma", "noise_offset", "input_perturbation"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0, got {getattr(self, flag)}")
        if self.timestep_bias_strategy not in ("none", "later", "earlier"):
            raise ValueError(f"--timestep_bias_strategy must be none, later or earlier, got {self.timestep_bias_strategy!r}")
        if self.timestep_bias_multiplier <= 0 or not 0 < self.timestep_bias_portion <= 1:
            raise ValueError("--timestep_bias_multiplier must be > 0 and --timestep_bias_portion in (0, 1]")

    def timestep_weights(self, num_train_timesteps: int) -> np.ndarray:
        """Relative frequency of each training timestep (all equal unless biased)."""
        weights = np.ones(num_train_timesteps, dtype="float64")
        biased = max(1, int(round(self.timestep_bias_portion * num_train_timesteps)))
        if self.timestep_bias_strategy == "later":
            weights[-biased:] *= self.timestep_bias_multiplier
        elif self.timestep_bias_strategy == "earlier":
            weights[:biased] *= self.timestep_bias_multiplier
        return weights / weights.sum()

    def schedule(self) -> dict:
        """The scheduler config both training and sampling need, so the exported scheduler/ samples right."""
        # Every setting explicit (rescale and spacing too), so a sampler made from this config by
        # `from_config` takes them all, as it does from the exported file (ldm.loading.as_saved).
        config = dict(SCHEDULE, prediction_type=self.prediction_type, rescale_betas_zero_snr=False, timestep_spacing="leading")
        if self.zero_terminal_snr:
            # Lin et al. 2024, section 3.3: with SNR(T) = 0 sampling must start from the last
            # timestep, which "trailing" spacing does and the default "leading" does not.
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        config.update(self.trained_schedule or {})
        return config


# What a pipeline directory's scheduler config says about how its model was trained and is
# sampled, beyond prediction type and zero terminal SNR (which have flags, see continued_recipe).
TRAINED_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "timestep_spacing")


def continued_recipe(recipe: Recipe, path: str, passed: Collection[str] = ()) -> Recipe:
    """The recipe that continues the model of pipeline directory `path` as it was trained.

    The rule (README "Continuing a model"): the directory's scheduler/scheduler_config.json says
    what the model was trained with; a setting the command line did not give is taken from it
    (one start-up log line lists what was taken), and a flag the user did give (`passed`, see
    ldm.args.flags_passed) that says otherwise stops the run at start-up naming the setting and
    the flag value that agrees. Training a v-prediction, zero-terminal-SNR model with epsilon or
    with the plain betas for weeks (or exporting it with another spacing) would otherwise go
    unnoticed until its samples look wrong. To change a setting on purpose, edit that file.
    """
    config_file = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(config_file):
        return recipe  # a directory without a scheduler: nothing to keep, the flags decide
    config = read_json(config_file)
    trained = {"prediction_type": config.get("prediction_type", "epsilon"),
               "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False))}
    if "prediction_type" in passed and recipe.prediction_type != trained["prediction_type"]:
        raise ValueError(f"{path} was trained with prediction_type {trained['prediction_type']} ({config_file}), but --prediction_type "
                         f"{recipe.prediction_type} was given: pass --prediction_type {trained['prediction_type']}, or leave the flag out, to continue it as trained")
    if "zero_terminal_snr" in passed and recipe.zero_terminal_snr != trained["zero_terminal_snr"]:
        given = "--zero_terminal_snr" if recipe.zero_terminal_snr else "--zero_terminal_snr false"
        raise ValueError(f"{path} was trained {'with' if trained['zero_terminal_snr'] else 'without'} zero terminal SNR (rescale_betas_zero_snr "
                         f"{str(trained['zero_terminal_snr']).lower()} in {config_file}), but {given} was given: leave the flag out to continue it as trained")
    schedule = {k: config[k] for k in TRAINED_SCHEDULE_KEYS if config.get(k) is not None}
    adopted = dataclasses.replace(recipe, trained_schedule=schedule, **trained)
    try:
        adopted.check()
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    from paddlenlp.utils.log import logger

    before, after = recipe.schedule(), adopted.schedule()
    taken = [f"{k}={after[k]!r}" for k in sorted(after) if before.get(k) != after.get(k)]
    logger.info(f"Continuing {path} as it was trained ({config_file}): " +
                (f"adopted {', '.join(taken)} over the defaults" if taken else "the flags already agree with it"))
    return adopted


def sample_timesteps(n: int, num_train_timesteps: int, recipe: Recipe) -> paddle.Tensor:
    """n training timesteps, uniform or with the recipe's timestep bias (paddle's RNG either way,
    so a resumed run draws what it would have)."""
    if recipe.timestep_bias_strategy == "none" or recipe.timestep_bias_multiplier == 1.0:
        return paddle.randint(0, num_train_timesteps, (n,)).astype("int64")
    return paddle.multinomial(_bias_weights(recipe, num_train_timesteps), n, replacement=True).astype("int64")


_BIAS_WEIGHTS = {}


def _bias_weights(recipe: Recipe, num_train_timesteps: int) -> paddle.Tensor:
    """The biased timesteps' weights as a tensor, built once per recipe (not every step)."""
    key = (recipe.timestep_bias_strategy, recipe.timestep_bias_multiplier, recipe.timestep_bias_portion, num_train_timesteps)
    if key not in _BIAS_WEIGHTS:
        _BIAS_WEIGHTS[key] = paddle.to_tensor(recipe.timestep_weights(num_train_timesteps).astype("float32"))
    return _BIAS_WEIGHTS[key]


def sample_noise(shape, dtype, offset: float = 0.0) -> paddle.Tensor:
    """Gaussian noise; with offset noise (Guttenberg 2023) plus `offset` times a constant per
    image and channel, which lets the model shift an image's mean brightness (plain Gaussian
    noise almost never asks it to, so it learns mid-grey images)."""
    noise = paddle.randn(shape, dtype=dtype)
    if offset:
        noise = noise + offset * paddle.randn([shape[0], shape[1], 1, 1], dtype=dtype)
    return noise


def training_target(scheduler, latents, noise, timesteps, prediction_type: str) -> paddle.Tensor:
    """What the UNet learns to output: the noise, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def ddim_scheduler(recipe: Optional[Recipe] = None) -> DDIMScheduler:
    """The sampler of the logged images and of the exported pipeline (the seed's settings)."""
    # steps_offset=1 as CompVis' and the reference's DDIM: the last step lands on t=1, not t=0.
    return DDIMScheduler(**(recipe or Recipe()).schedule(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def snr(alphas_cumprod: paddle.Tensor, timesteps: paddle.Tensor) -> paddle.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at each timestep."""
    a = alphas_cumprod.astype("float32").gather(timesteps)
    return a / (1.0 - a)


def min_snr_weights(snr_t: paddle.Tensor, gamma: float, prediction_type: str) -> paddle.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023, eq. 9 and Table 1): the
    x0-loss weight min(SNR, gamma) expressed in the loss of what the network predicts:
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.
    At SNR = 0 (only with --zero_terminal_snr) the v weight would be 0 and the step that
    zero terminal SNR adds would never be trained; it gets weight 1 there (as in diffusers)."""
    clipped = paddle.minimum(snr_t, paddle.full_like(snr_t, gamma))
    if prediction_type == "epsilon":
        return clipped / snr_t
    weights = clipped / (snr_t + 1.0)
    return paddle.where(snr_t == 0, paddle.ones_like(weights), weights)

