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
- The batch axis is always dynamic, so that the 3 CFG branches x several frames go through one
  UNet call. Spatial sizes are fixed at export time (the manifest records the resolution) unless
  the export asks for dynamic H/W (`--dynamic-shape`): then image sides are the symbols "H"/"W"
  and latent sides "h"/"w", and a resolution profile (min/opt/max pixels) joins the batch profile.
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
    """Sizes a built engine must accept (batch, or pixels for a resolution profile): TensorRT
    optimises for `opt` within [min, max]."""

    min: int
    opt: int
    max: int

    def as_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


# Symbolic axes: batch; image height/width (pixels); latent height/width. ONNX names them so.
AXIS_NAMES = {"B": "batch", "H": "height", "W": "width", "h": "latent_height", "w": "latent_width"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" | "int64"
    shape: tuple  # ints, or a key of AXIS_NAMES for a dynamic axis

    def concrete(self, batch: int, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
        """The shape at `batch`, with spatial symbols ("H", "W", "h", "w") taken from `sizes`."""
        sizes = {**(sizes or {}), "B": batch}
        missing = [d for d in self.shape if isinstance(d, str) and d not in sizes]
        if missing:
            raise LftkError(f"{self.name}: no size given for dynamic axis {missing} of {list(self.shape)}")
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelDims:
    """The sizes every contract derives its shapes from, read off a loaded pipeline."""

    resolution: int  # image side, pixels
    latent: int  # latent side
    text_dim: int  # CLIP hidden size = UNet cross-attention dim
    vocab_size: int
    vae_scale: int = 8  # pixels per latent cell
    multiple: int = 64  # image sides must be multiples of this (VAE x UNet downsampling)
    dynamic_hw: bool = False  # H/W symbolic in the graphs, with a resolution profile
    branches: int = CFG_BRANCHES  # UNet batch rows per frame: 3 guidance branches, 1 for a distilled student

    @classmethod
    def from_pipeline(cls, pipe, resolution: int, dynamic_hw: bool = False, branches: int = CFG_BRANCHES) -> "ModelDims":
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
            vae_scale=vae_scale,
            multiple=vae_scale * unet_scale,
            dynamic_hw=dynamic_hw,
            branches=branches,
        )

    def image_side(self) -> int | str:
        return "H" if self.dynamic_hw else self.resolution

    def latent_side(self) -> int | str:
        return "h" if self.dynamic_hw else self.latent

    def resolution_profile(self) -> BatchProfile:
        """Pixels a dynamic-H/W engine accepts: half to twice the trained side (in steps of `multiple`)."""
        r = self.resolution
        if not self.dynamic_hw:
            return BatchProfile(r, r, r)
        low = max(self.multiple, (r // 2) // self.multiple * self.multiple)
        return BatchProfile(low, r, 2 * r)

    def sizes(self, resolution: int | None = None) -> dict[str, int]:
        """Values of the spatial symbols at one square resolution (the trained one by default)."""
        r = self.resolution if resolution is None else int(resolution)
        if r % self.multiple:
            raise LftkError(f"resolution {r} must be a multiple of {self.multiple} for this model")
        return {"H": r, "W": r, "h": r // self.vae_scale, "w": r // self.vae_scale}


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
            axes[spec.name] = {i: AXIS_NAMES[d] for i, d in enumerate(spec.shape) if isinstance(d, str)}
        return axes

    def sample_inputs(
        self, batch: int | None = None, seed: int = 0, resolution: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Seeded inputs of the right shape and range, batch `opt` and the trained resolution unless given."""
        batch = batch or self.batch_profile.opt
        sizes = self.dims.sizes(resolution)
        gen = torch.Generator().manual_seed(seed)
        return tuple(self._sample(spec, spec.concrete(batch, sizes), gen) for spec in self.inputs())

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shape of every input: what a TensorRT optimization profile is built from."""
        return profile_shapes(self.describe())

    def _sample(self, spec: TensorSpec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    def describe(self) -> dict:
        """The interface as the manifest records it (and as `profile_shapes` reads it back)."""
        return {
            "inputs": [t.as_dict() for t in self.inputs()],
            "outputs": [t.as_dict() for t in self.outputs()],
            "batch_profile": self.batch_profile.as_dict(),
            "resolution_profile": self.dims.resolution_profile().as_dict(),
            "vae_scale": self.dims.vae_scale,
        }


def profile_shapes(described: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min/opt/max input shapes from a component record (`ComponentContract.describe()`, or the
    manifest's copy of it): the batch profile for "B", the resolution profile for the spatial symbols."""
    batch = described["batch_profile"]
    res = described.get("resolution_profile") or {}
    vae_scale = int(described.get("vae_scale", 1))
    shapes = {}
    for spec in described["inputs"]:
        per_level = []
        for level in ("min", "opt", "max"):
            r = res.get(level)
            sizes = {} if r is None else {"H": r, "W": r, "h": r // vae_scale, "w": r // vae_scale}
            per_level.append(TensorSpec(spec["name"], spec["dtype"], tuple(spec["shape"])).concrete(batch[level], sizes))
        shapes[spec["name"]] = tuple(per_level)
    return shapes


class _Eval(nn.Module):
    """A wrapper module starts in train mode even around an eval-mode model: force eval."""

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
        r = self.dims.image_side()
        return [TensorSpec("image", "float32", ("B", 3, r, _w(r)))]

    def outputs(self):
        h = self.dims.latent_side()
        return [TensorSpec("latent", "float32", ("B", LATENT_CHANNELS, h, _w(h)))]

    def module(self, pipe):
        return _VaeEncoder(pipe.vae)

    def _sample(self, spec, shape, gen):
        return torch.rand(shape, generator=gen) * 2 - 1  # images live in [-1, 1]


class UnetContract(ComponentContract):
    name = "unet"

    @property
    def batch_profile(self) -> BatchProfile:
        """Branches x frames; opt = one frame (autoregressive rollout); min 1: a model sampled without
        guidance (guidance 1 / image 1, or a distilled student) runs one row per frame."""
        b = self.dims.branches
        return BatchProfile(1, b, b * MAX_FRAMES)

    def inputs(self):
        h = self.dims.latent_side()
        return [
            TensorSpec("sample", "float32", ("B", IP2P_IN_CHANNELS, h, _w(h))),
            TensorSpec("timestep", "float32", ("B",)),
            TensorSpec("encoder_hidden_states", "float32", ("B", TEXT_SEQ_LEN, self.dims.text_dim)),
        ]

    def outputs(self):
        h = self.dims.latent_side()
        return [TensorSpec("noise_pred", "float32", ("B", LATENT_CHANNELS, h, _w(h)))]

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
        h = self.dims.latent_side()
        return [TensorSpec("latent", "float32", ("B", LATENT_CHANNELS, h, _w(h)))]

    def outputs(self):
        r = self.dims.image_side()
        return [TensorSpec("image", "float32", ("B", 3, r, _w(r)))]

    def module(self, pipe):
        return _VaeDecoder(pipe.vae)


CONTRACTS: tuple[type[ComponentContract], ...] = (
    TextEncoderContract,
    VaeEncoderContract,
    UnetContract,
    VaeDecoderContract,
)
COMPONENTS = tuple(c.name for c in CONTRACTS)


def _w(side: int | str) -> int | str:
    """The width that goes with a height: the same number, or the width symbol of a height symbol."""
    return {"H": "W", "h": "w"}.get(side, side) if isinstance(side, str) else side


def unet_branches(meta: dict) -> int:
    """UNet rows per frame a model needs (its lftk_model.json): 1 for a distilled student, whose
    guidance is built in, else InstructPix2Pix's 3 guidance branches."""
    return 1 if meta.get("distilled") else CFG_BRANCHES


def build_contracts(pipe, resolution: int, dynamic_hw: bool = False, branches: int = CFG_BRANCHES) -> dict[str, ComponentContract]:
    """The four contracts for a loaded pipeline at one resolution, in export order."""
    dims = ModelDims.from_pipeline(pipe, resolution, dynamic_hw, branches)
    return {cls.name: cls(dims) for cls in CONTRACTS}
