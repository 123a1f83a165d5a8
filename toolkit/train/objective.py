"""The InstructPix2Pix training objective (Brooks et al. 2023, sec. 3.2), applied to future frames.

The UNet predicts the noise added to the *future* frame's latent, conditioned on the *current*
frame's latent (concatenated on channels) and the instruction embedding. Conditioning dropout
drops the text, the image, or both, so that classifier-free guidance over both works at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lftk.model.components import LATENT_CHANNELS


@dataclass
class FrozenParts:
    """Everything the loss needs besides the trainable UNet (kept out of the DeepSpeed engine), except
    that with LoRA parts on the VAE encoder the VAE joins the engine and `encoder_trains` is set: the
    encoder then runs with gradients (the same VAE object the engine steps)."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object  # diffusers DDPMScheduler
    null_ids: torch.Tensor  # (1, 77) token ids of the empty prompt
    scaling_factor: float
    vae_scale: int  # pixels per latent cell (8 for SD 1.5)
    encoder_trains: bool = False

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0].float()

    def _encode(self, pixels: torch.Tensor):
        with torch.set_grad_enabled(self.encoder_trains and torch.is_grad_enabled()):
            return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist

    def encode_future(self, pixels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        dist = self._encode(pixels)
        return (dist.mean.float() + dist.std.float() * eps.to(dist.mean.device)) * self.scaling_factor

    def encode_current(self, pixels: torch.Tensor) -> torch.Tensor:
        # IP2P conditions on the unscaled mode of the image posterior (as its pipeline does at inference).
        return self._encode(pixels).mode().float()


@dataclass
class SampleNoise:
    """Every random draw of one sample, from a generator seeded by (run seed, sample key).

    Keys are global positions in the data stream, so the draws do not depend on how a batch is
    split across ranks or accumulation steps: 2 ranks x 1 equals 1 rank x 2, and a resumed run
    redraws exactly what the killed one would have.
    """

    posterior: torch.Tensor  # (B, 4, h, w) VAE posterior sample
    noise: torch.Tensor  # (B, 4, h, w) diffusion noise
    timesteps: torch.Tensor  # (B,)
    u: torch.Tensor  # (B,) conditioning-dropout draw

    @classmethod
    def draw(cls, seed: int, keys: torch.Tensor, latent_shape: tuple, num_timesteps: int) -> "SampleNoise":
        rows = []
        for key in keys.tolist():
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, key]).generate_state(1)[0]))
            rows.append((torch.randn(latent_shape, generator=g), torch.randn(latent_shape, generator=g),
                         torch.randint(0, num_timesteps, (), generator=g), torch.rand((), generator=g)))
        post, noise, t, u = zip(*rows)
        return cls(torch.stack(post), torch.stack(noise), torch.stack(t), torch.stack(u))


@dataclass
class Forward:
    pred: torch.Tensor  # (B, 4, h, w) the UNet's output (noise or velocity, as `target`)
    noisy: torch.Tensor  # (B, 4, h, w) noised future latent
    steps: torch.Tensor  # (B,) timesteps
    target: torch.Tensor  # (B, 4, h, w) what the UNet should output: the noise, or the velocity (v-prediction)
    weights: torch.Tensor | None = None  # (B, 1, h, w) or (B, 1, 1, 1) loss weights; None = uniform

    @property
    def diffusion_loss(self) -> torch.Tensor:
        if self.weights is None:
            return F.mse_loss(self.pred.float(), self.target.float())
        return ((self.pred.float() - self.target.float()).pow(2) * self.weights).mean()


def ip2p_loss(unet, parts: FrozenParts, batch: dict, dropout: float, seed: int) -> torch.Tensor:
    """Diffusion (epsilon-prediction MSE) loss for one batch of (current, future, input_ids, key)."""
    return ip2p_forward(unet, parts, batch, dropout, seed).diffusion_loss


def colour_cell_weights(batch: dict, parts: FrozenParts, weight: float, device) -> torch.Tensor | None:
    """(B, 1, h, w): latent cells showing a saturated object in the current or the future frame weigh
    1 + `weight` (mean 1); None when `weight` is 0."""
    if weight <= 0:
        return None
    from lftk.model.colour import latent_mask, normalised_weights

    mask = torch.maximum(latent_mask(batch["current"], parts.vae_scale), latent_mask(batch["future"], parts.vae_scale))
    return normalised_weights(mask, weight).to(device)


def training_loss(unet, parts: FrozenParts, batch: dict, dropout: float, seed: int, weights, aux=None):
    """λ1·diffusion + λ2·perceptual + λ3·adversarial; returns (loss, {term: value}, decoded x0, target)."""
    fwd = ip2p_forward(unet, parts, batch, dropout, seed)
    fwd.weights = colour_cell_weights(batch, parts, weights.colour_weight, fwd.pred.device)
    if weights.snr_gamma is not None:
        snr = min_snr_weights(parts.noise_scheduler, fwd.steps, weights.snr_gamma).view(-1, 1, 1, 1)
        fwd.weights = snr if fwd.weights is None else fwd.weights * snr
    terms = {"diffusion": fwd.diffusion_loss}
    decoded = target = None
    if aux is not None and aux.active:
        from lftk.train.aux_losses import x0_estimate

        x0, alpha_bar = x0_estimate(parts.noise_scheduler, fwd.noisy, fwd.pred.float(), fwd.steps)  # either prediction type
        decoded = parts.vae.decode((x0 / parts.scaling_factor).to(parts.vae.dtype)).sample.float()  # (B, 3, H, W)
        target = batch["future"].to(decoded.device)
        terms.update(aux.generator_terms(decoded, target, alpha_bar))
    loss = sum(getattr(weights, name) * value for name, value in terms.items())
    return loss, {k: v.item() for k, v in terms.items()}, decoded, target


def ip2p_forward(unet, parts: FrozenParts, batch: dict, dropout: float, seed: int) -> Forward:
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    cached = "fut_mean" in batch  # latents precomputed by lftk.train.latent_cache
    if cached:
        bsz, latent_shape = batch["fut_mean"].shape[0], tuple(batch["fut_mean"].shape[1:])
    else:
        bsz = batch["future"].shape[0]
        latent_shape = (LATENT_CHANNELS, *(s // parts.vae_scale for s in batch["future"].shape[-2:]))
    draws = SampleNoise.draw(seed, batch["key"], latent_shape, parts.noise_scheduler.config.num_train_timesteps)

    latents, image = clean_latents(parts, batch, draws, device)
    noise = draws.noise.to(device)
    steps = draws.timesteps.to(device)
    noisy = parts.noise_scheduler.add_noise(latents, noise, steps)
    target = prediction_target(parts.noise_scheduler, latents, noise, steps)

    text = parts.encode_text(batch["input_ids"].to(device))  # (B, 77, D)
    if dropout > 0:
        # One uniform draw per sample: [0, d) drops text only, [d, 2d) both, [2d, 3d) image only.
        u = draws.u.to(device)
        drop_text = (u < 2 * dropout).view(bsz, 1, 1)
        null_text = parts.encode_text(parts.null_ids.to(device)).expand_as(text)
        text = torch.where(drop_text, null_text, text)
        keep_image = 1.0 - ((u >= dropout) & (u < 3 * dropout)).float().view(bsz, 1, 1, 1)
        image = image * keep_image

    model_in = torch.cat([noisy, image], dim=1)  # (B, 8, h, w): noisy future latent ‖ current latent
    pred = unet(model_in.to(dtype), steps, text.to(dtype)).sample
    return Forward(pred, noisy, steps, target)


def clean_latents(parts: FrozenParts, batch: dict, draws: SampleNoise, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(future latent, scaled: a posterior sample; current latent, unscaled mode), each (B, 4, h, w),
    from the latent cache's arrays when the batch has them, else through the VAE encoder."""
    if "fut_mean" in batch:  # latents precomputed by lftk.train.latent_cache
        eps = draws.posterior.to(device)
        latents = (batch["fut_mean"].to(device) + batch["fut_std"].to(device) * eps) * parts.scaling_factor
        return latents, batch["cur_mode"].to(device)
    latents = parts.encode_future(batch["future"].to(device), draws.posterior.to(device))
    return latents, parts.encode_current(batch["current"].to(device))


PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output, as the pipeline's scheduler config says (diffusers' training
    scripts do the same): the noise (epsilon), or v = sqrt(ᾱ)·noise - sqrt(1-ᾱ)·x0 (v-prediction)."""
    if check_prediction_type(scheduler) == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, steps)


def min_snr_weights(scheduler, steps: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) per-sample loss weights of Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon-prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction, SNR = ᾱ / (1 - ᾱ) at each sample's timestep."""
    alpha_bar = scheduler.alphas_cumprod.to(steps.device)[steps].float()
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    if check_prediction_type(scheduler) == "epsilon":
        return clipped / snr
    return clipped / (snr + 1.0)


def check_prediction_type(scheduler) -> str:
    """The scheduler's prediction_type, or LftkError when training cannot target it."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        from lftk.errors import LftkError

        raise LftkError(f"scheduler prediction_type {kind!r} is not trainable here: choose one of {', '.join(PREDICTION_TYPES)}")
    return kind
