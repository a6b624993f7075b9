"""The llm graph's parity check at any size: the written graph, run in pieces, against transformers' own LLaMA
layers built one at a time from the checkpoint (issue 17).

    checkpoint ─ reference reader (its own path from names to shards) ─▶ HF LlamaDecoderLayer i ─▶ hidden, K, V
                                                                         and what its attention and MLP each add
    graphs/llm.onnx (as written) ─ cut at h.{i} ─▶ one piece per layer, one ONNX Runtime session at a time
                                   ─▶ each layer fed the reference's hidden ─▶ present.{i}.key/value, h.{i+1}
                                      and the residual between its two branches (int8 / int4: MatMulNBits at
                                      accuracy_level 0, the float arithmetic over the build's own blocks)
                                   ─▶ and end to end, as written (each layer fed the previous one's output)
                                      ─▶ logits, hidden

Two runs, batch 1: a prefill of `tokens` embedding rows (P = 0) and a decode step of the last row over the
reference's own K/V of the others (P = tokens - 1). Compared per output: relative L2 error ||ort - ref|| / ||ref||.
Every layer is fed the reference's hidden and its present K, V and output compared, so a layer read from the wrong
tensor shows in that layer alone, unblurred by the rounding the layers before it add: swapped q/k or gate/up, a
transposed matrix, layers out of order, a tensor from the wrong shard (tests/export plant each one). Its output is
mostly the hidden it was fed (the residual stream), so what each branch adds is compared too: the attention's
output (residual - h.{i}) and the MLP's (h.{i+1} - residual), relative to the reference branch's own size (plus
the rounding of the stream in the graph's activation dtype, which no branch can add below).

For int8 / int4 the reference's matmul weights are the checkpoint's, quantized and dequantized by the same block
scheme (symmetric, blocks of 32 along K), and the per-layer pieces run their MatMulNBits at accuracy_level 0 (the
blocks dequantized, float32 activations; the build's accuracy_level 4 also rounds activations to int8 per block,
about 1e-2 on a branch's output): so what remains is float arithmetic, the per-layer tolerance is float32's and any
mapping mistake shows far above it. The end-to-end run keeps the graph as written (accuracy_level 4), with its own
tolerance, and gives the build's accuracy report.
Memory: one reference layer in float32 plus one layer of the graph, whatever the model's size.
"""
from __future__ import annotations

import gc
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from nxc.config import LlamaSizes
from nxc.export.llm_writer import BLOCK_SIZE, LM_HEAD

# relative L2 error allowed per output of a layer fed the reference's hidden (int8 / int4: float arithmetic over the
# build's blocks, so float32's), and end to end (as written: quantization errors add up over the layers), by
# precision. Measured on correct builds and planted mapping mistakes: tests/export/test_llm_stream.py.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 1e-4, "int4": 1e-4}
E2E_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.2, "int4": 0.2}
_UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0 ** -24, np.dtype(np.float16): 2.0 ** -11}
_MATMUL = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


class ReferenceWeights:
    """The reference's view of a checkpoint: its own name -> shard lookup (the index file, else each file's keys),
    files opened memory-mapped, tensors handed out one at a time; optionally fake-quantized like the build."""

    def __init__(self, tensors, *, precision: str = "fp32"):
        self._t = tensors                  # name -> callable returning a torch tensor
        self.precision = precision
        bits = {"int8": 8, "int4": 4}.get(precision)
        self._bits = bits
        self.block_size = BLOCK_SIZE       # the build's MatMulNBits blocks (nxc-export --block-size sets it)
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
                for k in h.keys():
                    files[k] = f
        opened: dict[Path, object] = {}

        def getter(key):
            def get():
                f = files[key]
                if f not in opened:
                    opened[f] = _open(f)
                return opened[f].read(key)
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
            return torch.from_numpy(fake_quantize(w.numpy(), self._bits, block=self.block_size))
        return w


def _open(f: Path):
    from nxc.model.lazy import open_weight_file
    return open_weight_file(f)


def fake_quantize(w_nk: np.ndarray, bits: int, *, rows: int = 4096, block: int = BLOCK_SIZE) -> np.ndarray:
    """W [N,K] -> the float weights a MatMulNBits of W^T computes with (symmetric, blocks of `block` along K), by ONNX
    Runtime's own block quantizer: w = (q - 2^(b-1)) * scale with q in [0, 2^b). `rows` at a time."""
    from nxc.export.llm_writer import quantize_blocks
    n, k = w_nk.shape
    kb = (k + block - 1) // block
    out = np.empty((n, k), np.float32)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        packed, scales = quantize_blocks(np.ascontiguousarray(w_nk[a:b].T, dtype=np.float32), bits,
                                         block=block)
        if bits == 4:
            q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(b - a, kb, block).astype(np.float32) - 8
        else:
            q = packed.reshape(b - a, kb, block).astype(np.float32) - 128
        out[a:b] = (q * scales[:, :, None]).reshape(b - a, kb * block)[:, :k]
    return out


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


def residual_name(i: int) -> str:
    """The check's name for layer i's residual stream between its attention and its MLP (h.{i} + attention)."""
    return f"h.{i}.mid"


def _layer_pieces(model: onnx.ModelProto, num_layers: int):
    """One piece per layer, in order: (piece index, its cut inputs, its outputs, {graph name: check name}). The first
    piece also computes the shared tensors (RoPE tables, mask, lengths) from the graph inputs; the last ends with
    logits and hidden. Each piece also outputs h.{j+1} and the residual between the layer's two branches (the
    first input of the Add that makes h.{j+1}: h.{j+1} = residual + MLP)."""
    producer = {n.output[0]: n for n in model.graph.node}
    dt = producer["h.0"]
    act = TensorProto.FLOAT16 if dt.op_type == "Cast" else TensorProto.FLOAT
    cut = {"rope.cos": act, "rope.sin": act, "attn.mask": TensorProto.FLOAT, "len.past_vec": TensorProto.INT64}
    for j in range(num_layers):
        ins = {}
        if j:
            ins = {n: helper.make_tensor_value_info(n, t, None) for n, t in cut.items()}
            ins[f"h.{j}"] = helper.make_tensor_value_info(f"h.{j}", act, None)
        mid = producer[f"h.{j + 1}"].input[0]
        outs = [f"present.{j}.key", f"present.{j}.value", f"h.{j + 1}", mid]
        outs += ["logits", "hidden"] if j == num_layers - 1 else []
        if j == 0 and num_layers > 1:
            outs += list(cut)
        yield j, ins, outs, {mid: residual_name(j)}


def _float_arithmetic(piece: onnx.ModelProto) -> onnx.ModelProto | None:
    """The piece, changed in place, with its MatMulNBits at accuracy_level 0 (the build's blocks dequantized, float32
    activations), or None when it has none that quantize their activations (fp32, fp16)."""
    changed = False
    for n in piece.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level" and a.i != 0:
                a.i, changed = 0, True
    return piece if changed else None


def _session(piece: onnx.ModelProto, path: Path, so):
    """An ONNX Runtime session of `piece`, saved beside `path` (its external data references are relative to it)
    for as long as the session takes to load."""
    import onnxruntime as ort
    onnx.save_model(piece, str(path))
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    finally:
        os.unlink(path)


def run_layers(path: Path, num_layers: int, runs: dict[str, dict], *, forced: dict[str, list] | None = None,
               threads: int = 0, log=None) -> tuple[dict, dict]:
    """Run the written llm graph at `path` one layer at a time (one ONNX Runtime session per layer, so memory holds
    one layer whatever the model's size) on each run's feeds (`runs`: name -> graph inputs).
    Returns (chained, teacher): chained[run] has every graph output of the graph run end to end, as written, each
    layer fed the previous layer's output; teacher[run] (for the runs in `forced`: name -> the hidden entering each
    layer, from a reference) has each layer's outputs when fed the reference's hidden instead, so an error in one
    layer is seen in that layer alone, not mixed with what the layers before it added (MatMulNBits there at
    accuracy_level 0: float arithmetic over the build's blocks). Both also hold h.{j+1} and residual_name(j)."""
    import onnxruntime as ort
    model = onnx.load(str(path), load_external_data=False)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    chained = {r: dict(f) for r, f in runs.items()}
    teacher = {r: {} for r in (forced or {})}
    for j, ins, outs, alias in _layer_pieces(model, num_layers):
        names_out = [alias.get(o, o) for o in outs]
        piece = _cut(model, ins, outs)
        piece_path = path.parent / f".{path.stem}.piece{j}.onnx"
        sess = _session(piece, piece_path, so)
        names_in = [i.name for i in sess.get_inputs()]
        feeds = {r: {n: chained[r][n] for n in names_in} for r in runs}
        for r in runs:
            chained[r].update(zip(names_out, sess.run(outs, feeds[r])))
        if forced:
            exact = _float_arithmetic(piece)
            if exact is not None:
                del sess
                gc.collect()
                sess = _session(exact, piece_path, so)
            for r in forced:
                if j:
                    feeds[r][f"h.{j}"] = forced[r][j].astype(chained[r][f"h.{j}"].dtype)
                teacher[r].update(zip(names_out, sess.run(outs, feeds[r])))
        del sess, piece
        gc.collect()
        if log is not None:
            log(f"layer {j + 1}/{num_layers} of the graph ran")
    return chained, teacher


# -- the check -------------------------------------------------------------------------------------------------
def _rel(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def _branch_rel(before: np.ndarray, after: np.ndarray, ref_before: np.ndarray, ref_added: np.ndarray) -> float:
    """What one branch of a layer adds to the residual stream (graph: after - before, as held in its activation
    dtype) vs the reference branch's output ref_added: the relative L2 error past what the stream's own rounding
    can make, (||got - ref|| - u (||stream before|| + ||stream after||))+ / ||ref||, u the unit roundoff of the
    graph's activations (fp16: 2^-11, so a branch much smaller than the stream is still compared; float32: none
    to speak of)."""
    f = np.float64
    got = after.astype(f) - before.astype(f)
    ref = ref_added.astype(f)
    stream = np.linalg.norm(ref_before.astype(f)) + np.linalg.norm(ref_before.astype(f) + ref)
    err = np.linalg.norm(got - ref) - _UNIT_ROUNDOFF[after.dtype] * stream
    return float(max(err, 0.0) / max(np.linalg.norm(ref), 1e-30))


@contextmanager
def _branch_outputs():
    """The outputs of every LlamaAttention and LlamaMLP run inside the block (each layer's two branches, in order,
    [B,T,H]), collected by a global forward hook, so the reference layer stays transformers' own, unchanged."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP
    seen: dict[str, list] = {"attention": [], "mlp": []}

    def hook(module, _args, output):
        if isinstance(module, LlamaAttention):
            seen["attention"].append((output[0] if isinstance(output, tuple) else output).detach())
        elif isinstance(module, LlamaMLP):
            seen["mlp"].append(output.detach())
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def check_llm(path: str | Path, reference: ReferenceWeights, sizes: LlamaSizes, *, precision: str,
              kv_dtype=np.float32, tokens: int = 6, seed: int = 0,
              accuracy_reference: ReferenceWeights | None = None, log=None) -> dict:
    """Compare the written graph at `path` with the layer-streamed torch reference (module docstring).

    Per run (prefill, decode), two comparisons: each layer fed the reference's hidden ("per layer": its present K
    and V, its output hidden and what its attention and its MLP each add, then logits and hidden of the last
    layer), within TOLERANCE; and the graph run end to end as written ("end to end": logits and hidden), within
    E2E_TOLERANCE (quantization errors add up over the layers). `worst` names the per-layer output furthest from
    its reference, or the end-to-end one when only that is over. accuracy_reference (float32 weights, for a reduced
    precision): the end-to-end outputs are also measured against it, as the build's accuracy report entry
    (`report["accuracy"]`: cosine and max abs error of logits and hidden)."""
    import torch

    from nxc.model.streamed import lm_head_logits, llama_hidden
    path = Path(path)
    rng = np.random.default_rng(seed)
    table = reference._t["model.embed_tokens.weight"]()
    ids = rng.integers(3, sizes.vocab_size, tokens)
    embeds = table[torch.from_numpy(ids)].to(torch.float32)[None]                       # [1,T,H], real rows
    del table
    L, kv, d, t = sizes.num_layers, sizes.num_kv_heads, sizes.head_dim, tokens
    with _branch_outputs() as branch:
        ref = llama_hidden(reference, sizes, embeds, keep_cache=True,
                           log=(lambda i, n: log(f"reference layer {i}/{n}")) if log else None)
    if len(branch["attention"]) != L or len(branch["mlp"]) != L:
        raise RuntimeError(f"the reference ran {len(branch['attention'])} LlamaAttention and {len(branch['mlp'])} "
                           f"LlamaMLP modules for {L} layers: this transformers' LlamaDecoderLayer is not the one "
                           "the check knows (attention, then MLP, each added to the residual stream)")
    ref_logits = lm_head_logits(reference, ref.hidden[:, -1]).numpy()
    ref_hidden = ref.hidden[:, -1].numpy()
    prefill = {"inputs_embeds": embeds.numpy(), "attention_mask": np.ones((1, t), np.int64),
               "position_ids": np.arange(t, dtype=np.int64)[None]}
    decode = {"inputs_embeds": embeds[:, -1:].numpy(), "attention_mask": np.ones((1, t), np.int64),
              "position_ids": np.array([[t - 1]], np.int64)}
    for i in range(L):
        for kind, cache in (("key", ref.keys), ("value", ref.values)):
            prefill[f"past_key_values.{i}.{kind}"] = np.zeros((1, 0, kv, d), kv_dtype)
            decode[f"past_key_values.{i}.{kind}"] = cache[i][:, :-1].numpy().astype(kv_dtype)
    forced = {"prefill": [h.numpy() for h in ref.inputs], "decode": [h[:, -1:].numpy() for h in ref.inputs]}
    chained, teacher = run_layers(path, L, {"prefill": prefill, "decode": decode}, forced=forced, log=log)

    tol, e2e_tol = TOLERANCE[precision], E2E_TOLERANCE[precision]
    report = {"ok": True, "tolerance_rel_l2": tol, "end_to_end_tolerance_rel_l2": e2e_tol, "tokens": tokens,
              "reference": "transformers LlamaDecoderLayer per layer from the checkpoint, float32"
                           + {"fp16": ", weights rounded to fp16",
                              "int8": ", matmul weights int8 block-quantized (graph pieces at accuracy_level 0)",
                              "int4": ", matmul weights int4 block-quantized (graph pieces at accuracy_level 0)"
                              }.get(precision, ""),
              "checks": []}
    for run, rows in (("prefill", slice(None)), ("decode", slice(-1, None))):
        got = teacher[run]
        errs = {"logits": _rel(ref_logits, got["logits"]), "hidden": _rel(ref_hidden, got["hidden"])}
        branches = {}
        for i in range(L):
            errs[f"present.{i}.key"] = _rel(ref.keys[i][:, rows].numpy(), got[f"present.{i}.key"])
            errs[f"present.{i}.value"] = _rel(ref.values[i][:, rows].numpy(), got[f"present.{i}.value"])
            if i + 1 < L:
                errs[f"h.{i + 1}"] = _rel(ref.inputs[i + 1][:, rows].numpy(), got[f"h.{i + 1}"])
            h_in, mid, h_out = ref.inputs[i][:, rows].numpy(), got[residual_name(i)], got[f"h.{i + 1}"]
            attn, mlp = branch["attention"][i][:, rows].numpy(), branch["mlp"][i][:, rows].numpy()
            branches[f"layer {i} attention output"] = _branch_rel(h_in.astype(mid.dtype), mid, h_in, attn)
            branches[f"layer {i} mlp output"] = _branch_rel(mid, h_out, h_in + attn, mlp)
        e2e = {"logits": _rel(ref_logits, chained[run]["logits"]), "hidden": _rel(ref_hidden, chained[run]["hidden"])}
        per_layer = {**errs, **branches}
        worst = max(per_layer, key=per_layer.get)
        value, e2e_worst = per_layer[worst], max(e2e, key=e2e.get)
        ok = value <= tol and e2e[e2e_worst] <= e2e_tol
        if value <= tol and not ok:                                    # only the end-to-end run is off: name that
            worst, value = f"end to end {e2e_worst}", e2e[e2e_worst]
        report["checks"].append({"run": run, "ok": ok, "worst": worst, "worst_rel_l2": value,
                                 "end_to_end_rel_l2": e2e, "rel_l2": errs, "branch_rel_l2": branches})
        report["ok"] &= ok
    if accuracy_reference is not None:
        acc = llama_hidden(accuracy_reference, sizes, embeds)
        acc_logits = lm_head_logits(accuracy_reference, acc.hidden[:, -1]).numpy()
        acc_hidden = acc.hidden[:, -1].numpy()
        report["accuracy"] = {name: _cos_max([(r, chained[run][name]) for run in ("prefill", "decode")])
                              for name, r in (("logits", acc_logits), ("hidden", acc_hidden))}
    return report


def _cos_max(pairs) -> dict:
    """Cosine similarity and max abs error over (reference, test) pairs, as reports/accuracy.json has them."""
    dot = aa = bb = mx = 0.0
    for a, b in pairs:
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        dot, aa, bb = dot + float(a @ b), aa + float(a @ a), bb + float(b @ b)
        mx = max(mx, float(np.abs(a - b).max()))
    return {"cosine": dot / max(np.sqrt(aa * bb), 1e-30), "max_abs": mx}
