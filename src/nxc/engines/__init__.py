"""TensorRT engines for a build directory: `nxc-build` turns the build's ONNX graphs into serialized plans for the
GPU and TensorRT version at hand (`nxc.engines.trt_build`), which the tensorrt backend then loads."""
