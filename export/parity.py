"""Parity between the exported graphs and the torch modules they came from.

Two checks, both with stated tolerances:
- per component: the same seeded inputs through onnxruntime and torch, max abs diff <= the
  contract's `parity_atol` (1e-3; 2e-3 for the VAE decoder), at the profile's opt and min batch;
- end to end: one frame predicted with the same seed and a few steps by the shared sampler over
  ORT and over torch, PSNR >= 40 dB. Small per-call errors compound over the denoising steps, so
  this catches what the per-component check lets through.
Beyond a tolerance, `raise_on_failure` raises LftkError naming the component and the figures.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lftk.eval.metrics import psnr_db
from lftk.errors import LftkError
from lftk.runtime.contract import ComponentContract
from lftk.runtime.ort_graph import DEFAULT_PROVIDERS, OrtGraph
from lftk.runtime.pixels import images_to_model, model_to_unit
from lftk.runtime.sampler import IP2PSampler
from lftk.runtime.params import SamplingParams

log = logging.getLogger(__name__)

FRAME_PSNR_MIN_DB = 40.0
FRAME_STEPS = 4  # enough for errors to compound through the scheduler, cheap on CPU
PARITY_PROMPT = "move the red block onto the blue block"


class ComponentNetworks:
    """The four sampler calls mapped onto per-component callables (torch modules or ORT graphs)."""

    def __init__(self, calls: dict[str, Callable[..., torch.Tensor]]):
        self.calls = calls

    def encode_text(self, input_ids):
        return self.calls["text_encoder"](input_ids)

    def encode_image(self, image):
        return self.calls["vae_encoder"](image)

    def unet(self, sample, timestep, embeddings):
        return self.calls["unet"](sample, timestep, embeddings)

    def decode(self, latent):
        return self.calls["vae_decoder"](latent)


def open_graphs(
    contracts: dict[str, ComponentContract], onnx_dir: Path, providers: Sequence[str] = DEFAULT_PROVIDERS
) -> dict[str, OrtGraph]:
    return {
        name: OrtGraph(Path(onnx_dir) / c.filename, c.input_dtypes(), c.output_names()[0], providers)
        for name, c in contracts.items()
    }


@torch.inference_mode()
def component_parity(pipe, contracts: dict[str, ComponentContract], graphs: dict[str, OrtGraph]) -> dict:
    report = {}
    for name, contract in contracts.items():
        module = contract.module(pipe)
        prof = contract.batch_profile
        batches = sorted({prof.opt, prof.min})  # min != opt checks the dynamic batch axis too
        res = contract.dims.resolution_profile()
        # Dynamic H/W: also the smallest side the profile allows, so a graph that baked in the
        # trained size fails here rather than in the field.
        spatial = any(isinstance(d, str) and d != "B" for spec in contract.inputs() for d in spec.shape)
        cases = [(b, res.opt) for b in batches] + ([(prof.opt, res.min)] if spatial and res.min != res.opt else [])
        worst = 0.0
        for batch, side in cases:
            inputs = contract.sample_inputs(batch, seed=batch, resolution=side)
            diff = (module(*inputs) - graphs[name](*inputs)).abs().max().item()
            worst = max(worst, diff)
        report[name] = {"max_abs_diff": worst, "tol": contract.parity_atol, "batches": batches}
        if len(cases) > len(batches):
            report[name]["resolutions"] = sorted({res.opt, res.min})
        log.debug("parity %-12s max abs diff %.2e (tol %.0e, cases %s)", name, worst, contract.parity_atol, cases)
    return report


def parity_image(resolution: int, seed: int = 0) -> np.ndarray:
    """(1, H, W, 3) uint8: smooth colour ramps plus a little noise, a stand-in for a camera frame."""
    ramp = np.linspace(0, 255, resolution)
    rng = np.random.default_rng(seed)
    img = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp[::-1], ramp) / 2, np.tile(ramp, (resolution, 1))], -1)
    img = img + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)[None]


@torch.inference_mode()
def sample_frame(pipe, nets, image: np.ndarray, prompt: str, steps: int, seed: int) -> np.ndarray:
    """(1, H, W, 3) uint8 frame -> (1, H, W, 3) float prediction in [0, 1], over `nets`, with the
    pipeline's scheduler, tokenizer and VAE scaling, and lftk's default guidance (all three CFG branches)."""
    sampler = IP2PSampler(nets, pipe.scheduler, pipe.vae.config.scaling_factor)
    embeds = sampler.encode_prompt(pipe.tokenizer, prompt)
    p = SamplingParams()
    latents = sampler.denoise(images_to_model(image), embeds, steps, p.guidance, p.image_guidance,
                              torch.Generator().manual_seed(seed))
    return model_to_unit(sampler.decode(latents))


@torch.inference_mode()
def frame_parity(
    pipe,
    contracts: dict[str, ComponentContract],
    graphs: dict[str, OrtGraph],
    resolution: int,
    steps: int = FRAME_STEPS,
    seed: int = 0,
) -> dict:
    """PSNR between one frame sampled over torch and over ORT, same seed and scheduler."""
    torch_nets = ComponentNetworks({n: c.module(pipe) for n, c in contracts.items()})
    image = parity_image(resolution, seed)
    frames = [sample_frame(pipe, nets, image, PARITY_PROMPT, steps, seed) for nets in (torch_nets, ComponentNetworks(graphs))]
    value = psnr_db(*frames)
    log.debug("parity frame        PSNR %.1f dB (min %.0f dB, %d steps, seed %d)", value, FRAME_PSNR_MIN_DB, steps, seed)
    return {"psnr_db": round(value, 3), "min_db": FRAME_PSNR_MIN_DB, "steps": steps, "seed": seed}


def check_parity(
    pipe,
    contracts: dict[str, ComponentContract],
    onnx_dir: Path,
    resolution: int,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
) -> dict:
    """Both checks; the report says `passed` and lists `failures` (see `raise_on_failure`)."""
    t0 = time.perf_counter()
    graphs = open_graphs(contracts, onnx_dir, providers)
    components = component_parity(pipe, contracts, graphs)
    frame = frame_parity(pipe, contracts, graphs, resolution)
    failures = [
        f"{name} max abs diff {r['max_abs_diff']:.3g} > tol {r['tol']:.0e}"
        for name, r in components.items()
        if not r["max_abs_diff"] <= r["tol"]  # written so that NaN fails
    ]
    if not frame["psnr_db"] >= FRAME_PSNR_MIN_DB:
        failures.append(f"frame PSNR {frame['psnr_db']:.1f} dB < {FRAME_PSNR_MIN_DB:.0f} dB")
    return {
        "passed": not failures,
        "failures": failures,
        "components": components,
        "frame": frame,
        "providers": graphs["unet"].providers,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def raise_on_failure(report: dict, where: Path | str = "") -> None:
    if not report["passed"]:
        detail = "; ".join(report["failures"])
        raise LftkError(f"parity failed: {detail}" + (f" (details in {where})" if where else ""))
