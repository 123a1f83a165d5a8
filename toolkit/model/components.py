"""Component configs of an InstructPix2Pix pipeline: `tiny` (CPU tests and demo) and `sd15` (full size).

Both presets build the same classes a real timbrooks/instruct-pix2pix checkpoint holds, so every
code path (training, merge, export, runner) is the one a user with real weights runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lftk.model.vae_fit import VaeFitSpec

PRESETS = ("tiny", "small", "sd15")
IP2P_IN_CHANNELS = 8  # 4 noisy latent channels + 4 current-frame latent channels
LATENT_CHANNELS = 4
SD_SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class PresetSpec:
    unet: dict
    vae: dict
    text: dict
    scaling_factor: float
    vae_fit: VaeFitSpec | None = None  # how `init-base` fits the VAE on frames; None: the VAE comes as built
    prediction_type: str = "epsilon"  # what the UNet predicts (scheduler config; training follows it)


_TINY = PresetSpec(
    unet=dict(
        sample_size=16,
        in_channels=IP2P_IN_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    ),
    # Three blocks = two downsamplings: 64 px frames -> 16x16 latents (SD 1.5 downsamples by 8).
    # Narrow and without the mid-block attention: fitting it on CPU is 3-4x faster than (32, 64, 64)
    # with attention, and simulated scenes (flat colours, few edges) do not need more.
    vae=dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
    ),
    text=dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
    # Scaled so the tiny VAE's latents have roughly unit variance after its short fit.
    scaling_factor=1.0,
    # Measured on 60 simulated episodes, 6 held out (64 px, one seed): plain L1+MSE loses 0.74 of the
    # blocks in reconstruction even with 2x downsampling; weighting coloured pixels x21 keeps all but
    # 0.09-0.10 (30.5 dB at 1500 steps).
    vae_fit=VaeFitSpec(),
)

# The CPU demo's model: what a small CPU budget can learn to predict simulated scenes with
# (measured on 60 simulated episodes, 24 val pairs, 1200 steps unless said; one seed each):
# - the tiny VAE and text encoder; a UNet twice as wide as the tiny one (3.1 M parameters);
# - v-prediction: at 1200 steps it scored above epsilon-prediction at 2400 (val PSNR 20.9 vs 20.3,
#   PSNR in motion 15.6 vs 15.3 at guidance 3/3).
# Tried and not kept: a VAE with one downsampling (32x32 latents; 31.6 dB and 0.03 of the objects
# lost in reconstruction) under the tiny UNet: better hand error (5.0 vs 7.4 px) but 1 dB less PSNR,
# and objects were lost by the UNet all the same; the small UNet on it costs 4x the step time.
_SMALL = PresetSpec(
    unet={**_TINY.unet, "block_out_channels": (64, 128)},
    vae=_TINY.vae,
    text=_TINY.text,
    scaling_factor=_TINY.scaling_factor,
    vae_fit=_TINY.vae_fit,
    prediction_type="v_prediction",
)

# SD 1.5 (runwayml/stable-diffusion-v1-5) with the InstructPix2Pix 8-channel UNet input.
_SD15 = PresetSpec(
    unet=dict(
        sample_size=64,
        in_channels=IP2P_IN_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    vae=dict(
        sample_size=512,
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        scaling_factor=SD_SCALING_FACTOR,
    ),
    text=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ),
    scaling_factor=SD_SCALING_FACTOR,
)


def preset_spec(preset: str) -> PresetSpec:
    from lftk.errors import LftkError

    specs = {"tiny": _TINY, "small": _SMALL, "sd15": _SD15}
    if preset not in specs:
        raise LftkError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    return specs[preset]


def build_components(preset: str, seed: int = 0) -> dict:
    """Randomly initialised unet, vae, text_encoder (seeded) for a preset."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = preset_spec(preset)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    vae_kwargs = dict(spec.vae)
    vae_kwargs.setdefault("scaling_factor", spec.scaling_factor)
    vae = AutoencoderKL(**vae_kwargs)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def make_scheduler(prediction_type: str = "epsilon"):
    """The scheduler InstructPix2Pix ships with (Euler ancestral), configured like SD 1.5's."""
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)
