"""Triton model file of one graph in the "python" variant (copied to <repo>/<graph>/1/model.py by nxc-triton; runs
only inside Triton's Python backend): ONNX Runtime on the CPU over model.onnx beside it, for a tritonserver that
has no onnxruntime backend (pytriton's). Names and dtypes come from the model's own config.pbtxt.
"""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from nxc.runtime.backends.ort import OrtBackend
from nxc.triton.repo import spec_from_config


class TritonPythonModel:
    def initialize(self, args):
        self.spec = spec_from_config(json.loads(args["model_config"]))
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.runner = OrtBackend().load(path, self.spec)

    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = {t.name: pb_utils.get_input_tensor_by_name(request, t.name) for t in self.spec.inputs}
            missing = [name for name, tensor in tensors.items() if tensor is None]
            if missing:
                responses.append(_error(f"{self.spec.name}: input {missing[0]!r} is required"))
                continue
            try:
                out = self.runner.run({name: tensor.as_numpy() for name, tensor in tensors.items()})
            except Exception as e:                               # ORT's own error types: one line back, keep serving
                responses.append(_error(f"{self.spec.name}: {' '.join(str(e).split())[:400]}"))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(n, out[n]) for n in self.spec.output_names]))
        return responses


def _error(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
