"""GLIGEN's scheduled sampling as a branch in the denoiser graph: each gated fuser's nodes move into an ONNX `If`.

StableDiffusionGLIGENPipeline turns the fusers off after int(beta * steps) steps (`enable_fuser(False)`), and from
then on the UNet is the base UNet: no fuser runs. The exported graph has one input for that switch, `grounding` [B]
(nxc.export.generator_graphs._gated: x + g tanh(a) Attn(..), x + g tanh(b) FF(..)); computed with g = 0 the fusers
would still cost their full compute (measured on the shapes UNet: a call 59% slower than the plain UNet's). So after
export each fuser's nodes (named ".../fuser/..." by torch.onnx's module scopes) become the then-branch of

    If(ReduceMax(grounding) > 0)  then: the fuser (times g per row, so rows with g = 0 stay exact)
                                  else: Identity(x)

and the steps after beta cost what the base UNet costs. Subgraphs read the outer graph's values (x, the grounding
tokens, the weights) by name, as ONNX allows; ONNX Runtime and TensorRT (IIfConditionalLayer) run If.
"""
from __future__ import annotations

from pathlib import Path

FUSER = "/fuser/"


def _groups(graph) -> dict[str, list[int]]:
    """fuser scope -> the indices of its nodes, in graph order."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        if FUSER in n.name:
            groups.setdefault(n.name.split(FUSER)[0] + FUSER, []).append(i)
    return groups


def gate_fusers(path: str | Path, *, gate_input: str = "grounding") -> int:
    """Rewrite the ONNX file at `path` in place (external data left where it is): each fuser in an If on
    max(gate_input) > 0. Returns the number of fusers; 0 leaves the file untouched."""
    import onnx
    from onnx import TensorProto, helper
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    groups = _groups(g)
    if not groups:
        return 0
    if gate_input not in {i.name for i in g.input}:
        raise ValueError(f"{path}: fusers but no {gate_input!r} input: not a GLIGEN denoiser graph of nxc's")
    inits = {t.name: t for t in g.initializer}
    cond = "gligen_fusers_on"
    head = [helper.make_node("ReduceMax", [gate_input], ["gligen_gate_max"], name="gligen/ReduceMax", keepdims=0),
            helper.make_node("Constant", [], ["gligen_gate_zero"], name="gligen/Zero",
                             value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Greater", ["gligen_gate_max", "gligen_gate_zero"], [cond], name="gligen/Greater")]
    nodes = list(g.node)
    replace: dict[int, object] = {}            # the last node of each group -> its If; the group's other nodes go
    drop: set[int] = set()
    for scope, idx in groups.items():
        members = [nodes[i] for i in idx]
        made = {o for n in members for o in n.output}
        used_outside = {v for j, n in enumerate(nodes) if j not in set(idx) for v in n.input} | \
            {o.name for o in g.output}
        outs = [o for o in made if o in used_outside]
        if len(outs) != 1:
            raise ValueError(f"{path}: fuser {scope} has {len(outs)} outputs used outside it; expected 1")
        out = outs[0]
        last = next(n for n in members if out in n.output)
        first_add = next((n for n in members if n.output[0] == last.input[0]), None)
        x = first_add.input[0] if first_add is not None and first_add.op_type == "Add" else None
        if x is None or x in made:
            raise ValueError(f"{path}: fuser {scope}: its input hidden state was not found (x + ... + ...)")
        half = any(inits[v].data_type == TensorProto.FLOAT16 for n in members for v in n.input if v in inits)
        elem = TensorProto.FLOAT16 if half else TensorProto.FLOAT
        then_out, else_out = f"{out}__then", f"{out}__else"
        for n in members:
            n.output[:] = [then_out if o == out else o for o in n.output]
        then_branch = helper.make_graph(members, f"{scope}then", [], [helper.make_tensor_value_info(then_out, elem,
                                                                                                    None)])
        else_branch = helper.make_graph([helper.make_node("Identity", [x], [else_out], name=f"{scope}Identity")],
                                        f"{scope}else", [], [helper.make_tensor_value_info(else_out, elem, None)])
        replace[idx[-1]] = helper.make_node("If", [cond], [out], name=f"{scope}If", then_branch=then_branch,
                                            else_branch=else_branch)
        drop.update(idx[:-1])
    inner = {o for i in drop for o in nodes[i].output}
    kept_info = [v for v in g.value_info if v.name not in inner]
    del g.value_info[:]
    g.value_info.extend(kept_info)
    rewritten = head + [replace.get(i, n) for i, n in enumerate(nodes) if i not in drop]
    del g.node[:]
    g.node.extend(rewritten)
    onnx.save_model(model, str(path))
    return len(groups)
