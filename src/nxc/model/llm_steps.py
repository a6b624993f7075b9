"""The LLaMA calls every reference family makes (NExT-Chat, retrieval, NExT-GPT): a model with `self.llm`, a
transformers LlamaForCausalLM, mixes this in."""
from __future__ import annotations

import torch


class LlmSteps:
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.model.embed_tokens(ids)

    def llm_step(self, inputs_embeds: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over [1,T,H] embeddings, extending `cache` (a DynamicCache) in place.

        Returns last-position logits [1,V] and last-position hidden [1,H] after the final RMSNorm
        (`hidden_states[-1]` of reference §1.3, the tensor that feeds lm_head).
        """
        out = self.llm.model(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
        return self.llm.lm_head(hidden), hidden
