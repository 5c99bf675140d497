"""Command-line arguments of the training scripts (parsed by paddlenlp's PdArgumentParser).

Defaults reproduce the reference LAION-400M run (STYLE 3): the 32-layer preset, 256 px,
77 tokens; `config/tiny` and the README show the small settings.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

from paddlenlp.trainer import TrainingArguments


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
    tokenizer_name: Optional[str] = field(
        default=None,
        metadata={"help": "From scratch: local directory with a BERT WordPiece vocab.txt (python -m ldm.tokenizer builds one); with --model_name_or_path its tokenizer/ is used instead."},
    )
    model_max_length: int = field(default=77, metadata={"help": "Tokens per caption: longer captions are truncated, shorter ones padded."})
    num_inference_steps: int = field(default=200, metadata={"help": "DDIM steps for the sample images logged during training."})
    caption_dropout: float = field(
        default=0.1, metadata={"help": "Share of captions replaced by the empty string, so the model also learns the unconditional score for classifier-free guidance."}
    )


@dataclass
class DataArguments:
    file_list: str = field(
        default="./data/filelist/train.filelist.list",
        metadata={"help": "File listing filelists (one path, optional sampling weight, per line); each filelist lists gzipped parts."},
    )
    resolution: int = field(default=256, metadata={"help": "Training image side in pixels: shorter side resized to it, then centre-cropped; smaller images are skipped."})
    shuffle_buffer: int = field(default=1000, metadata={"help": "Records held in each data worker's shuffle buffer."})


@dataclass
class LDMTrainingArguments(TrainingArguments):
    image_logging_steps: int = field(
        default=1000, metadata={"help": "Every this many optimizer steps, log reconstructions and DDIM samples (guidance 1.0 and 7.5) to VisualDL; 0 turns it off."}
    )
    num_threads: int = field(default=0, metadata={"help": "CPU threads for Paddle's kernels; 0 uses every core this process may run on."})


def resolve_tokenizer(model_args: ModelArguments) -> str:
    # As in the seed, a pipeline directory brings its own tokenizer, which wins.
    if model_args.model_name_or_path:
        return os.path.join(model_args.model_name_or_path, "tokenizer")
    if model_args.tokenizer_name:
        return model_args.tokenizer_name
    raise ValueError("--tokenizer_name is required from scratch: pass a local directory with vocab.txt (python -m ldm.tokenizer builds one)")
