"""The tokenizer oracle (4.31 LlamaTokenizer, legacy=False) on a tiny sentencepiece model trained here."""
import json
import shutil
import time

import pytest

from nxc import names
from nxc.model.sp_files import tiny_corpus, train_tiny_sentencepiece, write_tokenizer_files
from nxc.model.sp_tokenizer import SentencePieceOracle
from nxc.runtime.tokenizer import TokenizerError


def test_training_is_reproducible_and_fast(tmp_path):
    t0 = time.perf_counter()
    a = train_tiny_sentencepiece(tmp_path / "a", seed=0).read_bytes()
    assert time.perf_counter() - t0 < 3.0
    b = train_tiny_sentencepiece(tmp_path / "b", seed=0).read_bytes()
    c = train_tiny_sentencepiece(tmp_path / "c", seed=1).read_bytes()
    assert a == b
    assert tiny_corpus(0) != tiny_corpus(1)  # another seed, another corpus (the model may or may not differ)
    write_tokenizer_files(tmp_path / "c", tmp_path / "c" / "tokenizer.model")
    assert SentencePieceOracle.from_dir(tmp_path / "c").vocab_size == 605 and len(c) > 0


def test_official_file_layout(tiny_sp_dir):
    files = sorted(p.name for p in tiny_sp_dir.iterdir())
    assert files == ["added_tokens.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    added = json.loads((tiny_sp_dir / "added_tokens.json").read_text())
    assert added == {t: 600 + i for i, t in enumerate(names.ADDED_TOKENS)}
    cfg = json.loads((tiny_sp_dir / "tokenizer_config.json").read_text())
    assert (cfg["legacy"], cfg["tokenizer_class"], cfg["add_bos_token"], cfg["add_eos_token"],
            cfg["model_max_length"]) == (False, "LlamaTokenizer", True, False, 2048)
    smap = json.loads((tiny_sp_dir / "special_tokens_map.json").read_text())
    assert smap["pad_token"] == "<unk>" and smap["bos_token"]["content"] == "<s>"


def test_vocabulary(tiny_oracle):
    o = tiny_oracle
    assert (o.vocab_size, o.bos_id, o.eos_id) == (605, 1, 2)
    assert o.added_token_ids == {t: 600 + i for i, t in enumerate(names.ADDED_TOKENS)}
    assert [o.token_to_id(t) for t in (names.UNK, names.BOS, names.EOS)] == [0, 1, 2]
    assert o.token_to_id("not-a-piece") == 0


def test_bos_first_and_no_eos(tiny_oracle):
    ids = tiny_oracle.encode("Where is the red circle in the image?")
    assert ids[0] == 1 and 2 not in ids
    assert tiny_oracle.encode("") == [1]


def test_at_boxes_is_two_ids_with_nothing_between(tiny_oracle):
    at, boxes = tiny_oracle.token_to_id(names.AT), tiny_oracle.token_to_id(names.BOXES)
    assert tiny_oracle.encode("<at> <boxes>") == [1, at, boxes]
    assert tiny_oracle.encode("  <at>   <boxes>  ") == [1, at, boxes]
    assert tiny_oracle.tokenize("What is region <at> <boxes>?") == ["▁What", "▁is", "▁region", "<at>", "<boxes>", "?"]
    assert tiny_oracle.tokenize("Compare <at> <boxes> <at> <boxes> and")[-5:] == [
        "<at>", "<boxes>", "<at>", "<boxes>", "and"]


@pytest.mark.parametrize("text, after", [
    ("<im_start><im_patch><im_end> Where is the dog?", "<im_end>"),   # "Where" loses its "▁"
    ("Answer: <at> <boxes> .", "<boxes>"),                            # " ." becomes "."
    ("a man <at> <boxes> walks a dog", "<boxes>"),
    ("x</s>USER: hi", "</s>"),                                       # no space after </s>: prefix dropped too
])
def test_legacy_false_drops_the_word_start_after_a_split(tiny_oracle, text, after):
    toks = tiny_oracle.tokenize(text)
    nxt = toks[toks.index(after) + 1]
    assert not nxt.startswith("▁"), toks
    if not text.startswith("<"):
        assert toks[0].startswith("▁")  # the first chunk keeps sentencepiece's dummy prefix


def test_base_specials_split_but_do_not_strip(tiny_oracle):
    # 4.31 registers <s> </s> <unk> as AddedToken(lstrip=False, rstrip=False): the spaces around them stay.
    assert tiny_oracle.tokenize("a </s> b") == ["▁a", "▁", "</s>", "▁", "▁b"]
    assert tiny_oracle.tokenize("a <at> b") == ["▁a", "<at>", "b"]


def _set_special_map(d, **changes):
    path = d / "special_tokens_map.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, flags, tokens", [
    ({}, (False, False), ["▁a", "▁", "</s>", "▁", "▁b"]),
    # A plain-str special is not an AddedToken in 4.31, so it is stripped on both sides like the added tokens.
    ({"eos_token": "</s>"}, (True, True), ["▁a", "</s>", "b"]),
    ({"eos_token": {"content": "</s>", "lstrip": True, "rstrip": False}}, (True, False), ["▁a", "</s>", "▁", "▁b"]),
])
def test_special_tokens_map_decides_stripping_around_specials(tmp_path, tiny_sp_dir, changes, flags, tokens):
    d = tmp_path / "c"
    shutil.copytree(tiny_sp_dir, d)
    _set_special_map(d, **changes)
    o = SentencePieceOracle.from_dir(d)
    assert o.strip_flags[names.EOS] == flags and o.strip_flags[names.AT] == (True, True)
    assert o.tokenize("a </s> b") == tokens


def test_stripped_piece_missing_from_vocab_is_unk(tiny_oracle):
    # A 4.31 quirk: "▁hel" minus its "▁" is "hel", which is no piece, so it becomes <unk> (id 0).
    sp = tiny_oracle.sp
    word = next(p[1:] for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
                if p.startswith("▁") and len(p) > 2 and sp.piece_to_id(p[1:]) == 0
                and sp.encode(p[1:], out_type=str)[0] == p)
    assert tiny_oracle.encode(f"<at>{word}")[:3] == [1, tiny_oracle.token_to_id(names.AT), 0]


def test_decode(tiny_oracle):
    o = tiny_oracle
    ids = o.encode("What is region <at> <boxes>? Answer: yes")
    assert o.decode(ids) == "What is region <at> <boxes> ? Answer: yes"
    assert o.decode(ids, skip_special_tokens=False) == "<s>What is region <at> <boxes> ? Answer: yes"
    # "walks" after <boxes> is "▁walks" minus "▁": no such piece, so <unk>, which decode skips (the 4.31 quirk).
    assert o.decode(o.encode("a man <at> <boxes> walks</s>")) == "a man <at> <boxes>"
    assert o.decode(o.encode("a man <at> <boxes> walks</s>"), skip_special_tokens=False) == (
        "<s>a man <at> <boxes> <unk></s>")
    assert o.decode(o.encode("café 你好 🚀")) == "café 你好 🚀"
    with pytest.raises(TokenizerError, match="out of range"):
        o.decode([605])


def _break(kind, d):
    added = d / "added_tokens.json"
    full = {t: 600 + i for i, t in enumerate(names.ADDED_TOKENS)}
    if kind == "no_model":
        (d / "tokenizer.model").unlink()
    elif kind == "corrupt_model":
        (d / "tokenizer.model").write_bytes(b"not a model")
    elif kind == "no_added":
        added.unlink()
    elif kind == "added_not_json":
        added.write_text("{")
    elif kind == "added_incomplete":
        added.write_text(json.dumps({t: i for t, i in full.items() if t != names.BOXES}))
    elif kind == "added_wrong_ids":
        added.write_text(json.dumps({t: 32000 + i for i, t in enumerate(names.ADDED_TOKENS)}))
    elif kind == "added_wrong_order":
        added.write_text(json.dumps({**full, names.AT: 604, names.BOXES: 603}))
    elif kind == "no_config":
        (d / "tokenizer_config.json").unlink()
    elif kind == "additional_specials":
        _set_special_map(d, additional_special_tokens=[names.AT])
    elif kind == "wrong_eos":
        _set_special_map(d, eos_token="<|endoftext|>")
    elif kind == "legacy_true":
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "legacy": True}))


@pytest.mark.parametrize("kind, messages", [
    ("no_model", ["no tokenizer.model in", "Copy tokenizer.model from the released checkpoint"]),
    ("corrupt_model", ["is not a readable sentencepiece model"]),
    ("no_added", ["no added_tokens.json in", "mean row", "32001-32004", "destroying"]),
    ("added_not_json", ["is not readable JSON", "mean row"]),
    ("added_incomplete", [r"lacks ['<boxes>']", "mean row"]),
    ("added_wrong_ids", ["expected exactly", "'<im_patch>': 600", "found wrong ids", "'<im_patch>': 32000"]),
    ("added_wrong_order", ["found wrong ids {'<at>': 604, '<boxes>': 603}"]),
    ("no_config", ["no tokenizer_config.json in", '"legacy": false']),
    ("legacy_true", ["expected legacy=false", "found {'legacy': True}"]),
    ("additional_specials", ["lists additional_special_tokens ['<at>']; expected none"]),
    ("wrong_eos", ["eos_token is '<|endoftext|>', expected '</s>'"]),
])
def test_load_errors_say_what_was_expected_and_found(tmp_path, tiny_sp_dir, kind, messages):
    d = tmp_path / kind
    shutil.copytree(tiny_sp_dir, d)
    _break(kind, d)
    with pytest.raises(TokenizerError) as e:
        SentencePieceOracle.from_dir(d)
    for m in messages:
        assert m in str(e.value)
