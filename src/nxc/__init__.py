"""nxc: export, quantize and run NExT-Chat (text + boxes + masks) on ONNX Runtime and TensorRT."""

__version__ = "0.1.0"
