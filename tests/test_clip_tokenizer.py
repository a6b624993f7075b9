"""nxc.clip_tokenizer.ClipTokenizer (standard library only) gives exactly the input ids of transformers'
CLIPTokenizer(padding="max_length", truncation=True, max_length=L) on the same folder: the shapes caption
tokenizer, the shipped NExT-GPT generator's, and a richer BPE vocabulary trained here (multi-token words, partial
merges, symbols missing from vocab.json), plus special-token variants of it."""
import ast
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from nxc.clip_tokenizer import ClipTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TEXTS = [
    "", "a red circle, a blue square and a green star", "A RED CIRCLE And A Blue Square", "a   red\t\tcircle\n\n and  ",
    "  \n ", "it's red!", "don't we'll I'M they've 'dog ''s !'s", "3 stars 42", "2nd ²½ 一二三", "café", "cafe\u0301",
    "ΣΑΣ ſ K", "a_b c-d e.f (g) [h]", "xyzzy qwertyuiop zzz", "unbelievable reddish circles", "v z vz zv",
    "a red circle " * 30, "<|endoftext|> hi<|startoftext|>x", "<|ENDOFTEXT|>", "x\x01y\x1cz\u00a0w\u200bv\u3000u",
    "wow!!! ... ?!", "the quick brown fox jumps over the lazy dog",
]
CORPUS = """The quick brown fox jumps over the lazy dog. A red circle sits beside a blue square and a green star.
Shapes are drawn on a white canvas: circles, squares, triangles and stars of many colours. The small red triangle
is above the large blue circle, while the green square is below it. Every caption names the colour and the shape of
each object, and the model learns to draw them where they belong. It's a simple world, but it's enough to test the
tokenizer: words repeat, letters pair up, and the most frequent pairs become merges. We'll see whether the partial
merges of longer words like 'unbelievable' or 'reddish' agree with the reference, and whether they've been handled."""


def _byte_chars() -> list[str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]


def _write(folder: Path, vocab: dict, merges: list[tuple[str, str]], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", **config}))
    return folder


def _train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """A plain CLIP-style BPE trainer: words with "</w>" on their last symbol, merge the most frequent pair."""
    import re
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()))
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def _rich(folder: Path, **config) -> Path:
    """~200 merges learned from CORPUS; "v</w>", "z</w>" and "Ã" (the first byte of "é") left out of vocab.json;
    `config` overrides tokenizer_config.json (None drops a key)."""
    merges = _train_bpe(CORPUS, 200)
    assert len(merges) == 200
    chars = _byte_chars()
    symbols = [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges)]
    in_merges = {s for a, b in merges for s in (a, b, a + b)}
    dropped = {"v</w>", "z</w>", "Ã"}
    assert not dropped & in_merges
    vocab = {}
    for s in symbols:
        if s not in dropped:
            vocab.setdefault(s, len(vocab))
    vocab |= {BOS: len(vocab), EOS: len(vocab) + 1}
    config = {"model_max_length": 24, "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS, **config}
    return _write(folder, vocab, merges, {k: v for k, v in config.items() if v is not None})


def _compare(folder: Path, texts: list[str] = TEXTS) -> ClipTokenizer:
    transformers = pytest.importorskip("transformers", reason="the reference CLIPTokenizer needs transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    ours = ClipTokenizer.from_folder(folder)
    assert ours.max_length == ref.model_max_length
    for text in texts:
        for length in (None, 8):
            want = ref(text, padding="max_length", truncation=True, max_length=length or ref.model_max_length).input_ids
            got = ours.encode(text, max_length=length)
            assert got == want, f"{folder}: {text!r} max_length={length}: {got} != transformers' {want}"
            assert len(got) == (length or ours.max_length)
    return ours


def test_caption_tokenizer(tmp_path):
    from nxc.shapes.generator_text import write_caption_tokenizer
    ours = _compare(write_caption_tokenizer(tmp_path / "tok", context_length=16))
    ids = ours.encode("a red circle, a blue square and a green star")  # 13 tokens with bos and eos, then pad
    assert ours.eos_id not in ids[:12] and ids[12:] == [ours.eos_id] * 4


def test_shipped_generator_tokenizer():
    from nxc.assets import nextgpt_checkpoint
    _compare(nextgpt_checkpoint() / "generator" / "tokenizer")


def test_rich_bpe_vocabulary(tmp_path):
    ours = _compare(_rich(tmp_path / "rich"))
    # the vocabulary exercises what the caption tokenizers cannot: a seen word is one token, an unseen one is split
    # into partial merges, a symbol missing from vocab.json is the unk id, and a long text is truncated
    assert len(ours.encode("the")) == ours.max_length and ours.encode("the")[2] == ours.eos_id
    body = [i for i in ours.encode("unbelievable reddish")[1:] if i != ours.eos_id]
    assert 2 < len(body) < len("unbelievablereddish")
    assert ours.encode("v")[1] == ours.unk_id and ours.encode("café")[1:-1].count(ours.unk_id) >= 1
    assert ours.encode("a red circle " * 30)[-1] == ours.eos_id


def test_random_texts(tmp_path):
    rng = random.Random(0)
    pool = [*"abcdefghijklmnopqrstuvwxyz ABCVZ0123456789 .,!?'-_\t\n\x01éΣ一²", "'s", "'ll", "'re", "the ", "circle",
            "  ", "\u00a0", "e\u0301", "\x1c", EOS, BOS, "<|ENDOFTEXT|>", "!!"]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    _compare(_rich(tmp_path / "rich"), texts)
    _compare(_rich(tmp_path / "rich-pad", pad_token="!"), texts)


def test_unk_outside_vocab_raises_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the reference CLIPTokenizer needs transformers")
    folder = _rich(tmp_path / "rich", unk_token="<unk>")  # "v</w>" is not in vocab.json, nor is "<unk>"
    assert ClipTokenizer.from_folder(folder).encode("red")[:3] == _compare(folder, ["red"]).encode("red")[:3]
    with pytest.raises(Exception, match="<unk>"):
        transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)("v")
    with pytest.raises(ValueError, match="outside vocab.json"):
        ClipTokenizer.from_folder(folder).encode("v")


@pytest.mark.parametrize("config", [
    {"pad_token": "!"},                            # a special token that is also a vocab symbol (SD 2 pads with "!")
    {"pad_token": "<pad>", "bos_token": "<s>"},    # special tokens missing from vocab.json get new ids
    {"model_max_length": 12, "pad_token": None},   # no pad_token: transformers' default "<|endoftext|>", not eos
    {"eos_token": "!", "pad_token": None},
    # a transformers-saved config: its added tokens matched on the normalized text; vocab.json's ids win
    {"added_tokens_decoder": {"512": {"content": BOS, "normalized": True},
                              "513": {"content": EOS, "normalized": True}}},
])
def test_special_token_variants(tmp_path, config):
    _compare(_rich(tmp_path / "rich", **config))


@pytest.mark.parametrize("missing", ["merges.txt", "vocab.json"])
def test_missing_file_is_one_line_value_error(tmp_path, missing):
    folder = _rich(tmp_path / "tok")
    (folder / missing).unlink()
    with pytest.raises(ValueError) as err:
        ClipTokenizer.from_folder(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and missing in message


def test_unparseable_merges_is_value_error(tmp_path):
    folder = _rich(tmp_path / "tok")
    (folder / "merges.txt").write_text("#version: 0.2\nnot a merge line\n")
    with pytest.raises(ValueError, match="merges.txt"):
        ClipTokenizer.from_folder(folder)


def test_imports_only_the_standard_library():
    source = Path(sys.modules[ClipTokenizer.__module__].__file__).read_text()
    names = {a.name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
