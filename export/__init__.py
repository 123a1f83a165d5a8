"""Stage 2: merge adapters, export ONNX (and TensorRT), check parity. Imports lftk, never lftk.deploy."""
