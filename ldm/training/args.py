"""Command-line arguments of the training scripts (parsed by paddlenlp's PdArgumentParser).

Defaults reproduce the reference LAION-400M run (STYLE 3): the 32-layer preset, 256 px,
77 tokens; `config/tiny` and the README show the small settings.
"""
import os
from dataclasses import dataclass, field
from typing import List, Optional

from paddlenlp.trainer import TrainingArguments

from ldm.data.shards import PARTS_PER_WINDOW
from ldm.data.storage import use_part_cache


def require_positive(args, *names: str) -> None:
    """Stop at start-up (ValueError, one line) on a count that must be positive."""
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            why = " (the data stream is endless, so a run is counted in optimizer steps)" if name in ("max_steps", "max_train_steps") else ""
            raise ValueError(f"--{name} must be > 0, got {value}{why}")


def parse_args(*dataclass_types):
    """The command line parsed into `dataclass_types`; a bad value (see the classes' __post_init__)
    stops the run here with one line on stderr and exit code 2, before anything is built."""
    from paddlenlp.trainer import PdArgumentParser

    from ldm.training.runtime import exit_on_bad_input

    try:
        return PdArgumentParser(dataclass_types).parse_args_into_dataclasses()
    except ValueError as e:
        exit_on_bad_input(e)


def flags_passed(*dataclass_types, args: Optional[List[str]] = None) -> set:
    """The names of the fields given on the command line (abbreviated or not), as opposed to left
    at their defaults: paddlenlp's parser fills both in alike, so parse once more with every
    default suppressed. Continuing a model (ldm.model.continued_recipe) takes the settings the
    user did not give from the model's directory and stops on the ones they gave otherwise."""
    import argparse
    import sys
    from pathlib import Path

    from paddlenlp.trainer import PdArgumentParser

    parser = PdArgumentParser(dataclass_types)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    if args is None:
        args = sys.argv[1:]
        args_file = Path(sys.argv[0]).with_suffix(".args")  # read by paddlenlp's parser as well
        if sys.argv and args_file.exists():
            args = args_file.read_text().split() + args
    known, _ = parser.parse_known_args(args)
    return set(vars(known))


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Local ppdiffusers LDMTextToImagePipeline directory (model_index.json, vqvae/, bert/, tokenizer/, unet/) to continue training; when set, the from-scratch flags below are ignored."},
    )
    vae_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "From scratch: local directory of the frozen autoencoder (AutoencoderKL or VQModel), e.g. the --output_dir of train_vae.py."},
    )
    text_encoder_config_file: str = field(
        default="config/ldm_32l/ldmbert.json",
        metadata={"help": "From scratch: LDMBert config JSON; vocab_size and max_position_embeddings are overridden by the tokenizer and --model_max_length."},
    )
    unet_config_file: str = field(
        default="config/ldm_32l/unet.json", metadata={"help": "From scratch: UNet2DConditionModel config JSON."}
    )
    text_encoder_embedding_std: float = field(
        default=0.02,
        metadata={"help": "From scratch: std of LDMBert's token embeddings at init. 0.02 is the reference's; the attention's output at init is ~15x that, so every token's output is mostly the same mixture and only caption-wide attributes (colours) reach the UNet at first. 1.0 (torch's nn.Embedding default) keeps each word its own: the demo's position score needs it (README Quick start)."},
    )
    tokenizer_name: Optional[str] = field(
        default=None,
        metadata={"help": "From scratch: local directory with a BERT WordPiece vocab.txt (python -m ldm.tokenizer builds one); with --model_name_or_path its tokenizer/ is used instead."},
    )
    model_max_length: int = field(default=77, metadata={"help": "Tokens per caption: longer captions are truncated, shorter ones padded."})
    num_inference_steps: int = field(default=200, metadata={"help": "DDIM steps for the sample images logged during training."})
    caption_dropout: float = field(
        default=0.1, metadata={"help": "Share of captions replaced by the empty string, so the model also learns the unconditional score for classifier-free guidance."}
    )
    enable_xformers_memory_efficient_attention: bool = field(
        default=True,
        metadata={"help": "UNet attention through Paddle's memory-efficient / flash kernels when this Paddle build has them (CUDA builds; the start-up log says which); a CPU build keeps standard attention. --no_enable_xformers_memory_efficient_attention turns it off."},
    )
    trust_pickle: bool = field(
        default=False,
        metadata={"help": "Also read pickled files (old checkpoints' .pdparams/.pdopt/.pth, diffusers' .bin weights): a pickle can run code while it loads, so only for files you wrote yourself or trust (ldm.safeload)."},
    )
    export_format: str = field(
        default="paddle",
        metadata={"help": "Layout of the final model directory: paddle (ppdiffusers' LDMTextToImagePipeline loads it; what every command here reads), "
                          "diffusers (PyTorch diffusers' LDMTextToImagePipeline loads it; safetensors only), or both (paddle in --output_dir, "
                          "diffusers in --output_dir/diffusers/). Either gets a README.md model card; python -m ldm.export converts later."},
    )
    vae_encode_fp32: bool = field(
        default=False,
        metadata={"help": "Keep the frozen autoencoder's encode in float32 under --fp16/--bf16 (by default it runs in the mixed-precision autocast: a quarter of an ldm_32l step's FLOPs at 256 px without cached latents)."},
    )

    def __post_init__(self):
        if self.export_format not in ("paddle", "diffusers", "both"):
            raise ValueError(f"--export_format must be paddle, diffusers or both, got {self.export_format!r}")
        if not self.text_encoder_embedding_std > 0:
            raise ValueError(f"--text_encoder_embedding_std must be > 0, got {self.text_encoder_embedding_std}")


@dataclass
class RecipeArguments:
    """The training objective, the same flags in both stage-2 scripts (README "Recipe")."""

    prediction_type: str = field(default="epsilon", metadata={"help": "What the UNet predicts: epsilon (the noise; the LDM paper) or v_prediction (v = sqrt(a) eps - sqrt(1-a) x0; needed with --zero_terminal_snr)."})
    snr_gamma: float = field(default=0.0, metadata={"help": "Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's choice); 0 keeps the plain MSE."})
    zero_terminal_snr: bool = field(default=False, metadata={"help": "Rescale the betas so the last timestep is pure noise (Lin et al. 2024); sampling then starts from pure noise ('trailing' timesteps). Needs v_prediction."})
    noise_offset: float = field(default=0.0, metadata={"help": "Offset noise: add this times a per-image, per-channel Gaussian constant to the noise (0.05-0.1 typical) so images can be very dark or bright; 0 = off."})
    input_perturbation: float = field(default=0.0, metadata={"help": "Perturb only the UNet's noisy input with this much extra noise (0.1 in Ning et al. 2023) against exposure bias; 0 = off."})

    timestep_bias_strategy: str = field(default="none", metadata={"help": "Draw some training timesteps more often (as diffusers' SDXL script): later = the noisiest --timestep_bias_portion, where the layout is decided; earlier = the least noisy (fine detail); none = uniform."})
    timestep_bias_multiplier: float = field(default=1.0, metadata={"help": "How many times as often the biased timesteps are drawn (1 = no bias)."})
    timestep_bias_portion: float = field(default=0.25, metadata={"help": "Share of the timesteps the bias applies to."})

    def __post_init__(self):
        self.recipe().check()  # a bad combination stops at start-up (parse_args prints the one line)

    def keep(self, recipe) -> None:
        """Record what the run really trains with (a continued model's adopted prediction type and
        zero terminal SNR), so args.json, and a checkpoint rebuilt from it, say the same."""
        self.prediction_type, self.zero_terminal_snr = recipe.prediction_type, recipe.zero_terminal_snr

    def recipe(self):
        from ldm.models.recipe import Recipe

        return Recipe(self.prediction_type, self.snr_gamma, self.zero_terminal_snr, self.noise_offset, self.input_perturbation,
                      self.timestep_bias_strategy, self.timestep_bias_multiplier, self.timestep_bias_portion)


@dataclass
class DataArguments:
    file_list: str = field(
        default="./data/filelist/train.filelist.list",
        metadata={"help": "File listing filelists (one path, optional sampling weight, per line); each filelist lists gzipped parts."},
    )
    resolution: int = field(default=256, metadata={"help": "Training image side in pixels: shorter side resized to it, then centre-cropped; smaller images are skipped."})
    eval_file_list: Optional[str] = field(
        default=None,
        metadata={"help": "A file list of held-out data for the validation loss (validation/loss and its timestep quartiles in VisualDL), every --eval_steps steps (default: --logging_steps)."},
    )
    eval_records: int = field(default=256, metadata={"help": "How many of --eval_file_list's first records the validation loss uses (encoded once, fixed noise and timesteps)."})
    validation_prompts: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Prompts of the samples logged at --image_logging_steps (always the same prompts and noise, so a cell compares across steps); default: the captions of the first records of --eval_file_list, else of --file_list."},
    )
    shuffle_buffer: int = field(default=1000, metadata={"help": "Lines each data worker reads and permutes together before decoding."})
    parts_per_window: int = field(
        default=PARTS_PER_WINDOW,
        metadata={"help": "Parts each data worker reads side by side into every shuffle window, so one batch mixes several parts (LAION parts are in crawl order)."},
    )
    max_aspect_ratio: Optional[float] = field(
        default=None, metadata={"help": "Skip (and count) images whose longer side is over this many times the shorter; unset keeps every image, centre-cropped."}
    )
    aspect_ratio_buckets: bool = field(
        default=False,
        metadata={"help": "Batches of one aspect-ratio bucket of about --resolution^2 pixels (sides multiples of the autoencoder factor x UNet downsampling, ratios up to --max_aspect_ratio, default 2): each image is resized to cover its bucket and only the excess centre-cropped."},
    )

    allow_missing_parts: bool = field(
        default=False,
        metadata={"help": "Go on when a filelist of --file_list has no existing part (its weight then goes to the others); by default that stops the run at start-up."},
    )

    cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Local directory that keeps whole copies of remote (s3://, https://) parts, least recently used out beyond --cache_size_gb; shared by the node's processes. Unset: parts are streamed, never copied."},
    )
    cache_size_gb: float = field(default=100.0, metadata={"help": "Bound of --cache_dir in GiB (the part being read stays, even alone over it)."})

    def __post_init__(self):
        require_positive(self, "resolution", "shuffle_buffer", "parts_per_window", "cache_size_gb")
        if self.cache_dir:
            # Module state of ldm.storage, set before any data worker forks, so every worker and
            # every part opened later reads through the same cache.
            use_part_cache(self.cache_dir, self.cache_size_gb)
        if self.max_aspect_ratio is not None and not self.max_aspect_ratio >= 1:
            raise ValueError(f"--max_aspect_ratio must be >= 1 (the longer side over the shorter), got {self.max_aspect_ratio}")


@dataclass
class LDMTrainingArguments(TrainingArguments):
    image_logging_steps: int = field(
        default=1000, metadata={"help": "Every this many optimizer steps, log reconstructions and DDIM samples (guidance 1.0 and 7.5) to VisualDL; 0 turns it off."}
    )
    num_threads: int = field(default=0, metadata={"help": "CPU threads for Paddle's kernels; 0 uses the cores this process may run on, less one per data worker in the stage-2 scripts (at least 1)."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an exponential moving average of the trained weights; the exported pipeline uses it."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimizer step."})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "Stop after this many optimizer steps in a row skipped for a non-finite loss."})

    def __post_init__(self):
        # paddlenlp's max_steps defaults to -1 (count epochs): our stream has none, so it is required.
        require_positive(self, "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps", "max_steps")
        super().__post_init__()


def resolve_tokenizer(model_args: ModelArguments) -> str:
    # As in the seed, a pipeline directory brings its own tokenizer, which wins.
    if model_args.model_name_or_path:
        return os.path.join(model_args.model_name_or_path, "tokenizer")
    if model_args.tokenizer_name:
        return model_args.tokenizer_name
    raise ValueError("--tokenizer_name is required from scratch: pass a local directory with vocab.txt (python -m ldm.tokenizer builds one)")


@dataclass
class LoopArguments:
    """Flags of train_txt2img_laion400m_no_trainer.py (the seed's no-trainer names)."""

    output_dir: str = field(default="./laion400m_pretrain_output_no_trainer", metadata={"help": "Checkpoints, VisualDL logs (runs/) and the final pipeline directory."})
    pretrained_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Local pipeline directory to continue from (as --model_name_or_path of the Trainer script)."})
    train_batch_size: int = field(default=16, metadata={"help": "Images per device per forward pass."})
    gradient_accumulation_steps: int = field(default=2, metadata={"help": "Forward passes per optimizer step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW's peak learning rate."})
    adam_weight_decay: float = field(default=0.02, metadata={"help": "AdamW's decoupled weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW's first-moment decay."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW's second-moment decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW's denominator epsilon."})
    max_grad_norm: float = field(default=-1.0, metadata={"help": "Clip the global gradient norm to this; -1 disables clipping."})
    max_train_steps: int = field(default=1000000000, metadata={"help": "Optimizer steps to train for (the data stream is endless)."})
    lr_scheduler: str = field(default="constant", metadata={"help": "Learning-rate schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of linear warmup from 0 to --learning_rate."})
    logging_steps: int = field(default=50, metadata={"help": "Log loss, learning rate, images/s and data skips every this many optimizer steps."})
    save_steps: int = field(default=5000, metadata={"help": "Write a checkpoint every this many optimizer steps."})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep only the newest this many checkpoints; unset keeps all."})
    seed: int = field(default=23, metadata={"help": "Seeds model init, noise, timesteps and the data stream's order."})
    num_workers: int = field(default=6, metadata={"help": "Data worker processes per device; 0 reads in the training process."})
    image_logging_steps: int = field(default=1000, metadata={"help": "Log reconstructions and DDIM samples every this many optimizer steps; 0 turns it off."})
    fp16: bool = field(default=False, metadata={"help": "Mixed precision (float16 autocast with dynamic loss scaling; the frozen encoder too unless --vae_encode_fp32). GPU only."})
    bf16: bool = field(default=False, metadata={"help": "Mixed precision in bfloat16 autocast (no loss scaling needed; the frozen encoder too unless --vae_encode_fp32). GPUs with bf16 (A100 and newer)."})
    recompute: bool = field(default=False, metadata={"help": "Recompute activations in backward to save memory."})
    to_static: bool = field(default=False, metadata={"help": "Compile the UNet and LDMBert forward with Paddle's dynamic-to-static (SOT); measured slower than eager on the CPU (README \"Speed\")."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an exponential moving average of the trained weights; the exported pipeline uses it."})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimizer step."})
    num_threads: int = field(default=0, metadata={"help": "CPU threads for Paddle's kernels; 0 uses the cores this process may run on, less one per data worker in the stage-2 scripts (at least 1)."})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "Stop after this many optimizer steps in a row skipped for a non-finite loss."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "Checkpoint directory to resume from; by default the newest complete one in --output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start afresh even if --output_dir holds checkpoints."})

    def __post_init__(self):
        require_positive(self, "train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps", "max_train_steps")
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Validation loss every this many optimizer steps, with --eval_file_list; default --logging_steps."})
    ignore_data_skip: bool = field(default=False, metadata={"help": "On resume, restart the data stream from the start of a pass (model, optimizer and step are still restored)."})
