"""Runtime tokenizer: NExT-Chat's transformers-4.31 slow LlamaTokenizer (legacy=False), without torch or sentencepiece.

Reads the `tokenizer.json` that `nxc.export.tokenizer_json` writes. The `tokenizers` BPE model in it encodes one
text chunk exactly as sentencepiece does (with its dummy "▁" prefix); everything 4.31 does around that is redone
here in Python (reference §3.3):

    text ──"▁"+text.replace("▁"," ")──> split on added tokens ──strip neighbours──> chunks
    chunk ──tokenizers BPE──> pieces ──legacy=False: drop the leading "▁" of a non-first chunk──> ids
    ids = [BOS] + ids of every chunk and added token, in order; no EOS

`encode_segments` takes a prompt as nxc.prompt segments: only control segments are split on added tokens; in plain
ones (what a user typed) `<at>`, `</s>`... stay characters. Text meeting at a segment boundary is one chunk, so a
prompt whose plain text holds no special string gets the ids `encode` gives the joined text.

Which tokens split the text, and whether they eat the whitespace next to them, is read from the JSON's
`added_tokens` list (`lstrip` / `rstrip`, `special`): the five NExT-Chat tokens strip both sides, the LLaMA specials
`<s>`, `</s>`, `<unk>` split and strip as the checkpoint's special_tokens_map.json made 4.31 do (not at all
for LLaMA's files).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from nxc import names
from nxc.tokens import SPIECE_UNDERLINE, Segment, TokenizerError


@dataclass(frozen=True)
class SplitToken:
    """A token matched literally in the text before sentencepiece runs.

    `lstrip`: the text chunk on its left is right-stripped; `rstrip`: the chunk on its right is left-stripped
    (4.31 semantics). `special`: dropped by `decode(skip_special_tokens=True)`.
    """
    content: str
    id: int
    lstrip: bool
    rstrip: bool
    special: bool


def split_on_added(text: str, added: dict[str, SplitToken], pattern: re.Pattern) -> list[str | SplitToken]:
    """Split `text` on added tokens (leftmost, longest) and strip the chunks next to them (4.31 `tokenize`).

    Returns text chunks (str, never empty) and SplitToken entries, in order.
    """
    return strip_around(_split(text, added, pattern))


def _split(text: str, added: dict[str, SplitToken], pattern: re.Pattern) -> list[str | SplitToken]:
    """Cut `text` at added tokens (leftmost, longest): text chunks (maybe empty) and tokens, alternating, str first
    and last."""
    parts: list[str | SplitToken] = []
    last = 0
    for m in pattern.finditer(text):
        parts += [text[last:m.start()], added[m.group(0)]]
        last = m.end()
    parts.append(text[last:])
    return parts


def strip_around(parts: list[str | SplitToken]) -> list[str | SplitToken]:
    """Strip the text chunks next to each token as its flags say (4.31); drop the empty chunks."""
    for i, part in enumerate(parts):
        if isinstance(part, SplitToken):
            # A neighbour is a text chunk, maybe empty (two adjacent tokens): stripping that is a no-op, as in 4.31.
            if part.rstrip and i + 1 < len(parts) and isinstance(parts[i + 1], str):
                parts[i + 1] = parts[i + 1].lstrip()
            if part.lstrip and i > 0 and isinstance(parts[i - 1], str):
                parts[i - 1] = parts[i - 1].rstrip()
    return [p for p in parts if not (isinstance(p, str) and not p)]


_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


def _utf8_len(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte announces; 0 when it cannot start one."""
    for n, mask, want in ((1, 0x80, 0x00), (2, 0xE0, 0xC0), (3, 0xF0, 0xE0), (4, 0xF8, 0xF0)):
        if lead & mask == want:
            return n
    return 0


def sp_decode_bytes(data: bytes) -> str:
    """sentencepiece's decoding of a run of byte pieces: valid UTF-8 characters as they are, and one U+FFFD for
    each byte that does not start a valid character (Python's errors="replace" groups bytes differently)."""
    out, i = [], 0
    while i < len(data):
        n = _utf8_len(data[i])
        if n and i + n <= len(data):
            try:
                out.append(data[i:i + n].decode("utf-8"))
                i += n
                continue
            except UnicodeDecodeError:
                pass
        out.append("\ufffd")
        i += 1
    return "".join(out)


def sp_decode_pieces(pieces: list[str]) -> str:
    """`SentencePieceProcessor.decode` of in-vocabulary pieces (no control or unknown ones). Returns the text.

    "▁" becomes " "; byte pieces `<0xNN>` are gathered and decoded by `sp_decode_bytes`; only the first piece loses
    its leading "▁" (the dummy prefix), and only if it is not a byte piece. The `tokenizers` decoder in the JSON
    differs on invalid UTF-8 and on a leading <0x20>, so the runtime decodes with this instead.
    """
    out, buf = [], bytearray()
    for k, piece in enumerate(pieces):
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            buf.append(int(m.group(1), 16))
            continue
        if buf:
            out.append(sp_decode_bytes(bytes(buf)))
            buf.clear()
        if k == 0 and piece.startswith(SPIECE_UNDERLINE):
            piece = piece[1:]
        out.append(piece.replace(SPIECE_UNDERLINE, " "))
    if buf:
        out.append(sp_decode_bytes(bytes(buf)))
    return "".join(out)


def added_token_pattern(contents) -> re.Pattern:
    """A regex matching any of `contents`, longest first so that the leftmost match is also the longest."""
    return re.compile("|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)))


def _check_added(added: list[SplitToken], source: str) -> None:
    """Raise TokenizerError unless `added` declares the 4.31 behaviour of every token the runtime splits on."""
    by_content = {a.content: a for a in added}
    want = {t: (True, True, False) for t in names.ADDED_TOKENS}          # strip both sides, not special
    specials = (names.UNK, names.BOS, names.EOS)                         # special; stripping as 4.31 had it
    missing = [t for t in (*want, *specials) if t not in by_content]
    if missing:
        raise TokenizerError(
            f"{source}: the added_tokens list lacks {missing}; expected all of {[*want, *specials]}. "
            "Without them the image, <at> and <boxes> slots (or </s> between turns) would be tokenized as plain "
            "text. Re-export tokenizer.json with `nxc.export.tokenizer_json` from a checkpoint whose "
            "added_tokens.json has them.")
    flags = {t: (by_content[t].lstrip, by_content[t].rstrip, by_content[t].special) for t in (*want, *specials)}
    wrong = {t: f for t, f in flags.items() if (f != want[t] if t in want else not f[2])}
    if wrong:
        raise TokenizerError(
            f"{source}: added tokens with unexpected (lstrip, rstrip, special) flags {wrong}; expected {want} "
            f"and special=True for {list(specials)}. "
            "This file was not written by `nxc.export.tokenizer_json` and would not tokenize as NExT-Chat's "
            "transformers 4.31 tokenizer does; re-export it.")


class Tokenizer:
    """Encode / decode NExT-Chat prompts; ids match transformers 4.31 `LlamaTokenizer(legacy=False)`."""

    def __init__(self, *, hf: _HFTokenizer, added: list[SplitToken], source: str):
        self._hf = hf
        self._source = source
        self._added = {t.content: t for t in added}
        self._added_by_id = {t.id: t for t in added}
        self._pattern = added_token_pattern(self._added)
        for tok in (names.UNK, names.BOS, names.EOS):
            if self._hf.token_to_id(tok) is None:
                raise TokenizerError(
                    f"{source}: the vocabulary has no {tok!r}; expected the LLaMA specials <unk>=0, <s>=1, </s>=2. "
                    "Re-export tokenizer.json from the checkpoint with `nxc.export.tokenizer_json`.")
        self.unk_id = self._hf.token_to_id(names.UNK)
        self.bos_id = self._hf.token_to_id(names.BOS)
        self.eos_id = self._hf.token_to_id(names.EOS)
        self._special_ids = {t.id for t in added if t.special} | {self.unk_id, self.bos_id, self.eos_id}

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """Load a `tokenizer.json` written by `nxc.export.tokenizer_json`. Returns a Tokenizer."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TokenizerError(
                f"tokenizer file not found: {path}. Expected the tokenizer.json written by the export step "
                "(`nxc.export.tokenizer_json.write_tokenizer_json`); export it or pass the right path.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read tokenizer file {path}: {e}. Expected a UTF-8 JSON file.") from None
        return cls.from_str(text, source=str(path))

    @classmethod
    def from_str(cls, s: str, *, source: str = "<string>") -> "Tokenizer":
        """Build from the JSON text of a `tokenizer.json`. Returns a Tokenizer."""
        try:
            spec = json.loads(s)
            hf = _HFTokenizer.from_str(s)
        except Exception as e:  # json.JSONDecodeError or the tokenizers parser's own exception
            raise TokenizerError(
                f"{source}: not a valid tokenizers JSON ({type(e).__name__}: {e}). "
                "Expected the tokenizer.json written by `nxc.export.tokenizer_json`; re-export it.") from None
        if not isinstance(spec, dict) or spec.get("model", {}).get("type") != "BPE":
            raise TokenizerError(f"{source}: expected a BPE tokenizers JSON (model.type == 'BPE'); re-export it.")
        added = [SplitToken(content=t["content"], id=int(t["id"]), lstrip=bool(t.get("lstrip")),
                            rstrip=bool(t.get("rstrip")), special=bool(t.get("special")))
                 for t in spec.get("added_tokens", [])]
        _check_added(added, source)
        return cls(hf=hf, added=added, source=source)

    # ---- vocabulary ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Base sentencepiece pieces + added tokens (32005 for NExT-Chat)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def added_token_ids(self) -> dict[str, int]:
        """{token: id} for the five NExT-Chat tokens, in names.ADDED_TOKENS order."""
        return {t: self._added[t].id for t in names.ADDED_TOKENS}

    def token_to_id(self, tok: str) -> int:
        """Id of a piece or added token; the unk id (0) when it is not in the vocabulary (as sp.piece_to_id)."""
        if tok in self._added:
            return self._added[tok].id
        i = self._hf.token_to_id(tok)
        return self.unk_id if i is None else i

    def id_to_token(self, i: int) -> str:
        """The piece or added token string of id `i`. Raises TokenizerError when out of range."""
        tok = self._hf.id_to_token(int(i)) if 0 <= int(i) < self.vocab_size else None
        if tok is None:
            raise TokenizerError(f"token id {i} is out of range: expected 0 <= id < {self.vocab_size}.")
        return tok

    # ---- encode --------------------------------------------------------------------------------------------
    def _encode_chunk(self, chunk: str) -> list[int]:
        """4.31 `_tokenize` + `convert_tokens_to_ids` for one text chunk (legacy=False). Returns ids."""
        is_first = chunk.startswith(SPIECE_UNDERLINE)
        if is_first:
            chunk = chunk[1:]
        if not chunk:
            return []
        # The BPE model alone (normalizer + model): `Tokenizer.encode` would also match added tokens in the chunk,
        # and a plain segment's chunk may hold their strings as text (its `encode_special_tokens` spares only
        # special=True ones, not the five NExT-Chat tokens).
        norm = self._hf.normalizer
        enc = self._hf.model.tokenize(norm.normalize_str(chunk) if norm is not None else chunk)
        ids, pieces = [t.id for t in enc], [t.value for t in enc]
        if not is_first and not chunk.startswith(" ") and pieces and pieces[0].startswith(SPIECE_UNDERLINE):
            # The chunk follows an added token: sentencepiece's dummy prefix is wrong here. 4.31 strips it from the
            # piece and looks the rest up, which gives <unk> when the stripped piece is not in the vocabulary.
            rest = pieces[0][1:]
            ids = ([self.token_to_id(rest)] if rest else []) + ids[1:]
        return ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text` as NExT-Chat's tokenizer gives them: BOS first (unless add_bos=False), no EOS."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}.")
        return self.encode_segments([Segment(text, True)], add_bos=add_bos)

    def encode_segments(self, segments, add_bos: bool = True) -> list[int]:
        """Token ids of a prompt given as (text, control) segments (nxc.prompt.render_segments): BOS first (unless
        add_bos=False), no EOS. Added-token strings become their ids in control segments only; in plain ones they
        are text. Text chunks run across segment boundaries, as if the text were one string; all-control segments
        give `encode` of their joined text."""
        runs: list[list] = []                            # neighbours of the same kind joined: [text, control]
        for text, control in segments:
            if not isinstance(text, str):
                raise TokenizerError(f"a segment's text must be a str, got {type(text).__name__}.")
            if runs and runs[-1][1] == bool(control):
                runs[-1][0] += text
            else:
                runs.append([text, bool(control)])
        parts: list[str | SplitToken] = [SPIECE_UNDERLINE]
        for text, control in runs:
            text = text.replace(SPIECE_UNDERLINE, " ")
            for part in (_split(text, self._added, self._pattern) if control else [text]):
                if isinstance(part, str) and isinstance(parts[-1], str):
                    parts[-1] += part
                else:
                    parts.append(part)
        ids = [self.bos_id] if add_bos else []
        for part in strip_around(parts):
            ids += [part.id] if isinstance(part, SplitToken) else self._encode_chunk(part)
        return ids

    # ---- decode --------------------------------------------------------------------------------------------
    def _decode_pieces(self, ids: list[int]) -> str:
        """sentencepiece `decode` of a run of base pieces. Returns the text (see `sp_decode_pieces`)."""
        return sp_decode_pieces([self._hf.id_to_token(i) for i in ids])

    def _pieces_to_string(self, ids: list[int]) -> str:
        """4.31 LlamaTokenizer.convert_tokens_to_string: specials verbatim, runs of pieces through sp decode."""
        out, run, prev_special = "", [], False
        for i, t in enumerate(ids):
            if t in self._special_ids:
                if not prev_special and i != 0:
                    out += " "
                out += self._decode_pieces(run) + self.id_to_token(t)
                prev_special, run = True, []
            else:
                run.append(t)
                prev_special = False
        return out + self._decode_pieces(run)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` as 4.31 `decode` gives it: added tokens as text, joined to the rest by single spaces.

        skip_special_tokens drops <s>, </s> and <unk> (all of 4.31's special ids). No clean-up of spaces.
        """
        ids = [int(i) for i in ids]
        for i in ids:
            self.id_to_token(i)  # range check
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        sub_texts, run = [], []
        for i in ids:
            tok = self._added_by_id.get(i)
            if tok is not None and not tok.special:  # 4.31's added_tokens_encoder: the five NExT-Chat tokens
                if run:
                    sub_texts.append(self._pieces_to_string(run))
                    run = []
                sub_texts.append(tok.content)
            else:
                run.append(i)
        if run:
            sub_texts.append(self._pieces_to_string(run))
        return " ".join(sub_texts)
