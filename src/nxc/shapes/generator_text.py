"""The shapes generator's caption conditioning: a CLIPTokenizer whose every caption word is one token, and a tiny
CLIPTextModel, both in transformers' own classes and files (what a diffusers text-to-image folder holds).

The tokenizer is nxc.model.generator's tiny one (GPT-2 / CLIP byte symbols, each a token, "</w>" ending a word) plus
BPE merges that join each caption word ("red", "triangle", "and") into one token, so a 3-object caption
("a red circle, a blue square and a green star") is 13 tokens with <|startoftext|> and <|endoftext|>, and the
conditioning is [B, L, D] with L = 16 (padded with <|endoftext|>, as SD's tokenizer pads).
"""
from __future__ import annotations

import json
from pathlib import Path

from nxc.model.generator import _byte_chars
from nxc.shapes.generator_data import caption_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word (its last symbol carries "</w>"), as transformers' CLIPTokenizer.bpe does it."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == rank)
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (a, b):
                merged.append(a + b)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges (in rank order) after which each of `words` is a single BPE token: each word's pieces, as the merges
    so far leave them, are joined left to right by new merges, until no word is split (a later word's merges can
    split an earlier one, hence the loop)."""
    merges: list[tuple[str, str]] = []
    for _ in range(len(words) + 1):
        ranks = {m: i for i, m in enumerate(merges)}
        split = [w for w in words if len(_bpe(w, ranks)) > 1]
        if not split:
            return merges
        for w in split:
            parts = _bpe(w, {m: i for i, m in enumerate(merges)})
            for nxt in parts[1:]:
                if (parts[0], nxt) not in merges:
                    merges.append((parts[0], nxt))
                parts = [parts[0] + nxt]
    raise RuntimeError(f"no merges make each of {words} one token")


def write_caption_tokenizer(out: str | Path, *, context_length: int = 16, words: list[str] | None = None) -> Path:
    """A CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json) at `out`: byte symbols, `words` (the
    shapes caption words by default) one token each, <|startoftext|> / <|endoftext|>, max length context_length."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    merges = word_merges(words or caption_words())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab |= {BOS: len(vocab), EOS: len(vocab) + 1}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": BOS,
         "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}))
    return out


def make_text_encoder(tokenizer, *, width: int, layers: int, context_length: int, heads: int = 4):
    """A random CLIPTextModel over `tokenizer`'s vocabulary: `layers` layers of `width`, positions context_length."""
    from transformers import CLIPTextConfig, CLIPTextModel
    bos, eos = tokenizer.convert_tokens_to_ids([BOS, EOS])
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=context_length,
                         projection_dim=width, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return CLIPTextModel(cfg)


def encode_captions(text, tokenizer, captions: list[str], context_length: int):
    """[B, L, D] float32: the text encoder's last hidden state of each caption, padded to L = context_length as
    diffusers' StableDiffusionPipeline.encode_prompt pads (and nxc.model.generator.unconditional_conditioning)."""
    ids = tokenizer(captions, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt")
    return text(ids.input_ids)[0]
