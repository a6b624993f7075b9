"""The typed manifest: a round trip through the dataclasses, schema 1 refused, and every malformed or unsafe
manifest refused in one line that names manifest.json, the field and what to do."""
import json
import re
import shutil

import numpy as np
import pytest

from nxc import names
from nxc.manifest import SCHEMA, BuildError, load_manifest, parse_manifest

FIX = "; re-export the build with this nxc-export"
HEX = "<hex>"       # 16 hex digits of a sha256 in an expected message


@pytest.fixture
def build(tiny_build, tmp_path):
    dst = tmp_path / "build"
    shutil.copytree(tiny_build, dst)
    return dst


def damage(build, change) -> None:
    """change(data, build) edits the parsed manifest (written back) and/or the build's files."""
    path = build / "manifest.json"
    before = path.read_text()
    data = json.loads(before)
    change(data, build)
    if path.read_text() == before:
        path.write_text(json.dumps(data))


def test_round_trip(tiny_build, tiny_model):
    model, tok = tiny_model
    m = load_manifest(tiny_build)
    assert m.schema == SCHEMA == "nxc-build/2"
    assert m.to_dict() == json.loads((tiny_build / "manifest.json").read_text())
    assert parse_manifest(m.to_dict(), m.root) == m
    assert m.config == model.config and m.max_context == 256
    assert m.token_id(names.BOXES) == tok.added_token_ids[names.BOXES]
    (head,) = m.heads
    assert (head.kind, head.graph, dict(head.inputs), head.collect, head.encode_output) == (
        "box", names.GRAPH_LOC_HEADS, {"hidden": "hidden", "boxes": "zeros"}, ("box", "seg_prompt"), "loc_embeds")
    assert m.kv_cache.dtype == "float32" and m.sam.resample == "bilinear"
    assert (m.clip.size, m.sam.size) == (model.config.vision.image_size, model.config.sam.image_size)
    assert m.embeddings.shape == np.load(m.path(m.embeddings.file)).shape
    assert m.graphs["llm"].spec == m.graph_spec("llm") and m.graph_path("llm") == tiny_build / "graphs" / "llm.onnx"
    with pytest.raises(TypeError):
        m.tokens["<new>"] = 1                                # frozen all the way down to the mappings
    with pytest.raises(BuildError, match=r"tokens: no '<new>'"):
        m.token_id("<new>")


def test_schema_1_is_refused_with_what_to_do(build):
    damage(build, lambda d, b: d.update(schema="nxc-build/1", dispatch={"trigger": "<at>"}))
    with pytest.raises(BuildError) as e:
        load_manifest(build)
    assert str(e.value) == (f"{build / 'manifest.json'}: built by an older nxc (schema nxc-build/1); "
                            "re-export it with this nxc-export")


def nested(depth: int):
    v = []
    for _ in range(depth):
        v = [v]
    return v


def tamper(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def outside_link(b, rel: str) -> None:
    (b.parent / "elsewhere").write_bytes((b / rel).read_bytes())   # same bytes: only the link is wrong
    (b / rel).unlink()
    (b / rel).symlink_to(b.parent / "elsewhere")


def heads(change):
    return lambda d, b: change(d["heads"][0])


# (case, change for `damage`, the message after "<build>/")
MALFORMED = [
    ("missing key", heads(lambda h: h.pop("graph")), f"manifest.json: heads[0].graph: missing{FIX}"),
    ("missing section", lambda d, b: d.pop("kv_cache"), f"manifest.json: kv_cache: missing{FIX}"),
    ("wrong type", lambda d, b: d.update(max_context="256"),
     f'manifest.json: max_context: expected an integer between 1 and 1048576, found "256"{FIX}'),
    ("bool for int", lambda d, b: d["prompt"].update(num_image_tokens=True),
     f"manifest.json: prompt.num_image_tokens: expected an integer between 1 and 255, found true{FIX}"),
    ("float for int", lambda d, b: d["config"]["llm"].update(num_layers=2.0),
     f"manifest.json: config.llm.num_layers: expected an integer >= 1, found 2.0{FIX}"),
    ("absurd max_context", lambda d, b: d.update(max_context=10 ** 12),
     f"manifest.json: max_context: expected an integer between 1 and 1048576, found 1000000000000{FIX}"),
    ("max_context over the model's", lambda d, b: d.update(max_context=4096),
     f"manifest.json: max_context: 4096 is more than config.llm.max_position_embeddings (512){FIX}"),
    ("wrong kv dtype", lambda d, b: d["kv_cache"].update(dtype="int8"),
     f"manifest.json: kv_cache.dtype: 'int8' is not a KV cache dtype (float32, float16){FIX}"),
    ("kv dtype not the graph's", lambda d, b: d["kv_cache"].update(dtype="float16"),
     f"manifest.json: kv_cache.dtype: 'float16', but the llm graph's past_key_values.0.key is float32{FIX}"),
    ("schema 1 kv mode", lambda d, b: d["kv_cache"].update(mode="concat"),
     f"manifest.json: kv_cache.mode: unknown field{FIX}"),
    ("NaN", lambda d, b: d["generation"].update(temperature=float("nan")),
     f"manifest.json: generation.temperature: expected a number >= 0, found NaN{FIX}"),
    ("token outside the vocab", lambda d, b: d["tokens"].update({names.AT: 10 ** 6}),
     f"manifest.json: tokens.<at>: expected an integer between 0 and {{last_id}}, found 1000000{FIX}"),
    ("axes out of order", lambda d, b: d["axes"].update(past=[10, 5, 100]),
     f"manifest.json: axes.past: [min, opt, max] [10, 5, 100] is not ordered min <= opt <= max{FIX}"),
    ("graph dtype", lambda d, b: d["graphs"]["llm"]["inputs"][0].update(dtype="float64"),
     "manifest.json: graphs.llm.inputs[0].dtype: 'float64' is not a tensor dtype "
     f"(float32, float16, int64, int32, int8, bool){FIX}"),
    ("embeddings outside", lambda d, b: d["embeddings"].update(file="../embeddings.npy"),
     "manifest.json: embeddings.file: '../embeddings.npy' points outside the build directory; a build may only "
     f"reference its own files{FIX}"),
    ("embeddings absolute", lambda d, b: d["embeddings"].update(file="/etc/passwd"),
     "manifest.json: embeddings.file: '/etc/passwd' is not a plain path relative to the build directory "
     f"(like 'graphs/llm.onnx'){FIX}"),
    ("tokenizer outside", lambda d, b: d["tokenizer"].update(file="graphs/../../tokenizer.json"),
     "manifest.json: tokenizer.file: 'graphs/../../tokenizer.json' points outside the build directory; a build "
     f"may only reference its own files{FIX}"),
    ("tokenizer absolute", lambda d, b: d["tokenizer"].update(file="/tmp/tokenizer.json"),
     "manifest.json: tokenizer.file: '/tmp/tokenizer.json' is not a plain path relative to the build directory "
     f"(like 'graphs/llm.onnx'){FIX}"),
    ("tokenizer not hashed", lambda d, b: d["files"].pop("tokenizer.json"),
     f"manifest.json: tokenizer.file: 'tokenizer.json' is not listed under files, so its sha256 cannot be "
     f"checked{FIX}"),
    ("graph file not in files", lambda d, b: d["files"].pop("graphs/llm.onnx"),
     f"manifest.json: graphs.llm.file: 'graphs/llm.onnx' is not listed under files, so its sha256 cannot be "
     f"checked{FIX}"),
    ("external data outside", lambda d, b: d["graphs"]["llm"].update(external_data=["../llm.onnx.data"]),
     "manifest.json: graphs.llm.external_data[0]: '../llm.onnx.data' points outside the build directory; a build "
     f"may only reference its own files{FIX}"),
    ("embeddings symlinked out", lambda d, b: outside_link(b, "embeddings.npy"),
     "manifest.json: file entry 'embeddings.npy' points outside the build directory; a build may only reference "
     "its own files. Re-export the build."),
    ("tampered embeddings", lambda d, b: tamper(b / "embeddings.npy"),
     f"embeddings.npy: sha256 {HEX}... does not match the manifest's {HEX}...; the file was modified, re-export "
     "the build"),
    ("tampered tokenizer", lambda d, b: tamper(b / "tokenizer.json"),
     f"tokenizer.json: sha256 {HEX}... does not match the manifest's {HEX}...; the file was modified, re-export "
     "the build"),
    ("head's unknown token", heads(lambda h: h.update(trigger="<nope>")),
     "manifest.json: heads[0].trigger: '<nope>' is not a token of tokens "
     f"(<im_patch>, <im_start>, <im_end>, <at>, <boxes>, <s>, </s>, <unk>){FIX}"),
    ("head's unknown graph", heads(lambda h: h.update(graph="box_head")),
     "manifest.json: heads[0].graph: 'box_head' is not a graph of this build "
     f"(vision, llm, loc_heads, sam_encoder, sam_decoder){FIX}"),
    ("head's unknown output", heads(lambda h: h.update(collect=["box", "mask"])),
     "manifest.json: heads[0].collect[1]: 'mask' is not an output of graph loc_heads "
     f"(box, feedback, seg_prompt, loc_embeds){FIX}"),
    ("head's encode output an input", heads(lambda h: h.update(encode_output="boxes")),
     "manifest.json: heads[0].encode_output: 'boxes' is not an output of graph loc_heads "
     f"(box, feedback, seg_prompt, loc_embeds){FIX}"),
    ("head's unknown input", heads(lambda h: h["inputs"].update(pixels="zeros")),
     f"manifest.json: heads[0].inputs.pixels: not an input of graph loc_heads (hidden, boxes){FIX}"),
    ("head's input not fed", heads(lambda h: h["inputs"].pop("boxes")),
     f"manifest.json: heads[0].inputs.boxes: missing{FIX}"),
    ("head's input source", heads(lambda h: h["inputs"].update(boxes="noise")),
     f"manifest.json: heads[0].inputs.boxes: 'noise' is not a head input source (hidden, zeros, slot_index, slot_is_region, signal_embeds){FIX}"),
    ("head's graph output source", heads(lambda h: h["inputs"].update(boxes="vision:nothing")),
     f"manifest.json: heads[0].inputs.boxes: 'vision:nothing' names no output of this build's graphs "
     f"(<graph>:<output>){FIX}"),
    ("head's trigger without feedback", heads(lambda h: h.update(feedback=None)),
     "manifest.json: heads[0]: trigger and feedback come together (a head fired at decode time feeds its output "
     f"back); a head with neither only encodes its slot's rows{FIX}"),
    ("head with neither trigger nor encode", heads(lambda h: h.update(trigger=None, feedback=None,
                                                                      encode_input=None, encode_output=None)),
     f"manifest.json: heads[0]: a head without a trigger needs encode_input / encode_output (it exists for its "
     f"slot rows){FIX}"),
    ("both sam and objects", lambda d, b: d["config"].update(objects={"image_size": 128}),
     f"manifest.json: config: expected exactly one of `sam` (a regression model, NExT-Chat), `objects` (a "
     f"retrieval model) and `projector` (a generation model, NExT-GPT){FIX}"),
    ("head emits its trigger", heads(lambda h: h.update(emit=names.AT)),
     f"manifest.json: heads[0].emit: '<at>' is the trigger too (the head would fire on its own output){FIX}"),
    ("two heads, one trigger", lambda d, b: d["heads"].append(d["heads"][0]),
     f"manifest.json: heads: two heads have the trigger '<at>'{FIX}"),
    ("schema 1 dispatch", lambda d, b: d.update(dispatch={"trigger": names.AT}),
     f"manifest.json: dispatch: unknown field{FIX}"),
    ("nested too deep", lambda d, b: d["source"].update(x=nested(40)),
     f"manifest.json: source.x{'[0]' * 16}[...: nested deeper than 32 levels{FIX}"),
    ("JSON nested 10000 deep", lambda d, b: (b / "manifest.json").write_text("[" * 10000 + "]" * 10000),
     "manifest.json: JSON nested deeper than a manifest's 32 levels; the build is damaged, re-export it"),
    ("unknown batching contract", lambda d, b: d["kv_cache"].update(batch_rows="paged"),
     f"manifest.json: kv_cache.batch_rows: 'paged' is not a batching contract (masked){FIX}"),
    ("JSON array", lambda d, b: (b / "manifest.json").write_text("[]"),
     f"manifest.json: expected a JSON object, found a list{FIX}"),
]


@pytest.mark.parametrize("case,change,message", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_is_refused_in_one_line(build, case, change, message):
    last_id = load_manifest(build, verify=False).config.llm.vocab_size - 1
    damage(build, change)
    with pytest.raises(BuildError) as e:
        load_manifest(build)
    expected = f"{build}/" + message.replace("{last_id}", str(last_id))
    assert re.fullmatch(re.escape(expected).replace(re.escape(HEX), "[0-9a-f]{16}"), str(e.value)), str(e.value)
    assert e.value.__context__ is None or e.value.__suppress_context__     # no KeyError behind it


def test_a_build_from_before_batching_loads_with_the_same_contract(build):
    """Builds written before kv_cache.batch_rows existed have the same llm graph: they batch by mask."""
    damage(build, lambda d, b: d["kv_cache"].pop("batch_rows"))
    assert load_manifest(build, verify=False).kv_cache.batch_rows == "masked"


def test_cli_prints_one_line_for_a_malformed_manifest(build, tmp_path, capsys):
    from PIL import Image

    from nxc.runtime.cli import main
    damage(build, heads(lambda h: h.pop("graph")))
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main([str(build), "--image", str(tmp_path / "x.png"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == f"nxc-run: {build / 'manifest.json'}: heads[0].graph: missing{FIX}\n"
