"""Perceptual and adversarial terms on the decoded x0 estimate (the paper's λ2 and λ3).

The UNet's noise prediction gives an estimate of the clean future latent,
x0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t); the frozen VAE decoder turns it into a frame, which is
compared with the true future frame in VGG16 feature space (perceptual) and judged by a small patch
discriminator trained alongside (adversarial, hinge loss). At large t the estimate is mostly noise,
so each sample's terms are weighted by ᾱ_t.

VGG16 is built here (no torchvision) and loads a torchvision-format state dict from a local file
(`vgg16-*.pth`, keys `features.N.weight`): nothing is downloaded. Without that file the perceptual
term is off and the log says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lftk.errors import LftkError

log = logging.getLogger(__name__)

# torchvision's VGG16 `features`: numbers are conv widths, "M" a 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22)  # indices of relu1_2, relu2_2, relu3_3, relu4_3 in `features`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(width, item, 3, padding=1), nn.ReLU(inplace=False)]
                width = item
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str | Path) -> "VGGFeatures":
        path = Path(path)
        if not path.is_file():
            raise LftkError(f"train.loss.perceptual_weights: {path} not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        model = cls()
        wanted = model.features.state_dict()
        missing = [k for k in wanted if k not in feats]
        if missing:
            raise LftkError(f"{path}: not a VGG16 state dict (missing {missing[:3]}...)")
        model.features.load_state_dict({k: feats[k] for k in wanted})
        return model.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] frames -> ImageNet statistics
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
        return out


def perceptual_distance(vgg: VGGFeatures, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean L1 distance of channel-normalised features over the four taps."""
    per_sample = 0.0
    for a, b in zip(vgg(pred), vgg(target)):
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        per_sample = per_sample + (a - b).abs().mean(dim=(1, 2, 3))
    return per_sample / len(TAPS)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: one real/fake score per ~16x16 patch."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(8, width * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 2, width * 4, 4, 2, 1), nn.GroupNorm(8, width * 4), nn.LeakyReLU(0.2),
            nn.Conv2d(width * 4, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def x0_estimate(scheduler, noisy: torch.Tensor, noise_pred: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 latent estimate, ᾱ_t per sample) from the UNet's output: noise, or velocity (v-prediction)."""
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[steps].float().view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        x0 = alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * noise_pred
    else:
        x0 = (noisy - (1 - alpha_bar).sqrt() * noise_pred) / alpha_bar.sqrt()
    return x0, alpha_bar.view(-1)


class AuxLosses:
    """Owns the VGG (frozen) and the discriminator (trained here, with its own optimizer)."""

    def __init__(self, perceptual: float, adversarial: float, vgg_path: str | None, disc_lr: float, device):
        self.w_perc, self.w_adv = perceptual, adversarial
        self.vgg = None
        if perceptual > 0:
            if vgg_path:
                self.vgg = VGGFeatures.from_file(vgg_path).to(device)
            else:
                log.warning(
                    "train.loss.perceptual=%g but no train.loss.perceptual_weights (a local VGG16 .pth): "
                    "the perceptual term is off for this run", perceptual,
                )
                self.w_perc = 0.0
        self.disc = PatchDiscriminator().to(device) if adversarial > 0 else None
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=disc_lr, betas=(0.5, 0.999)) if self.disc else None

    @property
    def active(self) -> bool:
        return self.w_perc > 0 or self.w_adv > 0

    def generator_terms(self, decoded: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> dict:
        terms = {}
        if self.w_perc > 0:
            terms["perceptual"] = (weight * perceptual_distance(self.vgg, decoded, target)).mean()
        if self.w_adv > 0:
            self.disc.requires_grad_(False)
            terms["adversarial"] = (weight * -self.disc(decoded).mean(dim=(1, 2, 3))).mean()
            self.disc.requires_grad_(True)
        return terms

    def discriminator_step(self, decoded: torch.Tensor, target: torch.Tensor) -> float | None:
        if self.disc is None:
            return None
        real, fake = self.disc(target), self.disc(decoded.detach())
        loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()  # hinge
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(self.disc)
        self.disc_opt.step()
        return loss.item()

    def state_dict(self) -> dict:
        if self.disc is None:
            return {}
        return {"disc": self.disc.state_dict(), "disc_opt": self.disc_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.disc is not None and state:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])


def _average_gradients(module: nn.Module) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
