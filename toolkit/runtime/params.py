"""The sampling parameters of a prediction: one frozen dataclass whose defaults exist here only.

A trained model may record its own defaults in lftk_model.json under "sampling" (chosen on its val
split at the end of training: see `lftk.train.tune`); `SamplingParams.for_model` reads them, so
eval, infer, serve and the Python API sample a model the same way unless told otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

META_KEY = "sampling"  # lftk_model.json key holding a model's own defaults


@dataclass(frozen=True)
class SamplingParams:
    steps: int = 20  # denoising steps per frame
    guidance: float = 7.5  # text guidance scale (InstructPix2Pix's default)
    image_guidance: float = 1.5  # image guidance scale (InstructPix2Pix's default)
    keep: float = 0.0  # keep the current frame's pixels where the prediction changes less (lftk.runtime.keep); 0 = off
    keep_objects: bool = False  # put back objects of the current frame the prediction dropped (lftk.runtime.objects)
    scheduler: str = "euler_a"  # lftk.runtime.sampler.SCHEDULERS key; a distilled student records "lcm"

    @classmethod
    def for_model(cls, meta: dict | None, **given) -> "SamplingParams":
        """The model's recorded defaults (meta["sampling"]), else the class defaults; then every
        keyword in `given` that is not None (what the user asked for) on top."""
        recorded = (meta or {}).get(META_KEY) or {}
        names = {f.name for f in fields(cls)}
        return replace(cls(), **{k: v for k, v in recorded.items() if k in names}).overridden(**given)

    def overridden(self, **given) -> "SamplingParams":
        """These parameters with every keyword of `given` that is not None put in their place."""
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)
