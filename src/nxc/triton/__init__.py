"""Scale-out on Triton Inference Server: `nxc-triton BUILD REPO` writes a model repository (nxc.triton.repo).

    client ── generate_stream ──▶ nxc_chat (Python backend, decoupled) ── events: token / box / done (SSE)
                                   │ Pipeline decode loop + dispatch, llm graph in process (KV cache stays here)
                                   └─ BLS ──▶ vision, loc_heads, sam_encoder, sam_decoder (one model each;
                                              Triton shares them across requests and instances)

Modules: repo (configs and files), chat (wire format, one turn), bls (the runtime backend that splits graphs
between this process and BLS), chat_model / graph_model (the model.py files copied into the repository; they
import triton_python_backend_utils and so run only inside Triton). Nothing here imports torch.

Which Python runs the model files
  Triton's Python backend starts one stub process per model instance (`triton_python_backend_stub`, found in
  <backend-directory>/python/ or in the model's own folder); the stub embeds CPython and imports model.py, so
  `nxc` must be importable by that interpreter.

  NGC container (variant "ngc"): the container's stub uses its system Python; `pip install nxc` into it, with
  onnxruntime-gpu in place of onnxruntime (or nxc[trt] for backend tensorrt) for the in-process llm; serve_command
  in nxc.triton.repo prints the docker line. If that container's Python backend predates NumPy 2 (see below),
  install "numpy<2" too. The in-process llm runs on the first visible GPU: one container per GPU.

  pytriton's tritonserver (variant "python", the CPU test): pytriton ships one stub per Python minor version
  (pytriton/tritonserver/python_backend_stubs/<X.Y>/); the one matching the interpreter is copied to
  <backend-directory>/python/ beside libtriton_python.so, as pytriton itself does. Then, as measured here:
  - the stub links libpython<X.Y>.so through the dynamic loader, and its RPATH names only nvidia_pytriton.libs:
    without LD_LIBRARY_PATH=<sys.base_prefix>/lib:<nvidia_pytriton.libs> it takes the system's libpython (a
    different patch release than the standard library it then finds: `_thread.RLock` errors) or finds no libcudart;
  - the embedded interpreter ignores PYTHONPATH but finds its prefix as `python3` would: the first python3 on PATH,
    with a pyvenv.cfg beside it making that folder sys.prefix. PATH=<venv>/bin first thus gives the venv's
    site-packages, nxc included (pytriton puts sys.exec_prefix/bin first for the same reason);
  - the stub was built with pybind11 < 2.12 against NumPy 1.x (pytriton requires numpy<2): under NumPy 2 every
    tensor it converts comes out wrong (the first element repeated) and STRING inputs crash the stub. Its Python
    must import numpy<2 first: tests/triton puts a venv-shaped folder first on PATH (pyvenv.cfg, bin/python3,
    site-packages holding numpy<2 and a .pth that adds the project's site-packages after it).
"""
