"""Per-component export contract: what each of the four networks looks like from outside.

One subclass per network (text encoder, VAE encoder, UNet, VAE decoder) states its input and
output names, dtypes, symbolic shapes, dynamic axes, sample inputs and a min/opt/max batch
profile (TensorRT needs the profile; ONNX only needs the dynamic axes). The same contract wraps
the torch module that gets exported, so the torch backend, the exporter and the parity check all
call the identical function.

Conventions shared by every backend:
- Images are (B, 3, H, W) float32 in [-1, 1]; latents are (B, 4, h, w) with h = H / vae_scale.
- The VAE encoder returns the *unscaled* latent mean: InstructPix2Pix conditions the UNet on
  `vae.encode(x).latent_dist.mode()` as is (diffusers `prepare_image_latents`). The scaling factor
  is applied by the sampler only to the denoised latent, which it divides by `scaling_factor`
  before calling the VAE decoder; the decoder therefore also takes an unscaled latent.
- The UNet timestep is float32 (B,): Euler-ancestral timesteps are fractional, and integer DDIM
  timesteps convert exactly (they are < 2**24).
- Spatial sizes are fixed at export time (the manifest records the resolution); only the batch
  axis is dynamic, so that the 3 CFG branches x several frames go through one UNet call.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lftk.errors import LftkError
from lftk.model.components import IP2P_IN_CHANNELS, LATENT_CHANNELS, vae_scale_factor

CFG_BRANCHES = 3  # InstructPix2Pix guidance: (text+image, image only, none)
MAX_FRAMES = 16  # frames batched into one call at most (sweep mode, multi-frame predict)
TEXT_SEQ_LEN = 77  # CLIP context length


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes a built engine must accept: TensorRT optimises for `opt` within [min, max]."""

    min: int
    opt: int
    max: int

    def as_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" | "int64"
    shape: tuple  # ints, or "B" for the dynamic batch axis

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "B" else d for d in self.shape)

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelDims:
    """The sizes every contract derives its shapes from, read off a loaded pipeline."""

    resolution: int  # image side, pixels
    latent: int  # latent side
    text_dim: int  # CLIP hidden size = UNet cross-attention dim
    vocab_size: int

    @classmethod
    def from_pipeline(cls, pipe, resolution: int) -> "ModelDims":
        vae_scale = vae_scale_factor(pipe.vae)
        # The UNet halves the latent once per down block but the last.
        unet_scale = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if resolution % (vae_scale * unet_scale) != 0:
            raise LftkError(
                f"resolution {resolution} must be a multiple of {vae_scale * unet_scale} for this model "
                f"(VAE downsamples by {vae_scale}, UNet by {unet_scale})"
            )
        if pipe.unet.config.in_channels != IP2P_IN_CHANNELS:
            raise LftkError(
                f"UNet has {pipe.unet.config.in_channels} input channels; InstructPix2Pix needs {IP2P_IN_CHANNELS}"
            )
        return cls(
            resolution=resolution,
            latent=resolution // vae_scale,
            text_dim=pipe.text_encoder.config.hidden_size,
            vocab_size=pipe.text_encoder.config.vocab_size,
        )


class ComponentContract(abc.ABC):
    """One exported network: its interface, sample inputs and the torch module behind it."""

    name: str  # component key and ONNX file stem
    batch_profile: BatchProfile
    parity_atol: float = 1e-3  # max abs diff allowed between ORT and torch outputs

    def __init__(self, dims: ModelDims):
        self.dims = dims

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    @abc.abstractmethod
    def inputs(self) -> list[TensorSpec]:
        """Input tensors, in the order the wrapped module's forward takes them."""

    @abc.abstractmethod
    def outputs(self) -> list[TensorSpec]:
        """Output tensors (one per component here)."""

    @abc.abstractmethod
    def module(self, pipe) -> nn.Module:
        """The eval-mode torch module that is exported; its forward takes `inputs()` positionally."""

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs()]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs()]

    def input_dtypes(self) -> dict[str, np.dtype]:
        return {t.name: np.dtype(t.dtype) for t in self.inputs()}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for spec in self.inputs() + self.outputs():
            axes[spec.name] = {i: "batch" for i, d in enumerate(spec.shape) if d == "B"}
        return axes

    def sample_inputs(self, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Seeded inputs of the right shape and range, batch `opt` unless given."""
        batch = batch or self.batch_profile.opt
        gen = torch.Generator().manual_seed(seed)
        return tuple(self._sample(spec, spec.concrete(batch), gen) for spec in self.inputs())

    def _sample(self, spec: TensorSpec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    def describe(self) -> dict:
        return {
            "inputs": [t.as_dict() for t in self.inputs()],
            "outputs": [t.as_dict() for t in self.outputs()],
            "batch_profile": self.batch_profile.as_dict(),
        }


class _Eval(nn.Module):
    """Wrappers start in train mode even around an eval-mode model (stack.md): force eval."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.eval()


class _TextEncoder(_Eval):
    def forward(self, input_ids):
        return self.inner(input_ids).last_hidden_state


class _VaeEncoder(_Eval):
    def forward(self, image):
        # .mode() is the mean: what IP2P conditions on (diffusers retrieve_latents, sample_mode="argmax").
        return self.inner.encode(image).latent_dist.mode()


class _Unet(_Eval):
    def forward(self, sample, timestep, encoder_hidden_states):
        return self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(_Eval):
    def forward(self, latent):
        return self.inner.decode(latent, return_dict=False)[0]


class TextEncoderContract(ComponentContract):
    name = "text_encoder"
    # The runner encodes (instruction, "") together: batch 2.
    batch_profile = BatchProfile(1, 2, 4)

    def inputs(self):
        return [TensorSpec("input_ids", "int64", ("B", TEXT_SEQ_LEN))]

    def outputs(self):
        return [TensorSpec("last_hidden_state", "float32", ("B", TEXT_SEQ_LEN, self.dims.text_dim))]

    def module(self, pipe):
        return _TextEncoder(pipe.text_encoder)

    def _sample(self, spec, shape, gen):
        return torch.randint(0, self.dims.vocab_size, shape, generator=gen, dtype=torch.int64)


class VaeEncoderContract(ComponentContract):
    name = "vae_encoder"
    batch_profile = BatchProfile(1, 1, MAX_FRAMES)

    def inputs(self):
        r = self.dims.resolution
        return [TensorSpec("image", "float32", ("B", 3, r, r))]

    def outputs(self):
        h = self.dims.latent
        return [TensorSpec("latent", "float32", ("B", LATENT_CHANNELS, h, h))]

    def module(self, pipe):
        return _VaeEncoder(pipe.vae)

    def _sample(self, spec, shape, gen):
        return torch.rand(shape, generator=gen) * 2 - 1  # images live in [-1, 1]


class UnetContract(ComponentContract):
    name = "unet"
    # 3 CFG branches x frames; opt = one frame (autoregressive rollout).
    batch_profile = BatchProfile(CFG_BRANCHES, CFG_BRANCHES, CFG_BRANCHES * MAX_FRAMES)

    def inputs(self):
        h = self.dims.latent
        return [
            TensorSpec("sample", "float32", ("B", IP2P_IN_CHANNELS, h, h)),
            TensorSpec("timestep", "float32", ("B",)),
            TensorSpec("encoder_hidden_states", "float32", ("B", TEXT_SEQ_LEN, self.dims.text_dim)),
        ]

    def outputs(self):
        h = self.dims.latent
        return [TensorSpec("noise_pred", "float32", ("B", LATENT_CHANNELS, h, h))]

    def module(self, pipe):
        return _Unet(pipe.unet)

    def _sample(self, spec, shape, gen):
        if spec.name == "timestep":
            return torch.rand(shape, generator=gen) * 999.0  # fractional on purpose (Euler ancestral)
        return torch.randn(shape, generator=gen)


class VaeDecoderContract(ComponentContract):
    name = "vae_decoder"
    batch_profile = BatchProfile(1, 1, MAX_FRAMES)
    parity_atol = 2e-3  # the decoder's output range is larger; measured ~1e-5 on the tiny model

    def inputs(self):
        h = self.dims.latent
        return [TensorSpec("latent", "float32", ("B", LATENT_CHANNELS, h, h))]

    def outputs(self):
        r = self.dims.resolution
        return [TensorSpec("image", "float32", ("B", 3, r, r))]

    def module(self, pipe):
        return _VaeDecoder(pipe.vae)


CONTRACTS: tuple[type[ComponentContract], ...] = (
    TextEncoderContract,
    VaeEncoderContract,
    UnetContract,
    VaeDecoderContract,
)
COMPONENTS = tuple(c.name for c in CONTRACTS)


def build_contracts(pipe, resolution: int) -> dict[str, ComponentContract]:
    """The four contracts for a loaded pipeline at one resolution, in export order."""
    dims = ModelDims.from_pipeline(pipe, resolution)
    return {cls.name: cls(dims) for cls in CONTRACTS}
