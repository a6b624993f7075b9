"""Tokenizer contracts shared by the reference tokenizer (nxc.model.sp_tokenizer, the oracle) and the runtime
tokenizer (nxc.runtime.tokenizer), so that neither side imports the other. Torch-free, no tokenizer library."""

SPIECE_UNDERLINE = "\u2581"     # sentencepiece's word-boundary mark


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or inconsistent; the message says what was expected and found."""
