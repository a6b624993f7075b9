"""Triton model file of nxc_chat (copied to <repo>/nxc_chat/1/model.py by nxc-triton; runs only inside Triton's
Python backend, which provides triton_python_backend_utils).

A decoupled model: each request gets one response per event (nxc.triton.chat has the wire format) and then the
final flag. With the in-process llm on ONNX Runtime (host KV cache) the turns of all requests decode together on
nxc.runtime.batch's scheduler (`max_batch` rows, `max_queue` waiting, then UNAVAILABLE), each request answered from
its own thread; a request Triton cancels frees its row. Otherwise (TensorRT, max_batch 0) one turn at a time. The Pipeline is loaded once per instance from the build beside this file (1/build/); the graphs named
by the `in_process` parameter run here on the `backend` parameter's runtime backend, the others through BLS
(nxc.triton.bls). A request that cannot be answered (a bad image, a prompt that does not fit, a bad number) gets an
error response with the runtime's one-line message; the model keeps serving.
"""
import json
import threading
from functools import partial
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from nxc.triton.bls import load_pipeline
from nxc.runtime.backends import BackendError
from nxc.runtime.batch import Batcher, Closed, QueueFull
from nxc.triton.chat import EVENT, REQUEST_ERRORS, chat_events, event, submit_chat


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
        self.batcher = None
        max_batch = int(params.get("max_batch") or 8)
        if max_batch > 0:
            try:
                self.batcher = Batcher(self.pipe, max_batch=max_batch, max_queue=int(params.get("max_queue") or 32))
            except BackendError as e:
                pb_utils.Logger.log_info(f"nxc_chat: one turn at a time ({e})")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if self.batcher is None:
                _answer(sender, chat_events(self.pipe, partial(_input, request)))
                continue
            try:                                             # queued: errors in the request are answered now
                handle = submit_chat(self.pipe, self.batcher, partial(_input, request))
            except (QueueFull, Closed) as e:
                _fail(sender, f"nxc_chat is busy: {e}", "UNAVAILABLE")
                continue
            except Exception as e:                           # noqa: BLE001 -- answered, the model keeps serving
                _refuse(sender, e)
                continue
            threading.Thread(target=_answer, args=(sender, (event(ev) for ev in handle), handle.cancel),
                             daemon=True).start()
        return None

    def finalize(self):
        if self.batcher is not None:
            self.batcher.close(drain=True, timeout=60)


def _answer(sender, events, cancel=None) -> None:
    """Send each event, then the final flag; a request error or a failed graph ends the stream with an error
    response (the model keeps serving). A request Triton cancels stops (and `cancel()` frees its row)."""
    try:
        for ev in events:
            if sender.is_cancelled():
                if cancel is not None:
                    cancel()
                break
            out = pb_utils.Tensor(EVENT, np.array([json.dumps(ev)], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
    except Exception as e:                                   # noqa: BLE001 -- answered, the model keeps serving
        _refuse(sender, e)
        return
    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _refuse(sender, e: Exception) -> None:
    """The final error response: the runtime's one-line message for a bad request, the error of a failed graph."""
    if isinstance(e, REQUEST_ERRORS):
        _fail(sender, str(e), "INVALID_ARG")
        return
    pb_utils.Logger.log_error(f"nxc_chat: {type(e).__name__}: {e}")
    _fail(sender, f"{type(e).__name__}: {e}", "INTERNAL")


def _fail(sender, message: str, code_name: str) -> None:
    sender.send(_error(message, code_name), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
