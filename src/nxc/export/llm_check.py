"""The llm graph's parity check at any size: the written graph, run in pieces, against transformers' own LLaMA
layers built one at a time from the checkpoint (issue 17).

    checkpoint ─ reference reader (its own path from names to shards) ─▶ HF LlamaDecoderLayer i ─▶ hidden, K, V
    graphs/llm.onnx (as written) ─ cut at h.{i} ─▶ pieces of about `chunk_bytes` of weights, one ORT session at a
                                                    time ─▶ logits, hidden, present.{i}.key/value

Two runs, batch 1: a prefill of `tokens` embedding rows (P = 0) and a decode step of the last row over the
reference's own K/V of the others (P = tokens - 1). Compared per output: relative L2 error ||ort - ref|| / ||ref||.
Every layer's present K and V is compared, so a layer read from the wrong tensor shows in that layer's output:
swapped q/k, a transposed matrix, layers out of order, a tensor from the wrong shard (tests/export plant each one).

For int8 / int4 the reference's matmul weights are the checkpoint's, quantized and dequantized by the same block
scheme (symmetric, blocks of 32 along K), so what remains is the graph's own arithmetic (MatMulNBits at
accuracy_level 4 also rounds activations to int8 per block) and any mapping mistake shows above it.
Memory: one reference layer in float32 plus one piece of the graph, whatever the model's size.
"""
from __future__ import annotations

import gc
import os
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from nxc.config import LlamaSizes
from nxc.export.llm_writer import BLOCK_SIZE, LM_HEAD

# relative L2 error allowed per output, by precision (measured margins in tests/export/test_llm_stream.py)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 3e-2, "int4": 3e-2}
_MATMUL = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


class ReferenceWeights:
    """The reference's view of a checkpoint: its own name -> shard lookup (the index file, else each file's keys),
    files opened memory-mapped, tensors handed out one at a time; optionally fake-quantized like the build."""

    def __init__(self, tensors, *, precision: str = "fp32"):
        self._t = tensors                  # name -> callable returning a torch tensor
        self.precision = precision
        bits = {"int8": 8, "int4": 4}.get(precision)
        self._bits = bits
        self._quantized = {k for k in tensors if k == LM_HEAD or _MATMUL.fullmatch(k)} if bits else set()

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, *, precision: str = "fp32") -> "ReferenceWeights":
        import json

        import torch
        ckpt = Path(ckpt)
        files: dict[str, Path] = {}
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (ckpt / index).is_file():
                files = {k: ckpt / v for k, v in json.loads((ckpt / index).read_text())["weight_map"].items()}
                break
        if not files:
            from nxc.model.checkpoint import weight_files
            for f in weight_files(ckpt):
                h = _open(f)
                for k in (h.keys() if f.suffix == ".safetensors" else h):
                    files[k] = f
        opened: dict[Path, object] = {}

        def getter(key):
            def get():
                f = files[key]
                if f not in opened:
                    opened[f] = _open(f)
                return opened[f][key] if f.suffix != ".safetensors" else opened[f].get_tensor(key)
            return get
        del torch
        return cls({k: getter(k) for k in files}, precision=precision)

    @classmethod
    def from_module(cls, llm, *, precision: str = "fp32") -> "ReferenceWeights":
        sd = llm.state_dict()
        return cls({k: (lambda v=v: v) for k, v in sd.items()}, precision=precision)

    def keys(self):
        return list(self._t)

    def __contains__(self, key):
        return key in self._t

    def get(self, key: str):
        import torch
        w = self._t[key]().to(torch.float32)
        if self.precision == "fp16":
            return w.half().float()
        if key in self._quantized:
            return torch.from_numpy(fake_quantize(w.numpy(), self._bits))
        return w


def _open(f: Path):
    if f.suffix == ".safetensors":
        from safetensors import safe_open
        return safe_open(str(f), framework="pt")
    import torch
    return torch.load(f, map_location="cpu", weights_only=True, mmap=True)


def fake_quantize(w_nk: np.ndarray, bits: int) -> np.ndarray:
    """W [N,K] -> the float weights a MatMulNBits of W^T computes with (symmetric, blocks of 32 along K), by ONNX
    Runtime's own block quantizer: q in [-2^(b-1), 2^(b-1)-1], w = q * scale."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
    n, k = w_nk.shape
    kb = (k + BLOCK_SIZE - 1) // BLOCK_SIZE
    w = np.ascontiguousarray(np.pad(w_nk.T.astype(np.float32), ((0, kb * BLOCK_SIZE - k), (0, 0))))
    blob = BLOCK_SIZE * bits // 8
    packed = np.zeros((n, kb, blob), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, (kb + 8 // bits - 1) // (8 // bits)), np.uint8)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, w, scales, zp, BLOCK_SIZE, n, k, True)
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, kb, BLOCK_SIZE).astype(np.float32) - 8
    else:
        q = packed.reshape(n, kb, BLOCK_SIZE).astype(np.float32) - 128
    return (q * scales[:, :, None]).reshape(n, kb * BLOCK_SIZE)[:, :k].astype(np.float32)


# -- cutting the written graph into pieces ---------------------------------------------------------------------
def _cut(model: onnx.ModelProto, inputs: dict[str, onnx.ValueInfoProto], outputs: list[str]) -> onnx.ModelProto:
    """The sub-graph computing `outputs` from the tensors `inputs` (cut points, with their types), the original
    graph inputs it reads, and the initializers its nodes use (external data references kept as they are)."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    graph_inputs = {i.name: i for i in g.input}
    inits = {t.name: t for t in g.initializer}
    need, seen, nodes, used_inputs, used_inits = list(outputs), set(), [], {}, {}
    while need:
        name = need.pop()
        if name in seen or name == "":
            continue
        seen.add(name)
        if name in inputs:
            used_inputs[name] = inputs[name]
        elif name in inits:
            used_inits[name] = inits[name]
        elif name in graph_inputs:
            used_inputs[name] = graph_inputs[name]
        else:
            n = producer[name]
            if id(n) not in {id(x) for x in nodes}:
                nodes.append(n)
                need.extend(n.input)
    order = {id(n): i for i, n in enumerate(g.node)}
    nodes.sort(key=lambda n: order[id(n)])
    outs = [helper.make_empty_tensor_value_info(o) for o in outputs]
    sub = helper.make_graph(nodes, "llm_piece", list(used_inputs.values()), outs,
                            initializer=list(used_inits.values()))
    m = helper.make_model(sub, opset_imports=model.opset_import)
    m.ir_version = model.ir_version
    return m


def _pieces(num_layers: int, layer_bytes: float, chunk_bytes: float) -> list[tuple[int, int]]:
    per = max(1, int(chunk_bytes // max(layer_bytes, 1)))
    return [(a, min(a + per, num_layers)) for a in range(0, num_layers, per)]


def run_in_pieces(path: Path, sizes: LlamaSizes, feeds: dict[str, np.ndarray], *, chunk_bytes: float,
                  threads: int = 0, log=None) -> dict[str, np.ndarray]:
    """Run the written llm graph at `path` on `feeds`, layer pieces of about `chunk_bytes` of weights one session at a
    time (the whole graph is one piece when it fits). Returns every graph output by name."""
    import onnxruntime as ort
    model = onnx.load(str(path), load_external_data=False)
    dt = next(n for n in model.graph.node if n.output[0] == "h.0")
    act = TensorProto.FLOAT16 if dt.op_type == "Cast" else TensorProto.FLOAT
    weight_bytes = sum(_nbytes(t) for t in model.graph.initializer)
    pieces = _pieces(sizes.num_layers, weight_bytes / (sizes.num_layers + 1), chunk_bytes)
    cut_types = {"rope.cos": act, "rope.sin": act, "attn.mask": TensorProto.FLOAT, "shape.past": TensorProto.INT64,
                 "len.past_vec": TensorProto.INT64}
    shared = list(cut_types)
    values: dict[str, np.ndarray] = {}
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    for j, (a, b) in enumerate(pieces):
        first, last = j == 0, j == len(pieces) - 1
        ins = {} if first else {n: helper.make_tensor_value_info(n, t, None) for n, t in cut_types.items()}
        if not first:
            ins[f"h.{a}"] = helper.make_tensor_value_info(f"h.{a}", act, None)
        outs = [f"present.{i}.{kv}" for i in range(a, b) for kv in ("key", "value")]
        outs += ["logits", "hidden"] if last else [f"h.{b}"]
        if first and not last:
            outs += shared
        piece = _cut(model, ins, outs)
        piece_path = path.parent / f".{path.stem}.piece{j}.onnx"
        onnx.save_model(piece, str(piece_path))
        try:
            sess = ort.InferenceSession(str(piece_path), so, providers=["CPUExecutionProvider"])
            names_in = [i.name for i in sess.get_inputs()]
            got = sess.run(outs, {n: (feeds[n] if n in feeds else values[n]) for n in names_in})
        finally:
            os.unlink(piece_path)
        del sess
        gc.collect()
        values.update(zip(outs, got))
        if log is not None and len(pieces) > 1:
            log(f"piece {j + 1}/{len(pieces)} (layers {a}-{b - 1}) ran")
    return values


def _nbytes(t: TensorProto) -> int:
    for e in t.external_data:
        if e.key == "length":
            return int(e.value)
    return len(t.raw_data)


# -- the check -------------------------------------------------------------------------------------------------
def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def check_llm(path: str | Path, reference: ReferenceWeights, sizes: LlamaSizes, *, precision: str,
              kv_dtype=np.float32, tokens: int = 6, seed: int = 0, chunk_bytes: float = 1.5e9,
              accuracy_reference: ReferenceWeights | None = None, log=None) -> dict:
    """Compare the written graph at `path` with the layer-streamed torch reference (module docstring).
    accuracy_reference (float32 weights, for a reduced precision): the same graph outputs are also measured against
    it, as the build's accuracy report entry (`report["accuracy"]`: cosine and max abs error of logits and hidden)."""
    import torch

    from nxc.model.streamed import lm_head_logits, llama_hidden
    path = Path(path)
    rng = np.random.default_rng(seed)
    table = reference._t["model.embed_tokens.weight"]()
    ids = rng.integers(3, sizes.vocab_size, tokens)
    embeds = table[torch.from_numpy(ids)].to(torch.float32)[None]                       # [1,T,H], real rows
    del table
    ref = llama_hidden(reference, sizes, embeds, keep_cache=True,
                       log=(lambda i, n: log(f"reference layer {i}/{n}")) if log else None)
    ref_logits = lm_head_logits(reference, ref.hidden[:, -1]).numpy()
    ref_hidden = ref.hidden[:, -1].numpy()
    tol = TOLERANCE[precision]
    L, kv, d = sizes.num_layers, sizes.num_kv_heads, sizes.head_dim
    report = {"ok": True, "tolerance_rel_l2": tol, "tokens": tokens,
              "reference": "transformers LlamaDecoderLayer per layer from the checkpoint, float32"
                           + {"fp16": ", weights rounded to fp16", "int8": ", matmul weights int8 block-quantized",
                              "int4": ", matmul weights int4 block-quantized"}.get(precision, ""),
              "checks": []}

    def record(run: str, outputs: dict[str, float]):
        worst = max(outputs, key=outputs.get)
        ok = outputs[worst] <= tol
        report["checks"].append({"run": run, "ok": ok, "worst": worst, "worst_rel_l2": outputs[worst],
                                 "rel_l2": outputs})
        report["ok"] &= ok

    # prefill: P = 0, all T rows
    t = tokens
    feeds = {"inputs_embeds": embeds.numpy(), "attention_mask": np.ones((1, t), np.int64),
             "position_ids": np.arange(t, dtype=np.int64)[None]}
    for i in range(L):
        feeds[f"past_key_values.{i}.key"] = np.zeros((1, 0, kv, d), kv_dtype)
        feeds[f"past_key_values.{i}.value"] = np.zeros((1, 0, kv, d), kv_dtype)
    got = run_in_pieces(path, sizes, feeds, chunk_bytes=chunk_bytes, log=log)
    errs = {"logits": _rel(ref_logits, got["logits"]), "hidden": _rel(ref_hidden, got["hidden"])}
    for i in range(L):
        errs[f"present.{i}.key"] = _rel(ref.keys[i].numpy(), got[f"present.{i}.key"])
        errs[f"present.{i}.value"] = _rel(ref.values[i].numpy(), got[f"present.{i}.value"])
    record("prefill", errs)
    got_prefill = {k: got[k] for k in ("logits", "hidden")}
    del got
    # decode: the last row over the reference's K/V of the others
    feeds = {"inputs_embeds": embeds[:, -1:].numpy(), "attention_mask": np.ones((1, t), np.int64),
             "position_ids": np.array([[t - 1]], np.int64)}
    for i in range(L):
        feeds[f"past_key_values.{i}.key"] = ref.keys[i][:, :-1].numpy().astype(kv_dtype)
        feeds[f"past_key_values.{i}.value"] = ref.values[i][:, :-1].numpy().astype(kv_dtype)
    got = run_in_pieces(path, sizes, feeds, chunk_bytes=chunk_bytes, log=log)
    errs = {"logits": _rel(ref_logits, got["logits"]), "hidden": _rel(ref_hidden, got["hidden"])}
    for i in range(L):
        errs[f"present.{i}.key"] = _rel(ref.keys[i][:, -1:].numpy(), got[f"present.{i}.key"])
    record("decode", errs)
    if accuracy_reference is not None:
        prefill_out = (got_prefill["logits"], got_prefill["hidden"])
        acc = llama_hidden(accuracy_reference, sizes, embeds)
        acc_logits = lm_head_logits(accuracy_reference, acc.hidden[:, -1]).numpy()
        acc_hidden = acc.hidden[:, -1].numpy()
        report["accuracy"] = {
            name: _cos_max([(ref_out, prefill_out[j]), (ref_out, got[name])])
            for j, (name, ref_out) in enumerate((("logits", acc_logits), ("hidden", acc_hidden)))}
    return report


def _cos_max(pairs) -> dict:
    """Cosine similarity and max abs error over (reference, test) pairs, as reports/accuracy.json has them."""
    dot = aa = bb = mx = 0.0
    for a, b in pairs:
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        dot, aa, bb = dot + float(a @ b), aa + float(a @ a), bb + float(b @ b)
        mx = max(mx, float(np.abs(a - b).max()))
    return {"cosine": dot / max(np.sqrt(aa * bb), 1e-30), "max_abs": mx}
