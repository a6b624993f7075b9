"""NExT-GPT's output projector: the signal tokens' LLM hiddens -> a diffusion generator's conditioning.

    hidden [B,N,H]  (last layer, after the final norm, at each signal token's position)
      + embeds [B,N,H]  (those tokens' input embedding rows)
      ─ fc: Linear(H, d) ─▶ x [B,N,d] ──▶ tfm: nn.Transformer encoder (pre-norm, no positional encoding)
                                                     │ memory
      query_embs [1,Q,d] (learned, repeated per row) ─▶ tfm decoder ─▶ [B,Q,d] ─ model: Linear(d, D) ─▶ [B,Q,D]
    NExT-GPT image: H 4096, d 512, 4 heads, 4 + 4 layers, feed-forward 2048, Q 77, D 768 (SD-1.5's prompt_embeds)

Read from NExT-GPT/NExT-GPT (reference data, not copied): the original `code/model/layers.py`, class `TextFcLayer`,
mode "transformer", built once per image output as `gen_text_hidden_fcs[0]` of `NextGPTModel`
(`code/model/anyToImageVideoAudio.py`), and the rewrite's `TransformersProjector`
(`nextgpt/model/multimodal_projector/projector.py`, the model's `mm_output_img_projector`):

- modules and state-dict names: original `fc` (Linear in -> 512), `tfm` (`nn.Transformer(batch_first=True,
  norm_first=True, d_model=512, num_encoder_layers=4, num_decoder_layers=4, dim_feedforward=512 * 4,
  dropout=0.0, nhead=4)`, its own names below it: `tfm.encoder.layers.{i}.self_attn.in_proj_weight`, ...,
  `tfm.encoder.norm`, `tfm.decoder.layers.{i}.multihead_attn...`, `tfm.decoder.norm`), `model` (Linear 512 -> out)
  and `query_embs`. The rewrite names the two Linears `in_fc` and `out_fc`, the rest alike. This module keeps the
  original's names; `original_state_dict` maps either checkpoint onto them.
- the queries: `nn.Parameter(torch.randn(1, num_output_tokens, 512))` (standard normal; the rewrite then sets them
  to zero with `normal_(std=0.0)`), repeated over the batch: `tfm(x, query_embs.repeat(B, 1, 1))`, encoder fed x,
  decoder fed the queries, no masks.
- the input embeddings are ADDED, not concatenated: `x = x + input_embs` before `fc`. nn.Transformer has no
  positional encoding, so the projector sees the N signal tokens as a set: order reaches it only through what
  differs per token (its hidden, and the [IMG0]..[IMG3] embedding row added to it).
- which hiddens: training takes `outputs.hidden_states[idx][b, s:e+1]` (idx from `text_emb_to_img_layers`, -1 in
  its config) at the positions where the targets (aligned with the inputs) hold [IMG0]..[IMG3]: the last layer's
  output, after LLaMA's final norm, AT each signal token's position. nxc takes the same: the `hidden` output of the
  llm step that FED each signal token, plus that token's embedding row. DESIGN 5 notes that the original's inference
  reads its hiddens one position earlier than training did (the step that PRODUCED the token); nxc does not copy
  that. (Read here: the original's `generate_tokens_embeddings` re-runs the whole sequence each step without a
  cache and slices `generated_embeddings[-1][:, prompt_len:]` by generated-token index, and the rewrite concatenates
  generate()'s `hidden_states[1:]`, both of which index the step fed each token; where the shift enters was not
  traced further.)
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from nxc.config import ProjectorSizes

# the rewrite's names -> the original's (the two Linears); everything else is named alike
REWRITE_NAMES = {"in_fc.": "fc.", "out_fc.": "model."}
# where the projector sits in each checkpoint: the original's NextGPTModel and the rewrite's NextGPTLlamaModel
CHECKPOINT_PREFIXES = ("gen_text_hidden_fcs.0.", "model.mm_output_img_projector.", "mm_output_img_projector.")


class OutputProjector(nn.Module):
    """NExT-GPT's `TextFcLayer` (mode "transformer") at `sizes`, with the original's parameter names.

    forward(hidden [B,N,H], embeds [B,N,H]) -> conditioning [B,Q,D]: float, any batch B; N = sizes.num_signal_tokens
    (the graph fixes it; the module itself takes any N >= 1)."""

    def __init__(self, sizes: ProjectorSizes):
        super().__init__()
        self.sizes = sizes
        self.fc = nn.Linear(sizes.llm_hidden, sizes.d_model)
        with warnings.catch_warnings():      # "enable_nested_tensor is True, but ... norm_first was True": harmless
            warnings.simplefilter("ignore", UserWarning)
            self.tfm = nn.Transformer(d_model=sizes.d_model, nhead=sizes.nhead,
                                      num_encoder_layers=sizes.encoder_layers, num_decoder_layers=sizes.decoder_layers,
                                      dim_feedforward=sizes.dim_feedforward, dropout=0.0, batch_first=True,
                                      norm_first=True)
        self.model = nn.Linear(sizes.d_model, sizes.out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, sizes.num_queries, sizes.d_model))

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        if hidden.shape != embeds.shape or hidden.shape[-1] != self.sizes.llm_hidden:
            raise ValueError(f"hidden {tuple(hidden.shape)} and embeds {tuple(embeds.shape)} must both be "
                             f"[batch, signal tokens, {self.sizes.llm_hidden}]")
        x = self.fc(hidden + embeds)
        x = self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1))
        return self.model(x)


def original_state_dict(state_dict: dict, *, prefix: str | None = None) -> dict:
    """The projector's tensors out of a NExT-GPT checkpoint's state dict, under this module's names.

    `prefix`: where the projector sits (default: the first of CHECKPOINT_PREFIXES present, or "" when the dict is
    the projector's own, with `query_embs` at the top). The rewrite's `in_fc` / `out_fc` become `fc` / `model`."""
    if prefix is None:
        found = [p for p in CHECKPOINT_PREFIXES if p + "query_embs" in state_dict]
        if not found and "query_embs" not in state_dict:
            raise KeyError(f"no output projector in the state dict: expected its query_embs under one of "
                           f"{', '.join(CHECKPOINT_PREFIXES)} or at the top (else pass prefix=)")
        prefix = found[0] if found else ""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        for old, new in REWRITE_NAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    if not out:
        raise KeyError(f"no tensor under {prefix!r} in the state dict; expected the output projector under one of "
                       f"{', '.join(CHECKPOINT_PREFIXES)} (or pass prefix=)")
    return out


def load_original(sizes: ProjectorSizes, state_dict: dict, *, prefix: str | None = None) -> OutputProjector:
    """An OutputProjector holding a NExT-GPT checkpoint's projector weights (strict: every name, every shape)."""
    module = OutputProjector(sizes)
    module.load_state_dict(original_state_dict(state_dict, prefix=prefix), strict=True)
    return module.eval()
