"""Convert a checkpoint's sentencepiece tokenizer into the `tokenizer.json` the runtime reads (no torch).

    tokenizer.model + added_tokens.json ──> tokenizers JSON
        model       BPE(vocab = every sp piece at its sp id, merges from the vocab, byte_fallback, fuse_unk, <unk>)
        normalizer  Prepend("▁") + Replace(" ", "▁")           (= sp's add_dummy_prefix + whitespace escaping)
        decoder     Replace("▁", " ") + ByteFallback + Fuse + Strip(" ", 1, 0)   (= sp.decode)
        added       <unk> <s> </s> (special; no strip for LLaMA's files); the 5 NExT-Chat tokens (not special,
                    strip both sides)

The BPE model encodes one text chunk exactly as `sp.encode(chunk)`; the 4.31 handling around it (splitting on added
tokens, stripping, legacy=False prefix removal, BOS) is done by `nxc.runtime.tokenizer.Tokenizer`, which reads the
`lstrip` / `rstrip` / `special` flags of the `added_tokens` entries written here. (`tokenizers` rejects unknown
top-level keys, so nothing else is stored.)
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from nxc import names
from nxc.model.sp_tokenizer import SentencePieceOracle, TokenizerError

# sentencepiece ModelProto piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2  # TrainerSpec.model_type


def _model_proto(sp):
    """Parse the processor's serialized ModelProto. Returns the protobuf message."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # needs protobuf, part of the [export] extra
        raise TokenizerError(f"reading tokenizer.model needs protobuf ({e}); install nxc[export].") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def _check_supported(proto, where: str) -> None:
    """Raise TokenizerError unless the model is a LLaMA-style BPE this converter reproduces exactly."""
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if ts.model_type != _BPE:
        problems.append(f"model_type={ts.model_type} (expected BPE={_BPE})")
    if not ts.byte_fallback:
        problems.append("byte_fallback=false (expected true)")
    if ns.precompiled_charsmap:
        problems.append(f"a '{ns.name}' normalization rule (expected 'identity', no charsmap)")
    if not ns.add_dummy_prefix or ns.remove_extra_whitespaces or not ns.escape_whitespaces:
        problems.append(f"add_dummy_prefix={ns.add_dummy_prefix}, remove_extra_whitespaces="
                        f"{ns.remove_extra_whitespaces}, escape_whitespaces={ns.escape_whitespaces} "
                        "(expected true, false, true)")
    if ts.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true (expected false)")
    user = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    if user:
        problems.append(f"user-defined pieces {user[:5]} (expected none)")
    if problems:
        raise TokenizerError(
            f"{where}: this sentencepiece model is not LLaMA-style, so the tokenizers conversion would not "
            f"reproduce it: {'; '.join(problems)}. nxc supports LLaMA's tokenizer.model only.")


def bpe_vocab_and_merges(proto) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocab ({piece: sp id}) and merges of a sentencepiece BPE model.

    Merges: for every normal piece, each split into two normal pieces, ordered by the merged piece's score
    (highest first, as sentencepiece merges the best-scoring pair first), then by the merged piece's id, then by
    the halves' ids. Returns (vocab, merges).
    """
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece for p in proto.pieces if p.type == _NORMAL}
    ranked = []
    for i, p in enumerate(proto.pieces):
        if p.type != _NORMAL:
            continue
        s = p.piece
        for k in range(1, len(s)):
            left, right = s[:k], s[k:]
            if left in normal and right in normal:
                ranked.append((-p.score, i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return vocab, [(r[4], r[5]) for r in ranked]


def build_tokenizer_json(ckpt_dir) -> str:
    """Convert `<ckpt_dir>`'s tokenizer.model + added_tokens.json into tokenizers JSON. Returns the JSON text."""
    oracle = SentencePieceOracle.from_dir(ckpt_dir)  # loads and checks all the tokenizer files
    sp, added, flags = oracle.sp, oracle.added_token_ids, oracle.strip_flags
    proto = _model_proto(sp)
    _check_supported(proto, str(Path(ckpt_dir) / "tokenizer.model"))
    vocab, merges = bpe_vocab_and_merges(proto)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=names.UNK, fuse_unk=True, byte_fallback=True,
                               dropout=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    # lstrip / rstrip carry 4.31's whitespace stripping around each token (the runtime reads them): none around
    # LLaMA's specials, both sides of the five plain added tokens.
    tok.add_special_tokens([AddedToken(t, lstrip=flags[t][0], rstrip=flags[t][1], normalized=False, special=True)
                            for t in (names.UNK, names.BOS, names.EOS)])
    tok.add_tokens([AddedToken(t, lstrip=flags[t][0], rstrip=flags[t][1], normalized=False, special=False)
                    for t in sorted(added, key=added.get)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{names.BOS} $A", pair=f"{names.BOS} $A {names.BOS} $B", special_tokens=[(names.BOS, sp.bos_id())])
    got = {t: tok.token_to_id(t) for t in added}
    if got != added:  # cannot happen unless tokenizers changes how it numbers added tokens
        raise TokenizerError(f"converted added-token ids {got} differ from added_tokens.json {added}.")
    return tok.to_str(pretty=True)


def write_tokenizer_json(ckpt_dir, out_path) -> Path:
    """Write `build_tokenizer_json(ckpt_dir)` to `out_path` (UTF-8). Returns the path written."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(build_tokenizer_json(ckpt_dir), encoding="utf-8")
    return out_path
