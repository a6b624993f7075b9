"""Sentencepiece files for tests and the shapes model: a tiny deterministic model trained on a corpus in NExT-Chat's
prompt style (`train_tiny_sentencepiece`), the same grown to LLaMA's 32000 pieces (`llama_sized_sentencepiece`, for
made checkpoints of the real vocabulary size), and a checkpoint's official tokenizer file layout
(`write_tokenizer_files`)."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm

from nxc import names
from nxc.model.sp_tokenizer import (ADDED_TOKENS_JSON, SPECIAL_TOKENS_MAP_JSON, TOKENIZER_CONFIG_JSON,
                                    TOKENIZER_MODEL, load_sentencepiece)

_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "brown", "pink")
_SHAPES = ("circle", "square", "triangle", "star", "box", "dog", "cat", "man", "woman", "car", "tree", "ball")
_WORDS = ("the", "a", "is", "on", "in", "of", "near", "left", "right", "top", "bottom", "image", "picture",
          "walks", "holds", "sits", "next", "to", "with", "and", "there", "region", "object", "location")
_QUESTIONS = (
    "Where is the {c} {s} in the image?", "Can you describe the image and include object locations?",
    "What is region [{n}]?", "Is there a {c} {s} in the image?", "Answer: yes", "Answer: no",
    "Can you locate the {c} {s}?", "Please find the {c} {s}.", "Detect the {c} {s} in the image?",
    "What is the {s} doing? Please mention related object locations.", "Describe region [{n},{m}].",
)


def tiny_corpus(seed: int) -> list[str]:
    """A small English corpus in NExT-Chat's prompt style, fully determined by `seed`. Returns sentences."""
    rng = random.Random(seed)
    out = [names.SYSTEM_PROMPT, f"{names.ROLES[0]}: hello {names.ROLES[1]}: hi", "café naïve 😀 über ½ — “quoted”",
           "digits 0123456789 and punctuation , . ; : ! ? ' \" ( ) [ ] { } - _ / + = * & % $ # @ ~ ` | < >",
           "tab\tseparated\tvalues", "double  spaced   text    here"]
    for c in _COLOURS:
        for s in _SHAPES:
            out.append(f"a {c} {s} is {rng.choice(_WORDS)} the {rng.choice(_WORDS)} of the image.")
    for _ in range(300):
        q = rng.choice(_QUESTIONS).format(c=rng.choice(_COLOURS), s=rng.choice(_SHAPES), n=rng.randrange(10),
                                          m=rng.randrange(10))
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 12)))
        out.append(f"{names.SYSTEM_PROMPT} {names.ROLES[0]}: {q} {names.ROLES[1]}: {words.capitalize()} "
                   f"{rng.randrange(1000)}.")
    return out


def train_sentencepiece(sentences, out_dir, vocab_size: int) -> Path:
    """Train a LLaMA-style BPE sentencepiece model (byte fallback, dummy prefix, identity normalisation).

    Deterministic for the same sentences. Returns the path of `<out_dir>/tokenizer.model`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with open("/dev/null", "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, logstream=quiet,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            num_threads=1, train_extremely_large_corpus=False, hard_vocab_limit=False)
    path = out_dir / TOKENIZER_MODEL
    path.write_bytes(buf.getvalue())
    return path


def train_tiny_sentencepiece(out_dir, seed: int, vocab_size: int = 600) -> Path:
    """`train_sentencepiece` on `tiny_corpus(seed)`: the same seed gives a byte-identical file."""
    return train_sentencepiece(tiny_corpus(seed), out_dir, vocab_size)


LLAMA_BASE_VOCAB = 32000    # pieces of LLaMA's tokenizer.model (NExT-Chat adds 5 tokens: 32005)
_MAX_PIECE_CHARS = 16        # sentencepiece's default max_sentencepiece_length


def llama_sized_sentencepiece(out_dir, *, num_pieces: int = LLAMA_BASE_VOCAB, seed: int = 0) -> Path:
    """A LLaMA-style BPE sentencepiece model with exactly `num_pieces` pieces, written to `<out_dir>/tokenizer.model`.

    Layout as LLaMA's: <unk> <s> </s> at ids 0, 1, 2, the 256 byte-fallback pieces <0x00>..<0xFF> at 3..258, then
    normal pieces. It is `train_tiny_sentencepiece(seed)` (a few hundred pieces, well under a second) grown with
    filler normal pieces: each the concatenation of a trained normal piece and a trained normal piece without a
    leading "▁" (so every filler is a BPE merge of two pieces, as in a trained model, and the tokenizers
    conversion stays exact), at most 16 characters, not already a piece, in a fixed order, with scores below every
    trained piece and decreasing. Ordinary text still round-trips (byte fallback); it may now use fillers.
    Deterministic: the same seed gives a byte-identical file. Returns the path written.
    """
    from sentencepiece import sentencepiece_model_pb2

    out_dir = Path(out_dir)
    trained = train_tiny_sentencepiece(out_dir / ".train", seed)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(trained.read_bytes())
    trained.unlink()
    (out_dir / ".train").rmdir()
    normal_type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    normal = [p.piece for p in proto.pieces if p.type == normal_type]
    if len(proto.pieces) > num_pieces:
        raise ValueError(f"num_pieces {num_pieces} is below the {len(proto.pieces)} pieces of the trained model")
    seen = {p.piece for p in proto.pieces}
    score = min(p.score for p in proto.pieces) - 1.0
    tails = [b for b in normal if not b.startswith("\u2581")]
    need = num_pieces - len(proto.pieces)
    for a in normal:
        for b in tails:
            if need == 0:
                break
            piece = a + b
            if len(piece) <= _MAX_PIECE_CHARS and piece not in seen:
                seen.add(piece)
                proto.pieces.add(piece=piece, score=score, type=normal_type)
                score -= 1.0
                need -= 1
    if need:
        raise ValueError(f"could not make {num_pieces} distinct pieces from the trained model ({need} short)")
    proto.trainer_spec.vocab_size = num_pieces
    path = out_dir / TOKENIZER_MODEL
    path.write_bytes(proto.SerializeToString())
    return path


def write_tokenizer_files(ckpt_dir, sp_model_path) -> Path:
    """Write the tokenizer files of a NExT-Chat checkpoint into `ckpt_dir` (reference §6.5 layout).

    tokenizer.model (copied), added_tokens.json (the 5 tokens -> base_vocab+0..4), special_tokens_map.json,
    tokenizer_config.json (legacy false). Returns `ckpt_dir` as a Path.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    data = Path(sp_model_path).read_bytes()
    if Path(sp_model_path).resolve() != (ckpt_dir / TOKENIZER_MODEL).resolve():
        (ckpt_dir / TOKENIZER_MODEL).write_bytes(data)
    base = load_sentencepiece(ckpt_dir).get_piece_size()

    def special(tok):
        return {"content": tok, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    files = {
        ADDED_TOKENS_JSON: {t: base + i for i, t in enumerate(names.ADDED_TOKENS)},
        SPECIAL_TOKENS_MAP_JSON: {"bos_token": special(names.BOS), "eos_token": special(names.EOS),
                                  "unk_token": special(names.UNK), "pad_token": names.UNK},
        TOKENIZER_CONFIG_JSON: {
            "add_bos_token": True, "add_eos_token": False, "bos_token": special(names.BOS),
            "clean_up_tokenization_spaces": False, "eos_token": special(names.EOS), "legacy": False,
            "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer", "unk_token": special(names.UNK)},
    }
    for name, obj in files.items():
        (ckpt_dir / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ckpt_dir
