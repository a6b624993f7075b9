"""Tokenizer contracts shared by the reference tokenizer (nxc.model.sp_tokenizer, the oracle) and the runtime
tokenizer (nxc.runtime.tokenizer), so that neither side imports the other. Torch-free, no tokenizer library."""
from typing import NamedTuple

SPIECE_UNDERLINE = "\u2581"     # sentencepiece's word-boundary mark


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or inconsistent; the message says what was expected and found."""


class Segment(NamedTuple):
    """A piece of a rendered prompt. `control`: the template's own text (system prompt, roles, separators, the image
    span, `<at> <boxes>` slots), where special-token strings become their ids; otherwise plain text (what a user
    typed, an earlier reply's words), where they are only characters. Built by nxc.prompt, encoded by both
    tokenizers' `encode_segments`."""
    text: str
    control: bool
