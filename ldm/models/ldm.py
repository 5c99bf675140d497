"""The latent diffusion model: frozen autoencoder + LDMBert + conditional UNet.

Two ways in (SPEC section 4):
  * `--model_name_or_path DIR`: a ppdiffusers LDMTextToImagePipeline directory (SPEC section 3);
  * from scratch: `--vae_name_or_path DIR` (a trained autoencoder), `--text_encoder_config_file`,
    `--unet_config_file` and `--tokenizer_name DIR`; UNet and LDMBert are then initialised
    the way the PyTorch reference (CompVis latent-diffusion) initialises them.
Nothing is ever downloaded: every path must be a local directory or file.
"""
import contextlib
import inspect
import os
from typing import Collection, List, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from ppdiffusers import AutoencoderKL, DDPMScheduler, LDMTextToImagePipeline, UNet2DConditionModel, VQModel
from ppdiffusers.models.resnet import ResnetBlock2D
from ppdiffusers.models.vae import DiagonalGaussianDistribution
from ppdiffusers.models.transformer_2d import Transformer2DModel
from ppdiffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from ppdiffusers.utils.initializer_utils import normal_, reset_initialized_parameter, zeros_

from ldm.core.files import read_json
from ldm.models.recipe import Recipe, continued_recipe, ddim_scheduler, min_snr_weights, sample_noise, sample_timesteps, snr, training_target


def require_local(path: Optional[str], flag: str, what: str = "directory") -> str:
    """Stop at start-up, in one line, when a path is not local: this toolkit never downloads."""
    if not path:
        raise ValueError(f"{flag} is required: pass a local {what}")
    exists = os.path.isdir(path) if what == "directory" else os.path.isfile(path)
    if not exists:
        raise ValueError(
            f"{flag} {path!r} is not a local {what}; nothing is downloaded from a model hub, "
            f"so pass a local {what} (e.g. one written by train_vae.py, python -m ldm.tokenizer, or a previous run)"
        )
    return path



def read_config(path: str, flag: str, cls) -> dict:
    """A preset JSON for `cls` without its `_`-prefixed metadata (e.g. `_class_name`). A key `cls`
    does not take stops here in one line: a typo would otherwise be kept silently (LDMBertConfig
    stores any key) or end in a TypeError deep inside the model's constructor."""
    config = {k: v for k, v in read_json(require_local(path, flag, "file")).items() if not k.startswith("_")}
    if isinstance(cls, type) and issubclass(cls, LDMBertConfig):
        accepted = set(cls().to_dict())
    else:
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(f"{flag} {path!r}: unknown key {unknown[0]!r} ({cls.__name__} takes no such setting); remove or rename it")
    return config


def load_tokenizer(path: str, model_max_length: int):
    """A BERT WordPiece tokenizer from a local directory holding vocab.txt."""
    from paddlenlp.transformers import BertTokenizer

    require_local(path, "--tokenizer_name")
    if not os.path.isfile(os.path.join(path, "vocab.txt")):
        raise ValueError(f"--tokenizer_name {path!r} has no vocab.txt; build one with: python -m ldm.tokenizer --file_list F --output_dir {path}")
    return BertTokenizer.from_pretrained(path, model_max_length=model_max_length)


def load_autoencoder(path: str, flag: str = "--vae_name_or_path", trust_pickle: bool = False):
    """An AutoencoderKL or VQModel directory, chosen by the `_class_name` in its config.json;
    Paddle weights or a diffusers download's PyTorch ones (see `from_diffusers`). Pickled weight
    files (`.bin`, `.pdparams`, ...) only with `trust_pickle` (ldm.safeload.check_weights_dir)."""
    from ldm.core.safeload import check_weights_dir

    require_local(path, flag)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{flag} {path!r} has no config.json; pass a directory written by train_vae.py, a pipeline's vqvae/ or a diffusers vae/")
    check_weights_dir(path, trust_pickle, flag)
    cls = VQModel if read_json(config_file).get("_class_name") == "VQModel" else AutoencoderKL
    return cls.from_pretrained(path, from_diffusers=from_diffusers(path, flag))


def from_diffusers(path: str, flag: str) -> bool:
    """Whether a ppdiffusers model directory (vae/, vqvae/, unet/) holds diffusers-format PyTorch
    weights (`diffusion_pytorch_model.safetensors` or `.bin`, fp16 variants and sharded indexes
    included), e.g. the `vae/` of a Stable Diffusion download, rather than Paddle ones
    (`diffusion_paddle_model.safetensors`, `model_state.pdparams`). ppdiffusers converts the former
    while loading (`from_diffusers=True`), reading both kinds without torch: no conversion step."""
    names = os.listdir(path)

    def has(prefix):
        return any(n.startswith(prefix) and n.endswith((".safetensors", ".pdparams", ".bin", ".index.json")) for n in names)

    if has("diffusion_paddle_model") or has("model_state"):
        return False
    if has("diffusion_pytorch_model"):
        return True
    raise ValueError(f"{flag} {path!r} has no weights: expected diffusion_paddle_model.safetensors or model_state.pdparams (Paddle), "
                     f"or diffusion_pytorch_model.safetensors or .bin (diffusers)")


def load_text_encoder(path: str, trust_pickle: bool = False) -> LDMBertModel:
    """LDMBert from a pipeline's bert/: Paddle weights (`model.safetensors` marked "np",
    `model_state.pdparams`) or a diffusers download's PyTorch ones (`pytorch_model.bin`, or
    `model.safetensors` marked "pt"). The PyTorch ones are converted here (Linear weights
    transposed, by ppdiffusers' converter) because ppdiffusers 0.29's own `from_diffusers` path
    for LDMBert fails (a bug in LDMBertPretrainedModel._get_name_mappings). The pickled ones
    (`pytorch_model.bin`, `model_state.pdparams`) only with `trust_pickle`."""
    from safetensors import safe_open

    from ldm.core.safeload import check_weights_dir

    check_weights_dir(path, trust_pickle, "--model_name_or_path bert/")

    torch_file = None
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        torch_file = os.path.join(path, "pytorch_model.bin")
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        with safe_open(os.path.join(path, "model.safetensors"), framework="np") as f:
            if (f.metadata() or {}).get("format") == "pt":
                torch_file = os.path.join(path, "model.safetensors")
    if torch_file is None or os.path.isfile(os.path.join(path, "model_state.pdparams")):
        return LDMBertModel.from_pretrained(path)
    from ppdiffusers.models.modeling_pytorch_paddle_utils import convert_pytorch_state_dict_to_paddle
    from ppdiffusers.utils.load_utils import smart_load

    model = LDMBertModel(LDMBertConfig.from_pretrained(path))
    state = convert_pytorch_state_dict_to_paddle(model, smart_load(torch_file, return_numpy=True))
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"--model_name_or_path: {torch_file} lacks {len(missing)} LDMBert weights (e.g. {missing[0]})")
    check_state_shapes(model, state, torch_file)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    model.eval()
    return model


def build_text_encoder(config_file: str, vocab_size: int, max_length: int) -> LDMBertModel:
    """A fresh LDMBert whose vocabulary and positions follow the tokenizer and --model_max_length."""
    config = read_config(config_file, "--text_encoder_config_file", LDMBertConfig)
    config.update(vocab_size=vocab_size, max_position_embeddings=max_length)
    return LDMBertModel(LDMBertConfig(**config))


def build_unet(config_file: str) -> UNet2DConditionModel:
    return UNet2DConditionModel(**read_config(config_file, "--unet_config_file", UNet2DConditionModel))


@paddle.no_grad()
def init_like_reference(text_encoder: LDMBertModel, unet: UNet2DConditionModel, token_embedding_std: float = 0.02) -> None:
    """Initialise fresh weights the way the PyTorch reference does.

    Paddle's defaults differ from torch's (Xavier for Linear, not kaiming-uniform(a=sqrt(5))),
    so first reset every Conv/Linear/Embedding/Norm to torch's defaults
    (ppdiffusers' `reset_initialized_parameter`: U(-1/sqrt(fan_in), 1/sqrt(fan_in))), then:
      * LDMBert token and position embeddings ~ N(0, 0.02) (x-transformers' init in the reference;
        the token embeddings' std is `token_embedding_std`, --text_encoder_embedding_std);
      * the UNet's output conv, each ResBlock's second conv and each spatial transformer's
        output projection are zero, as `zero_module(...)` in CompVis' openaimodel.py makes them,
        so every residual branch starts as the identity.
    """
    reset_initialized_parameter(text_encoder)
    normal_(text_encoder.model.embed_tokens.weight, 0.0, token_embedding_std)
    normal_(text_encoder.model.embed_positions.weight, 0.0, 0.02)
    reset_initialized_parameter(unet)
    zeros_(unet.conv_out.weight)
    zeros_(unet.conv_out.bias)
    for _, layer in unet.named_sublayers():
        if isinstance(layer, ResnetBlock2D):
            zeros_(layer.conv2.weight)
            zeros_(layer.conv2.bias)
        if isinstance(layer, Transformer2DModel):
            zeros_(layer.proj_out.weight)
            zeros_(layer.proj_out.bias)


@contextlib.contextmanager
def evaluating(layer: nn.Layer):
    """Eval mode inside the block, the previous mode after (paddle's train() takes no flag)."""
    was_training = layer.training
    layer.eval()
    try:
        yield layer
    finally:
        if was_training:
            layer.train()


def freeze(layer: nn.Layer) -> None:
    layer.eval()
    for p in layer.parameters():
        p.stop_gradient = True


class LatentDiffusionModel(nn.Layer):
    """UNet and LDMBert trained jointly on the latents of a frozen autoencoder."""

    def __init__(self, vae, text_encoder: LDMBertModel, unet: UNet2DConditionModel, tokenizer, recipe: Optional[Recipe] = None):
        super().__init__()
        self.recipe = recipe or Recipe()
        self.recipe.check()
        self.vae = vae
        self.text_encoder = text_encoder
        self.unet = unet
        self.tokenizer = tokenizer
        freeze(self.vae)
        # LDMBert's `to_logits` head is never used to embed text; freezing it keeps it out of
        # the optimizer and keeps DataParallel from waiting on gradients that never come.
        for p in self.text_encoder.to_logits.parameters():
            p.stop_gradient = True
        self.noise_scheduler = DDPMScheduler(**self.recipe.schedule())
        self.scaling_factor = float(self.vae.config.scaling_factor)
        # Latent side = pixels / 2**(number of downsamplings in the autoencoder).
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.encode_in_float32 = False  # --vae_encode_fp32: keep the encoder out of mixed precision

    def train(self) -> "LatentDiffusionModel":
        """Train mode for LDMBert and the UNet (dropout on); the frozen autoencoder stays in eval.
        (paddle.DataParallel's train() sets every sublayer directly, so forward also re-asserts it.)"""
        super().train()
        self.vae.eval()
        return self

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_pipeline_dir(cls, path: str, model_max_length: int, recipe: Optional[Recipe] = None,
                          passed: Collection[str] = (), trust_pickle: bool = False) -> "LatentDiffusionModel":
        """The model of a pipeline directory, trained on as it was trained: its prediction type and
        noise schedule are kept (`continued_recipe`; `passed` are the recipe flags the user gave)."""
        from ldm.core.safeload import check_pipeline_dir

        require_local(path, "--model_name_or_path")
        for sub in ("vqvae", "bert", "tokenizer", "unet"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise ValueError(f"--model_name_or_path {path!r} has no {sub}/; pass a ppdiffusers LDMTextToImagePipeline directory")
        # model_index.json, code and pickled weights, checked before any component loads:
        check_pipeline_dir(path, trust_pickle, "--model_name_or_path")
        text_encoder = load_text_encoder(os.path.join(path, "bert"), trust_pickle)
        positions = text_encoder.config.max_position_embeddings
        if model_max_length > positions:
            # The seed's commands always pass 77; a model trained with fewer positions cannot take more.
            from paddlenlp.utils.log import logger

            logger.warning(f"--model_max_length {model_max_length} exceeds the {positions} positions of {path}/bert; using {positions}")
            model_max_length = positions
        tokenizer = load_tokenizer(os.path.join(path, "tokenizer"), model_max_length)
        recipe = continued_recipe(recipe or Recipe(), path, passed)
        unet_dir = os.path.join(path, "unet")
        unet = UNet2DConditionModel.from_pretrained(unet_dir, from_diffusers=from_diffusers(unet_dir, "--model_name_or_path"))
        return cls(load_autoencoder(os.path.join(path, "vqvae"), "--model_name_or_path", trust_pickle), text_encoder, unet,
                   tokenizer, recipe)

    @classmethod
    def from_scratch(cls, vae_path, text_encoder_config_file, unet_config_file, tokenizer_path, model_max_length, seed=None, recipe=None,
                     token_embedding_std=0.02, trust_pickle=False):
        # Validate every path before building anything large.
        require_local(vae_path, "--vae_name_or_path")
        require_local(text_encoder_config_file, "--text_encoder_config_file", "file")
        require_local(unet_config_file, "--unet_config_file", "file")
        tokenizer = load_tokenizer(tokenizer_path, model_max_length)
        vae = load_autoencoder(vae_path, trust_pickle=trust_pickle)
        if seed is not None:
            paddle.seed(seed)
        text_encoder = build_text_encoder(text_encoder_config_file, len(tokenizer), model_max_length)
        unet = build_unet(unet_config_file)
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"--unet_config_file has in_channels={unet.config.in_channels} but the autoencoder makes {vae.config.latent_channels}-channel latents")
        if unet.config.cross_attention_dim != text_encoder.config.d_model:
            raise ValueError(f"--unet_config_file has cross_attention_dim={unet.config.cross_attention_dim} but LDMBert's d_model is {text_encoder.config.d_model}")
        init_like_reference(text_encoder, unet, token_embedding_std)
        return cls(vae, text_encoder, unet, tokenizer, recipe)

    def trainable_parameters(self) -> List[paddle.Tensor]:
        return [p for p in self.parameters() if not p.stop_gradient]

    def enable_recompute(self) -> None:
        """Recompute activations in backward (trades ~30% time for memory)."""
        self.unet.enable_gradient_checkpointing()
        self.text_encoder.model.gradient_checkpointing = True

    def enable_memory_efficient_attention(self) -> bool:
        """The UNet's attention through ppdiffusers' memory-efficient / flash kernels (its
        `enable_xformers_memory_efficient_attention`: Paddle's memory_efficient_attention, or flash
        attention in fp16/bf16) when this Paddle build has them (CUDA builds); True if it is on.
        A CPU build has neither (ppdiffusers' probe fails and enabling would raise), so the UNet
        keeps its standard attention there."""
        from ppdiffusers.utils.import_utils import is_ppxformers_available

        if not is_ppxformers_available():
            return False
        self.unet.enable_xformers_memory_efficient_attention()
        return True

    def compile_static(self) -> None:
        """UNet and LDMBert forward through Paddle's dynamic-to-static compiler (`paddle.jit.to_static`,
        SOT mode: ppdiffusers' attention code does not convert in full-graph AST mode, which fails with
        "'generator' object has no attribute 'shape'"). The step's random draws, the frozen encoder and
        the loss stay eager. Measured in bench/train_step.py --to_static (README "Speed")."""
        paddle.jit.to_static(self.unet, full_graph=False)
        paddle.jit.to_static(self.text_encoder, full_graph=False)

    # -- training ---------------------------------------------------------------------------

    @paddle.no_grad()
    def encode_moments(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """`posterior_moments` of the frozen autoencoder (what ldm.cache_latents stores). Under
        --fp16/--bf16 the encoder runs in the ambient autocast (at 256 px it is a quarter of an
        ldm_32l step's FLOPs, docs/performance.md) unless `encode_in_float32`
        (--vae_encode_fp32); the moments are float32 either way."""
        with contextlib.nullcontext() if not self.encode_in_float32 else paddle.amp.auto_cast(enable=False):
            return posterior_moments(self.vae, pixel_values)

    @paddle.no_grad()
    def latents_from_moments(self, moments: paddle.Tensor) -> paddle.Tensor:
        """Scaled latents from `encode_moments`' output, or from cached moments (float16 from the
        stream): a posterior sample mean + exp(logvar / 2) * randn (the same draw as
        `latent_dist.sample()`, so a cached and an encoded batch give the same latents for the
        same RNG state), or a VQModel's latents as they are."""
        moments = moments.astype("float32")
        if isinstance(self.vae, VQModel):
            return moments * self.scaling_factor
        return DiagonalGaussianDistribution(moments).sample() * self.scaling_factor

    def encode_latents(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """Scaled latents (a posterior sample) of images from the stream; float32."""
        return self.latents_from_moments(self.encode_moments(pixel_values))

    def forward(self, input_ids=None, pixel_values=None, latent_moments=None, **kwargs):
        """The LDM objective: MSE between what the UNet predicts (epsilon, or v) and its true value
        at a random timestep, with the recipe's options (ldm.model.Recipe). The latents come from
        the images (`pixel_values`, encoded here) or from moments cached by ldm.cache_latents
        (`latent_moments`, no encoder run)."""
        self.vae.eval()
        latents = self.encode_latents(pixel_values) if latent_moments is None else self.latents_from_moments(latent_moments)
        recipe = self.recipe
        noise = sample_noise(latents.shape, latents.dtype, recipe.noise_offset)
        timesteps = sample_timesteps(latents.shape[0], self.noise_scheduler.config.num_train_timesteps, recipe)
        model_noise = noise
        if recipe.input_perturbation:
            # Input perturbation (Ning et al. 2023): the input is noised a little more than the
            # target says, which reduces the train/sample exposure bias.
            model_noise = noise + recipe.input_perturbation * paddle.randn(noise.shape, dtype=noise.dtype)
        noisy_latents = self.noise_scheduler.add_noise(latents, model_noise, timesteps)
        target = training_target(self.noise_scheduler, latents, noise, timesteps, recipe.prediction_type)
        encoder_hidden_states = self.text_encoder(input_ids)[0]
        pred = self.unet(noisy_latents, timesteps, encoder_hidden_states).sample
        if not recipe.snr_gamma:
            return F.mse_loss(pred.astype("float32"), target, reduction="mean")
        per_sample = ((pred.astype("float32") - target) ** 2).mean(axis=[1, 2, 3])
        weights = min_snr_weights(snr(self.noise_scheduler.alphas_cumprod, timesteps), recipe.snr_gamma, recipe.prediction_type)
        return (per_sample * weights).mean()

    # -- images for logging -----------------------------------------------------------------

    @paddle.no_grad()
    def reconstruct(self, pixel_values: paddle.Tensor) -> np.ndarray:
        """Autoencoder round trip, NHWC uint8: shows what the latents can represent."""
        latents = self.encode_latents(pixel_values) / self.scaling_factor
        return to_uint8(self.vae.decode(latents).sample)

    @paddle.no_grad()
    def sample(self, input_ids: paddle.Tensor, num_inference_steps: int, guidance_scale: float, seed: int = 0) -> np.ndarray:
        """DDIM samples for tokenized prompts, NHWC uint8, at the training resolution.

        Unlike the stock pipeline (which always makes latents of height // 8) this uses the
        autoencoder's real downsampling factor, so it is right for any autoencoder.
        """
        with evaluating(self):
            return self._sample(input_ids, num_inference_steps, guidance_scale, seed)

    def _sample(self, input_ids, num_inference_steps, guidance_scale, seed):
        scheduler = ddim_scheduler(self.recipe)
        scheduler.set_timesteps(num_inference_steps)
        cond = self.text_encoder(input_ids)[0]
        uncond_ids = self.tokenizer([""] * input_ids.shape[0], padding="max_length", truncation=True, max_length=input_ids.shape[1], return_tensors="pd")["input_ids"]
        uncond = self.text_encoder(uncond_ids)[0]
        size = self.unet.config.sample_size
        generator = paddle.Generator().manual_seed(seed)
        latents = paddle.randn([input_ids.shape[0], self.unet.config.in_channels, size, size], generator=generator)
        for t in scheduler.timesteps:
            # (epsilon or v: the scheduler's prediction_type says which, and step() converts)
            if guidance_scale == 1.0:
                pred = self.unet(latents, t, encoder_hidden_states=cond).sample
            else:
                pred_u, pred_c = self.unet(paddle.concat([latents] * 2), t, encoder_hidden_states=paddle.concat([uncond, cond])).sample.chunk(2)
                pred = pred_u + guidance_scale * (pred_c - pred_u)
            latents = scheduler.step(pred, t, latents, eta=0.0).prev_sample
        return to_uint8(self.vae.decode(latents / self.scaling_factor).sample)

    def log_images(self, batch, num_inference_steps: int):
        """What the trainer logs at --image_logging_steps."""
        return {
            "reconstruction": self.reconstruct(batch["pixel_values"]),
            "ddim-samples-1.0": self.sample(batch["input_ids"], num_inference_steps, 1.0),
            "ddim-samples-7.5": self.sample(batch["input_ids"], num_inference_steps, 7.5),
        }

    # -- export -----------------------------------------------------------------------------

    def to_pipeline(self) -> LDMTextToImagePipeline:
        return LDMTextToImagePipeline(vqvae=self.vae, bert=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet, scheduler=ddim_scheduler(self.recipe))

    def save_pipeline(self, output_dir: str) -> None:
        """Write a directory that stock `LDMTextToImagePipeline.from_pretrained` loads (SPEC section 3)."""
        self.to_pipeline().save_pretrained(output_dir)


def posterior_moments(vae, pixel_values: paddle.Tensor) -> paddle.Tensor:
    """What the autoencoder's encoder says about images from the stream, float32: the posterior's
    [mean, logvar] for an AutoencoderKL (logvar clipped as its DiagonalGaussianDistribution clips
    it), the pre-quantisation latents for a VQModel (deterministic)."""
    pixel_values = to_model_range(pixel_values)
    if isinstance(vae, VQModel):
        return vae.encode(pixel_values).latents.astype("float32")
    posterior = vae.encode(pixel_values).latent_dist
    return paddle.concat([posterior.mean, posterior.logvar], axis=1).astype("float32")


def to_model_range(pixel_values: paddle.Tensor) -> paddle.Tensor:
    """Images from the data stream (uint8 0..255, CHW) as float32 in [-1, 1]; float input passes through."""
    if pixel_values.dtype == paddle.uint8:
        return pixel_values.astype("float32") / 127.5 - 1.0
    return pixel_values.astype("float32")


def to_uint8(images: paddle.Tensor) -> np.ndarray:
    """[-1, 1] NCHW tensor -> NHWC uint8 array."""
    images = ((images.astype("float32") / 2 + 0.5).clip(0, 1) * 255).round()
    return images.transpose([0, 2, 3, 1]).numpy().astype("uint8")


def check_state_shapes(model, state: dict, source: str) -> None:
    """Stop at start-up, naming the tensor, when a saved weight does not fit the model (instead of
    paddle's warning, after which training would go on with the fresh weight)."""
    own = model.state_dict()
    for name, value in state.items():
        if name in own and tuple(value.shape) != tuple(own[name].shape):
            raise ValueError(f"{source}: weight {name} has shape {list(value.shape)} but the model's is {list(own[name].shape)}; "
                             "resume with the same model config (or start a new --output_dir)")


