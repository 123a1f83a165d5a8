"""The recipe schema: one typed source for validation, defaults and help text.

A recipe is a YAML file that validates into `Recipe`. `extends: other.yaml` (relative to the
recipe) lets a stage recipe state only what differs from its base. `key=value` overrides use
dotted paths and are split on the first `=` only. Every problem is collected and reported at
once, each naming its key path, with the nearest valid key for a typo.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lftk.errors import ConfigError
from lftk.runtime.params import SamplingParams


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # lr=.inf is no number to train with


class DataConfig(Strict):
    path: str = Field(description="Pair dir written by `lftk data pairs` (has train/ val/ test/).")
    train_split: str = Field("train", description="Split used for training.")
    val_split: str = Field("val", description="Split used for validation loss.")
    prompt_template: str = Field(
        "{instruction}",
        description="How an instruction becomes the prompt; must contain {instruction}, may contain {horizon} "
        "(the pair's frames ahead; needed when the pairs have several horizons).",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    latent_cache: Optional[str] = Field(
        None, description="Where cached VAE latents live (default: <path>/.latents); keyed by VAE hash and resolution."
    )

    @field_validator("prompt_template")
    @classmethod
    def _template_has_slot(cls, v: str) -> str:
        from lftk.data.pairset import template_fields  # lazy: the schema module stays light to import
        from lftk.errors import LftkError

        try:
            fields = template_fields(v)
        except LftkError as exc:
            raise ValueError(str(exc)) from None
        if "instruction" not in fields:
            raise ValueError("must contain '{instruction}'")
        return v


class ModelConfig(Strict):
    base: str = Field(description="Base pipeline: a local diffusers dir or a hub id (timbrooks/instruct-pix2pix).")
    revision: Optional[str] = Field(None, description="Hub revision when `base` is a hub id.")


LORA_DEFAULT_PART = "default"  # the part spelled by train.lora.targets itself
_PART_NAME = re.compile(r"[A-Za-z0-9_-]+")
_PATTERN_HELP = (
    "A pattern matches a module whose dotted name ends with it (`attn2.to_q` matches every cross-attention "
    "query); `*` is a wildcard (`encoder.mid_block.*`: every layer in it). Only Linear and Conv2d layers get "
    "adapters; each pattern must match at least one."
)


def _check_patterns(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("must name at least one module pattern")
    bad = [p for p in v if not p or p != p.strip() or p.startswith(".") or p.endswith(".")]
    if bad:
        raise ValueError(f"patterns are dotted module names without surrounding spaces or dots: {bad}")
    return v


class LoraPart(Strict):
    """One group of adapted modules with its own rank, alpha and dropout."""

    component: Literal["unet", "vae_encoder"] = Field(
        description="Which model the targets name: `unet`, or `vae_encoder` (VAE layers under `encoder.` and "
        "`quant_conv`, named as in the VAE; the decoder never trains)."
    )
    targets: list[str] = Field(description="Module-name patterns of this part. " + _PATTERN_HELP)
    rank: Optional[int] = Field(None, ge=1, description="LoRA rank of this part (default: train.lora.rank).")
    alpha: Optional[float] = Field(None, gt=0, description="Scale numerator of this part (default: train.lora.alpha).")
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="Dropout on this part's adapter input (default: train.lora.dropout).")

    @field_validator("targets")
    @classmethod
    def _targets_named(cls, v: list[str]) -> list[str]:
        return _check_patterns(v)


class LoraConfig(Strict):
    rank: int = Field(16, ge=1, description="LoRA rank: more = better fit, more memory.")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input during training.")
    targets: list[str] = Field(
        default_factory=lambda: ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
        description="UNet module-name patterns of the default part (default: cross-attention), trained at the "
        "rank/alpha/dropout above; [] when `parts` name all UNet targets. " + _PATTERN_HELP,
    )
    parts: dict[str, LoraPart] = Field(
        default_factory=dict,
        description="More adapted module groups by name (letters, digits, _ and -), each with its own component, "
        "targets and rank/alpha/dropout (default: the values above), e.g. a subset of UNet self-attention or the "
        "tail of the VAE encoder. A module belongs to one part. UNet parts form one adapter (final/lora/"
        "pytorch_lora_weights.safetensors, per-module ranks in its peft config); VAE-encoder parts another "
        "(final/lora/vae_encoder/, peft format).",
    )

    @field_validator("targets")
    @classmethod
    def _targets_named(cls, v: list[str]) -> list[str]:
        return _check_patterns(v) if v else v

    @field_validator("parts")
    @classmethod
    def _part_names(cls, v: dict) -> dict:
        bad = [name for name in v if not _PART_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"part names are letters, digits, _ and - (they appear in dotted override keys): {bad}")
        if LORA_DEFAULT_PART in v:
            raise ValueError(f"'{LORA_DEFAULT_PART}' is the part of train.lora.targets itself: choose another name")
        return v

    def resolved_parts(self) -> dict[str, LoraPart]:
        """Every part by name with rank/alpha/dropout filled in; train.lora.targets is the 'default' part."""
        out = {}
        if self.targets:
            out[LORA_DEFAULT_PART] = LoraPart(component="unet", targets=self.targets, rank=self.rank, alpha=self.alpha, dropout=self.dropout)
        for name, part in self.parts.items():
            out[name] = part.model_copy(update={
                "rank": part.rank if part.rank is not None else self.rank,
                "alpha": part.alpha if part.alpha is not None else self.alpha,
                "dropout": part.dropout if part.dropout is not None else self.dropout,
            })
        return out

    def part_key(self, name: str) -> str:
        """The recipe key of a part's targets, for messages."""
        return "train.lora.targets" if name == LORA_DEFAULT_PART else f"train.lora.parts.{name}.targets"

    @property
    def vae_encoder_parts(self) -> list[str]:
        return [name for name, part in self.parts.items() if part.component == "vae_encoder"]


class LossConfig(Strict):
    diffusion: float = Field(1.0, ge=0, description="λ1: noise-prediction MSE (the InstructPix2Pix objective).")
    perceptual: float = Field(0.0, ge=0, description="λ2: VGG16 feature distance of the decoded x0 estimate (paper: 0.1).")
    adversarial: float = Field(0.0, ge=0, description="λ3: patch-discriminator hinge loss (paper: 0.01).")
    perceptual_weights: Optional[str] = Field(
        None, description="Local torchvision VGG16 state dict (.pth); without it the perceptual term is off."
    )
    disc_lr: float = Field(1e-4, gt=0, description="Learning rate of the patch discriminator.")
    colour_weight: float = Field(
        0.0, ge=0, description="Diffusion loss weight of latent cells holding saturated colour (small objects) in the "
        "current or future frame: 1 + this, normalised to mean 1; 0 = uniform. Loads both frames' pixels each step."
    )
    snr_gamma: Optional[float] = Field(
        None, gt=0, description="Min-SNR weighting (Hang et al. 2023): each sample's diffusion loss weighs "
        "min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction); 5 is the paper's value; null = uniform."
    )


class ResolutionStage(Strict):
    until: float = Field(gt=0, lt=1, description="This stage lasts until this fraction of the total steps.")
    resolution: int = Field(ge=16, description="Training image side during the stage.")


class TrainConfig(Strict):
    batch_size: int = Field(8, ge=1, description="Per-GPU micro batch.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = Field(
        "adamw", description="adamw8bit/paged_adamw8bit (bitsandbytes) quarter the optimizer state."
    )
    min_8bit_size: int = Field(4096, ge=1, description="8-bit optimizers keep 32-bit state for tensors smaller than this.")
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="After warm-up: flat, or cosine to 0.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    resolution: int = Field(128, ge=16, description="Training image side in pixels (multiple of 8).")
    resolution_schedule: list[ResolutionStage] = Field(
        default_factory=list, description="Progressive resolution: earlier, smaller stages before `resolution`."
    )
    trainable: Literal["full", "lora"] = Field("lora", description="Train the whole UNet or LoRA adapters.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Mixed precision of the engine.")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO: 1 shards optimizer state, 2 also gradients, 3 also weights across ranks."
    )
    offload_optimizer: bool = Field(False, description="Optimizer state in CPU RAM (ZeRO >= 1): less GPU memory, slower.")
    offload_params: bool = Field(False, description="Weights in CPU RAM (ZeRO-3 only): the last resort for small cards.")
    cache_latents: bool = Field(True, description="Encode every frame with the frozen VAE once, not every step.")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward: ~8x less activation memory, ~30% slower.")
    epochs: Optional[int] = Field(None, ge=1, description="Used when max_steps is null.")
    loss: LossConfig = Field(default_factory=LossConfig)
    conditioning_dropout: float = Field(
        0.05, ge=0, lt=1, description="Probability of dropping text and image conditions (each) for CFG."
    )
    log_every: int = Field(10, ge=1)
    val_every: Optional[int] = Field(None, ge=1, description="Steps between validation losses; null = at checkpoints.")
    val_samples: int = Field(
        8, ge=0, description="Val pairs predicted at each validation for SSIM/PSNR/motion/trajectory metrics; 0 = off."
    )
    checkpoint_every: Optional[int] = Field(None, ge=1, description="Steps between checkpoints; null = end only.")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept; older ones are deleted.")
    dist_timeout_s: float = Field(
        1800.0, gt=0, description="Seconds a rank may wait for the others (in a step's all-reduce, at a checkpoint, "
        "while rank 0 scores the val pairs) before the run stops with exit 2; DeepSpeed's default is 30 minutes."
    )

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8 (SD 1.5's VAE downsamples by 8, lftk's small presets by 4)")
        return v

    @field_validator("resolution_schedule")
    @classmethod
    def _stages_ordered(cls, v: list) -> list:
        ends = [stage.until for stage in v]
        if ends != sorted(set(ends)):
            raise ValueError("stages must have increasing `until` fractions")
        if any(stage.resolution % 8 for stage in v):
            raise ValueError("every stage resolution must be a multiple of 8")
        return v

    @property
    def vae_encoder_trains(self) -> bool:
        """LoRA parts on the VAE encoder: it runs with gradients every step and joins the DeepSpeed engine."""
        return self.trainable == "lora" and bool(self.lora.vae_encoder_parts)

    def resolution_at(self, step: int, total: int) -> int:
        for stage in self.resolution_schedule:
            if step < stage.until * total:
                return stage.resolution
        return self.resolution


class SamplingConfig(Strict):
    """The sampling defaults the trained model records in final/lftk_model.json (eval, infer and serve
    use them unless told otherwise). Lists are candidates: each (text, image, keep) combination is scored
    on the val split after training and the best is recorded (lftk.train.tune)."""

    steps: int = Field(SamplingParams.steps, ge=1, description="Denoising steps per frame.")
    guidance: list[float] = Field(
        [SamplingParams.guidance], min_length=1, description="Text guidance scale, or candidates to choose from on the val split."
    )
    image_guidance: list[float] = Field(
        [SamplingParams.image_guidance], min_length=1,
        description="Image guidance scale, or candidates to choose from on the val split.",
    )
    keep: list[float] = Field(
        [SamplingParams.keep], min_length=1,
        description="Keep the current frame's own pixels where the predicted frame differs from the current frame "
        "redrawn by the VAE by less than this (mean over RGB, 0-255; 0 = off), or candidates to choose from on the "
        "val split (scored on the same samples: no extra sampling).",
    )
    keep_objects: list[bool] = Field(
        [SamplingParams.keep_objects], min_length=1,
        description="Put back each object of the current frame (saturated colour) that the predicted frame no longer "
        "shows anywhere, or candidates ([false, true]) to choose from on the val split (scored on the same samples).",
    )
    tune_samples: int = Field(24, ge=1, description="Val pairs each candidate is scored on (more = a surer choice, slower).")
    objects_margin: Optional[float] = Field(
        None, ge=0,
        description="Pass over candidates whose objects missing on the val pairs exceed copying the current frame's by "
        "more than this (a share, 0-1; null = no bound): a prediction should not erase what doing nothing keeps. "
        "If no candidate is within it, the one with the fewest objects missing is chosen, with a WARNING.",
    )

    @field_validator("keep")
    @classmethod
    def _keep_range(cls, v: list[float]) -> list[float]:
        bad = [k for k in v if not 0 <= k <= 255]
        if bad:
            raise ValueError(f"keep thresholds are 0-255 (uint8 levels), got {bad}")
        return v

    @field_validator("guidance", "image_guidance", "keep", mode="before")
    @classmethod
    def _one_is_a_list(cls, v):
        return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("keep_objects", mode="before")
    @classmethod
    def _one_flag_is_a_list(cls, v):
        return [v] if isinstance(v, bool) else v

    @field_validator("guidance", "image_guidance")
    @classmethod
    def _finite_positive(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(x) or x < 0 for x in v):
            raise ValueError("guidance scales must be finite and >= 0")
        return v


class DistillConfig(Strict):
    """Few-step distillation: a student learns, by latent consistency distillation (Luo et al. 2023,
    "Latent Consistency Models"), to jump from any noise level of the teacher's DDIM grid straight to
    the frame the teacher's guided sampler would end on. The teacher's three-branch InstructPix2Pix
    guidance (text and image, image only, neither) is baked into the student at fixed scales: the
    student runs one UNet call per step, with diffusers' LCMScheduler, at 1-4 steps. The student
    starts from `model.base` (usually the teacher's own final/), trained in full or with LoRA like
    any run."""

    teacher: str = Field(description="The teacher: a run dir (its final/ is read) or a pipeline dir.")
    steps: int = Field(2, ge=1, le=8, description="The student's sampling steps, recorded as its default.")
    guidance: Optional[list[float]] = Field(
        None, min_length=2, max_length=2,
        description="[text, image] guidance scales baked into the student; null = the teacher's recorded ones "
        "(its lftk_model.json sampling), else InstructPix2Pix's 7.5 / 1.5.",
    )
    solver_steps: int = Field(
        50, ge=2, le=1000,
        description="The teacher's DDIM grid (LCMScheduler's original_inference_steps): each training step moves "
        "one grid step with the teacher and asks the student to land where it lands from there.",
    )
    loss: Literal["huber", "l2"] = Field("huber", description="Distance between the student and its target.")
    huber_c: float = Field(0.001, gt=0, description="Pseudo-Huber constant (LCM's 0.001).")
    data_weight: float = Field(
        0.0, ge=0, le=100,
        description="Weight of a second term that pulls the student's clean-frame estimate towards the pair's real "
        "future frame (the same distance, in latent space); 0 = distillation alone. The teacher is a model, the "
        "future frame is what the camera saw: the term keeps the student on the data where the teacher is wrong.",
    )

    @field_validator("guidance")
    @classmethod
    def _scales(cls, v):
        if v is not None and any(not math.isfinite(x) or x < 0 for x in v):
            raise ValueError("guidance scales must be finite and >= 0")
        return v


class Recipe(Strict):
    seed: int = Field(0, description="Seeds data order, noise, dropout.")
    output_dir: str = Field(description="Run dir (runs/NAME); created if missing.")
    max_steps: Optional[int] = Field(ge=1, description="Optimizer steps; null = train.epochs over the data.")
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    distill: Optional[DistillConfig] = Field(None, description="Distil a teacher into a few-step student (null: plain training).")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "Recipe":
        t = self.train
        if t.offload_optimizer and t.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
        if t.offload_params and t.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage: 3")
        return self

    @model_validator(mode="after")
    def _lora_parts_fit_training(self) -> "Recipe":
        t, problems = self.train, []
        if t.trainable == "full" and t.lora.parts:
            problems.append(f"train.lora.parts ({', '.join(t.lora.parts)}) need train.trainable: lora")
        if t.trainable == "lora":
            if not any(p.component == "unet" for p in t.lora.resolved_parts().values()):
                problems.append("train.lora: no UNet part (train.lora.targets is empty and no part has component: unet)")
            if t.lora.vae_encoder_parts and t.cache_latents:
                # The cache holds latents of the encoder as it was; a trained encoder makes them stale every step.
                problems.append(
                    f"train.cache_latents: true, but train.lora.parts.{t.lora.vae_encoder_parts[0]} trains the VAE "
                    "encoder, which must then run every step: set train.cache_latents: false"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _distill_losses(self) -> "Recipe":
        if self.distill is None:
            return self
        loss, problems = self.train.loss, []
        for key in ("perceptual", "adversarial", "colour_weight"):
            if getattr(loss, key) > 0:
                problems.append(f"train.loss.{key}")
        if loss.snr_gamma is not None:
            problems.append("train.loss.snr_gamma")
        if problems:
            raise ValueError(f"distill: {', '.join(problems)} weigh the diffusion loss, which distillation does not "
                             "train: set them to 0 (null for snr_gamma)")
        return self

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "Recipe":
        if self.max_steps is None and self.train.epochs is None:
            raise ValueError("set max_steps or train.epochs")
        return self


# --------------------------------------------------------------------------------------------
# Loading


def _deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mapping by mapping. `key: null` over a mapping removes it: a child recipe
    drops an inherited LoRA part (`train.lora.parts.vae_tail: null`) or resets a section to its defaults."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None and isinstance(out.get(key), dict):
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(str(path), [f"extends: cycle through {' -> '.join(str(p) for p in seen)}"])
    if not path.is_file():
        raise ConfigError(str(path), ["recipe file not found"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not a text file (byte {exc.start} is not UTF-8)"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["top level must be a mapping of keys"])
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    return _deep_merge(_read_yaml(path.parent / parent, seen + (path,)), raw)


def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """`a.b=1` -> {"a": {"b": 1}}; values parsed as YAML scalars. Returns (tree, problems)."""
    tree: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}': expected key=value")
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            problems.append(f"override '{item}': empty key part")
            continue
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as exc:
            problems.append(f"override '{item}': the value is not valid YAML ({str(exc).splitlines()[0]})")
            continue
        node, clash = tree, None
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                clash = ".".join(parts[: i + 1])
                break
        if clash is None and isinstance(node.get(parts[-1]), dict) and not isinstance(parsed, dict):
            clash = key.strip()
        if clash is not None:
            problems.append(f"override '{item}': '{clash}' is set both as a value and as a section by these overrides")
            continue
        node[parts[-1]] = parsed
    return tree, problems


def _fields_at(path: tuple) -> list[str]:
    model: Any = Recipe
    keyed = False  # the previous field was a dict of models: this path part is a user-chosen key
    for part in path:
        if keyed:
            keyed = False
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        model = field.annotation
        if get_origin(model) in (Union, UnionType):  # Optional[Section]: the section
            model = next((a for a in get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if get_origin(model) is dict:  # e.g. train.lora.parts: {name: LoraPart}
            model, keyed = get_args(model)[1], True
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return [] if keyed else list(model.model_fields)


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if p not in ("function-after",))
    key = ".".join(str(p) for p in loc) or "(recipe)"
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), near[0]])}'?" if near else ""
        return f"{key}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg} (got {err.get('input')!r})" if loc else f"{key}: {msg}"


def validate(raw: dict, source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe (following `extends`), apply overrides, validate. Raises ConfigError."""
    raw = _read_yaml(Path(path))
    tree, problems = parse_overrides(overrides or [])
    if problems:
        raise ConfigError(str(path), problems)
    return validate(_deep_merge(raw, tree), str(path))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
