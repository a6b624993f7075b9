"""The tokenizer oracle: NExT-Chat's tokenizer (transformers 4.31 slow LlamaTokenizer, legacy=False) on sentencepiece.

This is the reference the runtime tokenizer (`nxc.runtime.tokenizer`) is tested against. It re-implements, on the
sentencepiece model itself, what 4.31 does (reference §2, §3.3):

    text = "▁" + text.replace("▁", " ")
    split on added tokens (<im_patch> <im_start> <im_end> <at> <boxes>: strip the text on both sides;
                           <s> </s> <unk>: split, strip as special_tokens_map.json says: not at all for LLaMA)
    each text chunk: sp.encode(chunk) with the dummy prefix, then, unless the chunk is the first one or starts
                     with a space, drop the "▁" of its first piece (a stripped piece not in the vocab is <unk>)
    ids = [<s>] + ...   (no </s>)

`encode_segments`: a prompt as nxc.prompt segments; only control segments are cut at the no-split tokens, plain
ones (user text) never are, and text on both sides of a segment boundary is one piece before the rules above.

The tiny test model and the official file layout are in nxc.model.sp_files.
"""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from nxc import names
from nxc.tokens import SPIECE_UNDERLINE, Segment, TokenizerError

__all__ = ["SentencePieceOracle", "TokenizerError"]

TOKENIZER_MODEL = "tokenizer.model"
ADDED_TOKENS_JSON = "added_tokens.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_JSON = "special_tokens_map.json"

_DANGER = (
    "NExT-Chat's own loader (initialize_vision_tokenizer) would then add the tokens itself and overwrite rows "
    "32001-32004 of embed_tokens and lm_head with the mean row, destroying the trained <im_start>/<im_end>/<at>/"
    "<boxes> embeddings (reference §6.2). Restore added_tokens.json from the released checkpoint: it must map "
    + ", ".join(f"{t} -> base_vocab+{i}" for i, t in enumerate(names.ADDED_TOKENS)) + "."
)


def load_sentencepiece(ckpt_dir) -> spm.SentencePieceProcessor:
    """Load `<ckpt_dir>/tokenizer.model`. Returns the processor; raises TokenizerError if missing or unreadable."""
    path = Path(ckpt_dir) / TOKENIZER_MODEL
    if not path.is_file():
        raise TokenizerError(
            f"no {TOKENIZER_MODEL} in {ckpt_dir}: expected the LLaMA sentencepiece model saved with the NExT-Chat "
            "checkpoint. Copy tokenizer.model from the released checkpoint into this directory.")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on a corrupt proto
        raise TokenizerError(
            f"{path} is not a readable sentencepiece model ({e}); re-copy it from the checkpoint.") from None
    for tok, want in ((names.UNK, 0), (names.BOS, 1), (names.EOS, 2)):
        if sp.piece_to_id(tok) != want or sp.id_to_piece(want) != tok:
            raise TokenizerError(
                f"{path}: expected {tok} at id {want} (LLaMA layout), found id {sp.piece_to_id(tok)}; "
                "this is not a LLaMA tokenizer.model.")
    return sp


def read_added_tokens(ckpt_dir, base_vocab: int) -> dict[str, int]:
    """Read and check `added_tokens.json`. Returns {token: id} with ids base_vocab+0..4 in names.ADDED_TOKENS order,
    then, for a retrieval model (nxc.model.retrieval: the file has `<objfeat>`), nxc.object_index.ADDED_TOKENS; for a
    NExT-GPT model (nxc.model.nextgpt: the file has `[IMG0]`), names.SIGNAL_TOKENS."""
    from nxc.object_index import ADDED_TOKENS as OBJECT_TOKENS, OBJ_FEAT
    path = Path(ckpt_dir) / ADDED_TOKENS_JSON
    if not path.is_file():
        raise TokenizerError(f"no {ADDED_TOKENS_JSON} in {ckpt_dir}: expected the 5 NExT-Chat tokens. " + _DANGER)
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not readable JSON ({e}). " + _DANGER) from None
    if not isinstance(found, dict):
        raise TokenizerError(f"{path}: expected a JSON object {{token: id}}, found {type(found).__name__}. " + _DANGER)
    expected = (names.ADDED_TOKENS + (OBJECT_TOKENS if OBJ_FEAT in found else ())
                + (names.SIGNAL_TOKENS if names.SIGNAL_TOKENS[0] in found else ()))     # NExT-GPT's [IMG0].. last
    missing = [t for t in expected if t not in found]
    if missing:
        raise TokenizerError(f"{path} lacks {missing[:8]} (found {sorted(found)[:8]}...). " + _DANGER)
    want = {t: base_vocab + i for i, t in enumerate(expected)}
    wrong = {t: found[t] for t in expected if found[t] != want[t]}
    extra = sorted(set(found) - set(want))
    if wrong or extra:
        raise TokenizerError(
            f"{path}: expected exactly {dict(list(want.items())[:6])}... (right after the {base_vocab} sentencepiece "
            f"pieces, in NExT-Chat's add order), found wrong ids {dict(list(wrong.items())[:6])}"
            + (f" and extra tokens {extra[:6]}" if extra else "")
            + ". The embedding rows are indexed by these ids, so the checkpoint and its tokenizer do not match; "
            "use the added_tokens.json saved with the checkpoint.")
    return want


def check_tokenizer_config(ckpt_dir) -> dict:
    """Check `tokenizer_config.json` describes the 4.31 behaviour emulated here. Returns the parsed config."""
    path = Path(ckpt_dir) / TOKENIZER_CONFIG_JSON
    if not path.is_file():
        raise TokenizerError(
            f"no {TOKENIZER_CONFIG_JSON} in {ckpt_dir}: expected the checkpoint's tokenizer config with "
            '"legacy": false (without it 4.31 falls back to legacy=True, which tokenizes differently). '
            "Copy it from the checkpoint.")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not readable JSON ({e}); copy it from the checkpoint.") from None
    bad = {}
    if cfg.get("legacy") is not False:  # absent means legacy=True in 4.31
        bad["legacy"] = cfg.get("legacy", "<missing>")
    for key, default in (("add_bos_token", True), ("add_eos_token", False)):
        if cfg.get(key, default) is not default:
            bad[key] = cfg[key]
    if bad:
        raise TokenizerError(
            f"{path}: expected legacy=false, add_bos_token=true, add_eos_token=false (NExT-Chat's saved tokenizer), "
            f"found {bad}. nxc only reproduces that configuration; check this is a NExT-Chat checkpoint.")
    return cfg


_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def special_token_flags(ckpt_dir, config: dict) -> dict[str, tuple[bool, bool]]:
    """(lstrip, rstrip) that 4.31 applies around literal <unk>, <s>, </s> in the text, for this checkpoint.

    4.31 strips around a special token only as its AddedToken says, and around a plain-str one on both sides.
    LlamaTokenizer wraps the tokenizer_config values in AddedToken(lstrip=False, rstrip=False) (or takes the
    config's dict); special_tokens_map.json then overrides each attribute: a dict stays an AddedToken, a str does
    not. Returns {token: (lstrip, rstrip)}; (True, True) for a token left as a plain str.
    """
    specials = (names.UNK, names.BOS, names.EOS)
    attrs: dict[str, object] = {}
    for key, default in (("bos_token", names.BOS), ("eos_token", names.EOS), ("unk_token", names.UNK),
                         ("pad_token", None)):
        v = config.get(key, default)
        if v is not None:  # LlamaTokenizer.__init__ makes an AddedToken(lstrip=False, rstrip=False) of a str
            attrs[key] = v if isinstance(v, dict) else {"content": v}
    path = Path(ckpt_dir) / SPECIAL_TOKENS_MAP_JSON
    if path.is_file():
        try:
            smap = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path} is not readable JSON ({e}); copy it from the checkpoint.") from None
        if not isinstance(smap, dict):
            raise TokenizerError(f"{path}: expected a JSON object, found {type(smap).__name__}.")
        if smap.get("additional_special_tokens"):
            raise TokenizerError(
                f"{path} lists additional_special_tokens {smap['additional_special_tokens']}; expected none "
                "(NExT-Chat adds its tokens with add_tokens, which 4.31 strips around and never skips in decode). "
                "nxc does not reproduce that tokenizer; check this is a NExT-Chat checkpoint.")
        attrs.update({k: v for k, v in smap.items() if k in _SPECIAL_ATTRS})
    flags = {t: (True, True) for t in specials}
    for key in _SPECIAL_ATTRS:  # 4.31 builds {str(t): t} over the attributes in this order: the last one wins
        v = attrs.get(key)
        if isinstance(v, dict) and v.get("content") in specials:
            flags[v["content"]] = (bool(v.get("lstrip", False)), bool(v.get("rstrip", False)))
    for key, tok in (("bos_token", names.BOS), ("eos_token", names.EOS), ("unk_token", names.UNK)):
        v = attrs.get(key)
        content = v.get("content") if isinstance(v, dict) else v
        if content != tok:
            raise TokenizerError(
                f"{key} is {content!r}, expected {tok!r} (LLaMA's specials); this is not a LLaMA tokenizer.")
    return flags


class SentencePieceOracle:
    """NExT-Chat's tokenizer, computed the 4.31 way on the sentencepiece model. Use `from_dir`."""

    def __init__(self, *, sp: spm.SentencePieceProcessor, added: dict[str, int],
                 special_flags: dict[str, tuple[bool, bool]] | None = None):
        self.sp = sp
        self._added = dict(added)
        self._id_to_added = {i: t for t, i in added.items()}
        # 4.31 `unique_no_split_tokens`: the added tokens and the specials (registered by sanitize_special_tokens).
        self._no_split = set(added) | {names.UNK, names.BOS, names.EOS}
        # (lstrip, rstrip) per token: the added tokens are plain str in 4.31 (stripped on both sides); the specials
        # are AddedToken(lstrip=False, rstrip=False) for LLaMA's usual files (see special_token_flags).
        self.strip_flags = {t: (True, True) for t in added}
        self.strip_flags.update(special_flags or {t: (False, False) for t in (names.UNK, names.BOS, names.EOS)})

    @classmethod
    def from_dir(cls, ckpt_dir) -> "SentencePieceOracle":
        """Load from a checkpoint directory: tokenizer.model, added_tokens.json, tokenizer_config.json and, if present,
        special_tokens_map.json. Raises TokenizerError when one is missing or does not fit NExT-Chat."""
        sp = load_sentencepiece(ckpt_dir)
        added = read_added_tokens(ckpt_dir, sp.get_piece_size())
        config = check_tokenizer_config(ckpt_dir)
        return cls(sp=sp, added=added, special_flags=special_token_flags(ckpt_dir, config))

    @property
    def vocab_size(self) -> int:
        """sentencepiece pieces + 5 added tokens."""
        return self.sp.get_piece_size() + len(self._added)

    @property
    def added_token_ids(self) -> dict[str, int]:
        """{token: id} for the five NExT-Chat tokens."""
        return dict(self._added)

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def token_to_id(self, tok: str) -> int:
        """Id of an added token or piece; 0 (<unk>) for an unknown piece, as 4.31's sp.piece_to_id."""
        return self._added[tok] if tok in self._added else self.sp.piece_to_id(tok)

    def id_to_token(self, i: int) -> str:
        """Piece or added-token string of id `i`. Raises TokenizerError when out of range."""
        if i in self._id_to_added:
            return self._id_to_added[i]
        if not 0 <= i < self.sp.get_piece_size():
            raise TokenizerError(f"token id {i} is out of range: expected 0 <= id < {self.vocab_size}.")
        return self.sp.id_to_piece(i)

    def tokenize_chunk(self, chunk: str) -> list[str]:
        """4.31 LlamaTokenizer._tokenize (legacy=False) of one chunk. Returns piece strings."""
        is_first = chunk.startswith(SPIECE_UNDERLINE)
        if is_first:
            chunk = chunk[1:]
        tokens = self.sp.encode(chunk, out_type=str)
        if not is_first and not chunk.startswith(" ") and tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
        return tokens

    def _trie_split(self, text: str) -> list[str]:
        """4.31 `Trie.split`: cut `text` at the leftmost-longest no-split tokens; no empty pieces. Returns pieces."""
        cuts, pos = [], 0
        while pos < len(text):
            hits = [t for t in self._no_split if text.startswith(t, pos)]
            if hits:
                end = pos + max(map(len, hits))
                cuts += [pos, end]
                pos = end
            else:
                pos += 1
        pieces, start = [], 0
        for end in cuts + [len(text)]:
            if end > start:
                pieces.append(text[start:end])
                start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """4.31 `LlamaTokenizer.tokenize` + `PreTrainedTokenizer.tokenize`: piece and added-token strings, no BOS."""
        return self.tokenize_segments([Segment(text, True)])

    def tokenize_segments(self, segments) -> list[str]:
        """`tokenize` of a prompt given as (text, control) segments: the trie cuts control text only; a plain
        segment is one piece whatever it holds, joined to the text pieces next to it. Returns piece strings."""
        runs: list[list] = []                                       # [text, control], neighbours of a kind joined
        for text, control in segments:
            if runs and runs[-1][1] == bool(control):
                runs[-1][0] += text
            else:
                runs.append([text, bool(control)])
        pieces: list[list] = [[SPIECE_UNDERLINE, False]]          # [text, is a no-split token]
        for text, control in runs:
            text = text.replace(SPIECE_UNDERLINE, " ")
            for piece in (self._trie_split(text) if control else [text]):
                token = control and piece in self._no_split
                if not token and not pieces[-1][1]:
                    pieces[-1][0] += piece
                else:
                    pieces.append([piece, token])
        for i, (piece, token) in enumerate(pieces):
            if token:
                lstrip, rstrip = self.strip_flags[piece]
                if rstrip and i + 1 < len(pieces) and not pieces[i + 1][1]:
                    pieces[i + 1][0] = pieces[i + 1][0].lstrip()
                if lstrip and i > 0 and not pieces[i - 1][1]:
                    pieces[i - 1][0] = pieces[i - 1][0].rstrip()
        out: list[str] = []
        for piece, token in pieces:
            if token:
                out.append(piece)
            elif piece:
                out += self.tokenize_chunk(piece)
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids: BOS, then the ids of `tokenize(text)`; no EOS."""
        return [self.bos_id] + [self.token_to_id(t) for t in self.tokenize(text)]

    def encode_segments(self, segments) -> list[int]:
        """Token ids of a prompt given as segments: BOS, then the ids of `tokenize_segments`; no EOS."""
        return [self.bos_id] + [self.token_to_id(t) for t in self.tokenize_segments(segments)]

    def _tokens_to_string(self, tokens: list[str]) -> str:
        """4.31 LlamaTokenizer.convert_tokens_to_string."""
        specials = (names.UNK, names.BOS, names.EOS)
        out, run, prev_special = "", [], False
        for i, tok in enumerate(tokens):
            if tok in specials:
                if not prev_special and i != 0:
                    out += " "
                out += self.sp.decode(run) + tok
                prev_special, run = True, []
            else:
                run.append(tok)
                prev_special = False
        return out + self.sp.decode(run)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """4.31 `decode`: added tokens as text joined by single spaces; skip_special_tokens drops <s> </s> <unk>."""
        special_ids = {self.sp.unk_id(), self.bos_id, self.eos_id}
        toks = [self.id_to_token(int(i)) for i in ids if not (skip_special_tokens and int(i) in special_ids)]
        sub_texts, run = [], []
        for tok in toks:
            if tok in self._added:
                if run:
                    sub_texts.append(self._tokens_to_string(run))
                    run = []
                sub_texts.append(tok)
            else:
                run.append(tok)
        if run:
            sub_texts.append(self._tokens_to_string(run))
        return " ".join(sub_texts)


# ---- a tiny tokenizer for tests ------------------------------------------------------------------------------
