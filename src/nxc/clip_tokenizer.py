r"""CLIP's tokenizer without torch, numpy or transformers: the ids of transformers' `CLIPTokenizer` from the same
folder, `tok(text, padding="max_length", truncation=True, max_length=L).input_ids` (tests/test_clip_tokenizer.py).

It matches the installed transformers (5.x), whose CLIPTokenizer is the `tokenizers` backend (no ftfy and no
BasicTokenizer, so control characters are kept): (1) special tokens (bos, eos, unk, pad, tokenizer_config's
added_tokens_decoder) are cut out of the raw text, leftmost-longest, or of the normalized text for one marked
"normalized": true; (2) the rest is NFC-normalized, each run of Unicode White_Space becomes " ", and each character
is lowercased on its own (a final "Σ" gives "σ", not str.lower's "ς"); (3) it is split by CLIP's pattern
`<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`, case-sensitive as the
backend runs it, by a scanner that reads \p{L} / \p{N} from unicodedata.category (stdlib `re` has no \p{..}) and
takes \s as White_Space (Python's \s would add U+001C..U+001F); ByteLevel's GPT-2 split, which follows, only cuts
the two special-token pieces, into "<|", "startoftext" / "endoftext", "|>"; (4) each piece's UTF-8 bytes go
through GPT-2's bytes_to_unicode, then CLIP BPE ("</w>" on the last symbol, the lowest-ranked merges.txt pair merged
until none is left, one unk id per symbol outside vocab.json); (5) bos + ids[:L - 2] + eos, pad ids up to L.
As in transformers, pad defaults to "<|endoftext|>", not to eos, and a special token missing from vocab.json gets
id len(vocab) + k (k counting bos, eos, unk, pad). Known differences: a character unassigned in Python's Unicode
database but assigned in the backend's newer tables is punctuation here, and lowercasing / NFC follow Python's
tables (all assigned code points agree with transformers 5.25, checked exhaustively); model_max_length absent or
not a sane int (transformers' 1e30 "no limit") gives 77.
"""
from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

_WS = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                + "".join(map(chr, range(0x2000, 0x200b))))
_SPACES = re.compile("[" + re.escape("".join(sorted(_WS))) + "]+")
_LEAD = re.compile(r"<\|(startoftext|endoftext)\|>|'(?:s|t|re|ve|m|ll|d)")  # the pattern's first alternatives
_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": "<|endoftext|>"}  # CLIPTokenizer.__init__'s, in the order new ids are given
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_OTHERS = [b for b in range(256) if b not in _PRINTABLE]
_BYTE_CHARS = [chr(b) if b in _PRINTABLE else chr(256 + _OTHERS.index(b)) for b in range(256)]  # GPT-2's table


@lru_cache(maxsize=4096)
def _kind(c: str) -> str:
    """" " for White_Space, "L" for a letter, "N" for a number, "P" for anything else."""
    if c in _WS:
        return " "
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def _pieces(text: str) -> list[str]:
    """CLIP's pre-tokenizer split (step 3 above) of normalized text; whitespace is dropped."""
    kinds, out, i = [_kind(c) for c in text], [], 0
    while i < len(text):
        j = m.end() if (m := _LEAD.match(text, i)) else i + 1
        while not m and kinds[i] in "LP" and j < len(text) and kinds[j] == kinds[i]:
            j += 1
        # ByteLevel's GPT-2 split then cuts "<|endoftext|>" into "<|", "endoftext", "|>" (and nothing else)
        out += ["<|", m[1], "|>"] if m and m[1] else [text[i:j]] if kinds[i] != " " or m else []
        i = j
    return out


def _normalize(text: str) -> str:
    return "".join(c.lower() for c in _SPACES.sub(" ", unicodedata.normalize("NFC", text)))


def _token(value) -> tuple[str, bool]:
    """(content, normalized) of a tokenizer_config token: a string or an AddedToken dict."""
    return (value["content"], bool(value.get("normalized", False))) if isinstance(value, dict) else (str(value), False)


def _splitter(tokens: list[str]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))) if tokens else None


def _read(folder: Path, name: str, parse, *, optional: bool = False):
    """parse(text of folder/name); a missing or unparseable file is a one-line ValueError naming both."""
    try:
        return parse((folder / name).read_text(encoding="utf-8")) if not optional or (folder / name).is_file() else {}
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: {name} is missing or unreadable ({e})".replace("\n", " ")) from None


def _vocab(text: str) -> dict[str, int]:
    vocab = json.loads(text)
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
        raise ValueError("not a JSON object of token -> id")
    return vocab


def _merges(text: str, vocab: dict[str, int]) -> list[tuple[str, str]]:
    lines = [ln.rstrip("\r") for ln in text.split("\n") if ln.strip() and not ln.startswith("#version")]
    merges = [tuple(ln.split(" ")) for ln in lines]
    if bad := next((ln for ln, m in zip(lines, merges) if len(m) != 2 or not {*m, "".join(m)} <= vocab.keys()), None):
        raise ValueError(f"{bad!r} is not two vocab.json tokens that join into a third")
    return merges


class ClipTokenizer:
    """transformers' CLIPTokenizer encoding (see the module docstring), standard library only."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], config: dict):
        self.vocab, self.ranks = vocab, {pair: rank for rank, pair in enumerate(merges)}
        ml = config.get("model_max_length")
        self.max_length: int = ml if type(ml) is int and 2 <= ml <= 1 << 20 else 77
        named = [_token(config.get(k) or default) for k, default in _DEFAULTS.items()]  # bos, eos, unk, pad
        added = [(vocab.get(_token(v)[0], int(i)), *_token(v))
                 for i, v in (config.get("added_tokens_decoder") or {}).items()]
        self.specials: dict[str, int] = {}  # special token -> id
        normalized = {content for _, content, norm in added + [(0, *t) for t in named] if norm}
        for tid, content, _ in added + [(None, *t) for t in named]:
            new = len(vocab) + sum(t not in vocab for t in self.specials)
            self.specials.setdefault(content, vocab.get(content, new) if tid is None else tid)
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (self.specials[content] for content, _ in named)
        self._unk_in_vocab = named[2][0] in vocab
        self._raw = _splitter([t for t in self.specials if t not in normalized])
        self._normalized = _splitter([t for t in self.specials if t in normalized])
        self._bpe = lru_cache(maxsize=16384)(self._bpe_word)

    @classmethod
    def from_folder(cls, folder) -> "ClipTokenizer":
        folder = Path(folder)
        vocab = _read(folder, "vocab.json", _vocab)
        return cls(vocab, _read(folder, "merges.txt", lambda text: _merges(text, vocab)),
                   _read(folder, "tokenizer_config.json", json.loads, optional=True))

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """CLIP BPE of one byte-mapped piece -> its token ids."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            rank, i = min((self.ranks.get(pair, 1 << 62), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == 1 << 62:
                break
            first, second, merged, i = parts[i], parts[i + 1], [], 0
            while i < len(parts):
                pair = i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second
                merged.append(first + second if pair else parts[i])
                i += 2 if pair else 1
            parts = merged
        if not self._unk_in_vocab and any(p not in self.vocab for p in parts):
            raise ValueError(f"{word!r} has a symbol outside vocab.json, and so is the unk token")
        return tuple(self.vocab.get(p, self.unk_id) for p in parts)

    def _split(self, text: str, pattern: re.Pattern | None):
        """The stretches of `text` (str) around the special tokens `pattern` finds (their ids, int)."""
        at = 0
        for m in pattern.finditer(text) if pattern else ():
            yield from [text[at:m.start()], self.specials[m[0]]] if m.start() > at else [self.specials[m[0]]]
            at = m.end()
        if at < len(text):
            yield text[at:]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """ids exactly as transformers' CLIPTokenizer(padding="max_length", truncation=True, max_length=L)(text)
        .input_ids: bos, BPE ids (truncated to L - 2), eos, then pad ids up to L. L = max_length or self.max_length."""
        length = max_length or self.max_length
        ids: list[int] = []
        for raw in self._split(text, self._raw):
            for part in [raw] if isinstance(raw, int) else self._split(_normalize(raw), self._normalized):
                if isinstance(part, int):
                    ids.append(part)
                    continue
                for piece in _pieces(part):
                    ids += self._bpe("".join(_BYTE_CHARS[b] for b in piece.encode("utf-8")))
        ids = [self.bos_id, *ids[:max(length - 2, 0)], self.eos_id]
        return ids + [self.pad_id] * (length - len(ids))
