"""A randomly initialised Stable Diffusion 1.5 look-alike with tiny widths, saved in diffusers format.

Same block types, nesting and layers per block as SD-1.5 (so module paths such as
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, `mid_block.resnets[-1]` and the LoRA targets
exist), same latent layout (4 channels, VAE downsampling 8, scaling factor 0.18215), same scheduler config
and the real CLIP tokenizer. Only the widths are small: sample_size 8 latents -> 64 px images.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from preprocessing.clip_bpe_tokenizer import BOS_TOKEN, CLIP_VOCAB_SIZE, EOS_TOKEN, write_clip_tokenizer

# SD-1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json) block layout, reproduced verbatim.
SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_MID_BLOCK = "UNetMidBlock2DCrossAttn"
SD15_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# SD-1.5's scheduler/scheduler_config.json (PNDM) values.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)

TINY_CROSS_ATTENTION_DIM = 32
TINY_SAMPLE_SIZE = 8  # latent side; x8 VAE factor -> 64 px


def build_tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=TINY_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=SD15_DOWN_BLOCKS,
        mid_block_type=SD15_MID_BLOCK,
        up_block_types=SD15_UP_BLOCKS,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,  # as SD-1.5, so resnets[-1] / attentions[1] exist
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
        center_input_sample=False,
    )


def build_tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplers -> factor 8 like SD
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_SAMPLE_SIZE * 8,
        scaling_factor=0.18215,
    )


def build_tiny_text_encoder(seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TINY_CROSS_ATTENTION_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",  # SD-1.5's CLIP ViT-L/14 text tower activation
        projection_dim=TINY_CROSS_ATTENTION_DIM,
        bos_token_id=CLIP_VOCAB_SIZE - 2,  # <|startoftext|>
        eos_token_id=CLIP_VOCAB_SIZE - 1,  # <|endoftext|>: pooled output is read at this token
        pad_token_id=CLIP_VOCAB_SIZE - 1,
    )
    return CLIPTextModel(config).eval()


def load_tiny_tokenizer(tokenizer_dir: Path):
    """(dir, CLIPTokenizer): SD-1.5's real CLIP BPE tokenizer files written to tokenizer_dir and loaded."""
    from transformers import CLIPTokenizer

    tokenizer_dir = write_clip_tokenizer(Path(tokenizer_dir))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.bos_token == BOS_TOKEN and tokenizer.eos_token == EOS_TOKEN
    return tokenizer_dir, tokenizer


def save_sd15_pipeline(out_dir: Path, *, vae, text_encoder, unet, tokenizer_dir: Path) -> Path:
    """Save the components as a StableDiffusionPipeline directory with SD-1.5's PNDM scheduler and file set.

    tokenizer_dir (from load_tiny_tokenizer) is moved into the pipeline as its `tokenizer/` folder."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Replace whatever the installed transformers version re-serialises with SD-1.5's own file set.
    shutil.rmtree(out_dir / "tokenizer")
    Path(tokenizer_dir).rename(out_dir / "tokenizer")
    return out_dir


def write_tiny_sd15(out_dir: Path) -> Path:
    """Write a complete StableDiffusionPipeline directory (model_index.json + 5 components), random weights."""
    out_dir = Path(out_dir)
    tokenizer_dir, _ = load_tiny_tokenizer(out_dir / "_tokenizer_src")
    return save_sd15_pipeline(
        out_dir,
        vae=build_tiny_vae(),
        text_encoder=build_tiny_text_encoder(),
        unet=build_tiny_unet(),
        tokenizer_dir=tokenizer_dir,
    )
