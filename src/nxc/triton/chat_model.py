"""Triton model file of nxc_chat (copied to <repo>/nxc_chat/1/model.py by nxc-triton; runs only inside Triton's
Python backend, which provides triton_python_backend_utils).

A decoupled model: each request gets one response per event (nxc.triton.chat has the wire format) and then the
final flag. The Pipeline is loaded once per instance from the build beside this file (1/build/); the graphs named
by the `in_process` parameter run here on the `backend` parameter's runtime backend, the others through BLS
(nxc.triton.bls). A request that cannot be answered (a bad image, a prompt that does not fit, a bad number) gets an
error response with the runtime's one-line message; the model keeps serving.
"""
import json
from functools import partial
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from nxc.triton.bls import load_pipeline
from nxc.triton.chat import EVENT, REQUEST_ERRORS, chat_events


def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def _error(message: str, code_name: str):
    code = getattr(pb_utils.TritonError, code_name, None)       # error codes: Triton 23.09 and newer
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


class TritonPythonModel:
    def initialize(self, args):
        params = _parameters(json.loads(args["model_config"]))
        build = Path(args["model_repository"]) / args["model_version"] / "build"
        in_process = {g.strip() for g in params.get("in_process", "llm").split(",") if g.strip()}
        engines = params.get("engines") or None
        self.pipe = load_pipeline(build, pb_utils=pb_utils, in_process=in_process,
                                  backend=params.get("backend") or "onnxruntime",
                                  providers=[p for p in params.get("providers", "").split(",") if p] or None,
                                  engine_dir=build / "engines" / engines if engines else None)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                for ev in chat_events(self.pipe, partial(_input, request)):
                    if sender.is_cancelled():
                        break
                    out = pb_utils.Tensor(EVENT, np.array([json.dumps(ev)], dtype=np.object_))
                    sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            except REQUEST_ERRORS as e:
                sender.send(_error(str(e), "INVALID_ARG"), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            except Exception as e:                               # a failed graph: say so, keep serving
                pb_utils.Logger.log_error(f"nxc_chat: {type(e).__name__}: {e}")
                sender.send(_error(f"{type(e).__name__}: {e}", "INTERNAL"),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
