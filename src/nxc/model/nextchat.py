"""The PyTorch reference NExT-Chat (reference §1): CLIP tower, projector, LLaMA, location heads, SAM.

Runs in float32 (the official demo runs bf16; fp32 is the accuracy reference every exported graph is
compared with). All sizes come from `NextChatConfig`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from nxc.config import LlamaSizes, NextChatConfig, VisionSizes
from nxc.model.llm_steps import LlmSteps
from nxc.model.region import RegionEncoder
from nxc.model.sam import build_sam, nextchat_sam_decode, upsample_mask_logits


def llama_config(sizes: LlamaSizes) -> LlamaConfig:
    cfg = LlamaConfig(
        hidden_size=sizes.hidden_size, intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers, num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads, vocab_size=sizes.vocab_size, rms_norm_eps=sizes.rms_norm_eps,
        rope_theta=sizes.rope_theta, max_position_embeddings=sizes.max_position_embeddings,
        hidden_act="silu", tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return cfg


def clip_config(sizes: VisionSizes) -> CLIPVisionConfig:
    cfg = CLIPVisionConfig(
        hidden_size=sizes.hidden_size, intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers, num_attention_heads=sizes.num_heads, image_size=sizes.image_size,
        patch_size=sizes.patch_size, layer_norm_eps=sizes.layer_norm_eps, hidden_act=sizes.hidden_act,
        projection_dim=sizes.hidden_size)
    cfg._attn_implementation = "eager"
    return cfg


def vision_sizes_from_clip(cfg: CLIPVisionConfig) -> VisionSizes:
    return VisionSizes(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                       image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
                       hidden_act=cfg.hidden_act)


def mlp2(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear, ReLU, Linear: the shape of loc_encoder, loc_decoder and seg_prompt_mlp."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


def build_projector(d_in: int, d_out: int, depth: int) -> nn.Sequential:
    """mm_projector: depth <= 1 is one Linear; depth d is Linear then (GELU, Linear) x (d-1) (reference §1.2)."""
    layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*layers)


class NextChat(nn.Module, LlmSteps):
    """NExT-Chat for inference. Submodule names map 1:1 to official keys (see `checkpoint.official_key`)."""

    def __init__(self, *, config: NextChatConfig, llm_device: str | None = None, parts_device: str | None = None):
        """llm_device="meta": the LLaMA has names and shapes but no storage (the export writes its graph from the
        checkpoint one tensor at a time, nxc.export.llm_writer); parts_device="meta": likewise the other modules,
        made real per graph by nxc.model.parts.LazyParts."""
        super().__init__()
        self.config = config
        h = config.llm.hidden_size
        with torch.device(parts_device) if parts_device else contextlib.nullcontext():
            self.vision_tower = CLIPVisionModel(clip_config(config.vision))
            self.mm_projector = build_projector(config.mm_hidden_size, h, config.mm_depth)
        with torch.device(llm_device) if llm_device else contextlib.nullcontext():
            self.llm = LlamaForCausalLM(llama_config(config.llm))
        with torch.device(parts_device) if parts_device else contextlib.nullcontext():
            self.loc_encoder = mlp2(4, h // 2, h)
            self.loc_decoder = mlp2(h, h // 2, 4)
            self.seg_prompt_mlp = mlp2(h, h, 4 * config.sam.prompt_embed_dim)
            self.sam = build_sam(config.sam)
            if config.region_encoder:
                v = config.vision
                self.region_encoder = RegionEncoder(config.mm_hidden_size, h, grid=v.image_size // v.patch_size,
                                                    image_size=v.image_size)

    # -- vision --------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,R,R] CLIP-normalised -> [B,N,H]: hidden layer `mm_vision_select_layer`, CLS dropped, projected."""
        return self.encode_image_parts(pixel_values)[0]

    def encode_image_parts(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encode_image's rows [B,N,H], the tower's patch features before the projector [B,N,Dv]: what the
        region extractor pools)."""
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.config.mm_vision_select_layer][:, 1:]
        return self.mm_projector(feats), feats

    def slot_rows(self, boxes: torch.Tensor, is_region=None, patch_features: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """boxes [K,4] -> the `<boxes>` slots' input rows [K,H]: loc_encoder(box); with a region extractor, a user's
        region (is_region[k]) takes region_encoder(patch features [N,Dv], box) instead."""
        rows = self.loc_encoder(boxes)
        if getattr(self, "region_encoder", None) is None or is_region is None or not any(is_region):
            return rows
        if patch_features is None:
            raise ValueError("a region-extractor model's user regions need the image's patch features")
        keep = torch.as_tensor(list(is_region), dtype=torch.bool)
        return torch.where(keep[:, None], self.region_encoder(patch_features, boxes), rows)

    # -- location heads ------------------------------------------------------------------------------
    def loc_feedback(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [K,H] -> (box [K,4] normalised xyxy in the padded square, unclamped; embed [K,H])."""
        box = self.loc_decoder(hidden)
        return box, self.loc_encoder(box)

    def seg_prompt(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [K,H] -> [K,4,C] SAM prompt tokens."""
        return self.seg_prompt_mlp(hidden).view(hidden.shape[0], 4, self.config.sam.prompt_embed_dim)

    # -- SAM -----------------------------------------------------------------------------------------
    def sam_image_embedding(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """[1,3,S,S] SAM-normalised, centre-padded -> [1,C,S/16,S/16]."""
        return self.sam.image_encoder(sam_pixels)

    def sam_masks(self, image_embedding: torch.Tensor, boxes: torch.Tensor,
                  hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for K detections (reference §1.7).

        boxes: [K,4] normalised xyxy in the padded square; hidden: [K,H] trigger hiddens.
        Returns (low-res logits [K,1,4g,4g], iou [K,1], logits [K,1,S,S] float32 in SAM's padded frame).
        """
        s = self.config.sam.image_size
        low_res, iou = nextchat_sam_decode(self.sam, image_embedding, boxes * s, self.seg_prompt(hidden))
        return low_res, iou, upsample_mask_logits(low_res, s)
