"""lftk: fine-tune InstructPix2Pix to predict a robot's future camera frame.

    import lftk
    p = lftk.load("demo/export", backend="ort")
    future = p.predict("frame.png", "beat the block with the hammer")

`import lftk` stays light (no torch, no training stack): `load` imports the runtime when called.
"""

__version__ = "0.1.0"


def load(model, backend: str = "ort", **options):
    """A `lftk.predictor.Predictor` for MODEL (an export, run or pipeline dir); see `lftk.predictor.load`."""
    from lftk.predictor import load as _load

    return _load(model, backend, **options)


__all__ = ["__version__", "load"]
