"""lftk: fine-tune InstructPix2Pix to predict a robot's future camera frame (stage 1: train)."""

__version__ = "0.1.0"
