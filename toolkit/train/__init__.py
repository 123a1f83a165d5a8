"""Training: DeepSpeed engine, InstructPix2Pix objective, run dirs."""
