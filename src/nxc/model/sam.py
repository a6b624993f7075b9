"""SAM built from the segment_anything package's modules, and NExT-Chat's custom SAM call (reference §1.7).

Sizes come from `SamSizes`, so tiny SAMs exist for tests. `infer_sam_sizes` recovers the sizes from a
state dict, because official NExT-Chat checkpoints do not record them (reference §6.5).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from nxc.config import ConfigError, SamSizes

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def build_sam(sizes: SamSizes) -> Sam:
    """A SAM with the architecture of Meta's `_build_sam`, at the given sizes."""
    grid = sizes.embedding_size
    image_encoder = ImageEncoderViT(
        depth=sizes.encoder_depth, embed_dim=sizes.encoder_embed_dim, img_size=sizes.image_size,
        mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=sizes.encoder_num_heads,
        patch_size=sizes.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=tuple(sizes.encoder_global_attn_indexes), window_size=sizes.window_size,
        out_chans=sizes.prompt_embed_dim)
    prompt_encoder = PromptEncoder(
        embed_dim=sizes.prompt_embed_dim, image_embedding_size=(grid, grid),
        input_image_size=(sizes.image_size, sizes.image_size), mask_in_chans=sizes.mask_in_chans)
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=sizes.decoder_depth, embedding_dim=sizes.prompt_embed_dim,
                                      mlp_dim=sizes.decoder_mlp_dim, num_heads=sizes.decoder_num_heads),
        transformer_dim=sizes.prompt_embed_dim, iou_head_depth=sizes.iou_head_depth,
        iou_head_hidden_dim=sizes.iou_head_hidden_dim)
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))


def infer_sam_sizes(sd: dict[str, torch.Tensor], *, decoder_num_heads: int = 8) -> SamSizes:
    """SAM sizes from a SAM state dict (keys without the `sam.model.` prefix).

    Everything but the decoder's head count is readable from shapes; that one defaults to Meta's 8.
    """
    try:
        patch = sd["image_encoder.patch_embed.proj.weight"]          # [E, 3, p, p]
        pos = sd["image_encoder.pos_embed"]                            # [1, g, g, E]
        embed_dim, patch_size, grid = patch.shape[0], patch.shape[2], pos.shape[1]
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("image_encoder.blocks."))
        rel = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]  # [2*w-1, head_dim]
        head_dim = rel[0].shape[1]
        global_idx = tuple(i for i, r in enumerate(rel) if r.shape[0] == 2 * grid - 1)
        windowed = [r.shape[0] for r in rel if r.shape[0] != 2 * grid - 1]
        window = (windowed[0] + 1) // 2 if windowed else 0
        prompt_dim = sd["image_encoder.neck.0.weight"].shape[0]
        dec_depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("mask_decoder.transformer.layers."))
        mlp_dim = sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
        iou_hidden = sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]
        iou_depth = len({k.split(".")[3] for k in sd if k.startswith("mask_decoder.iou_prediction_head.layers.")})
        mask_in = sd["prompt_encoder.mask_downscaling.3.weight"].shape[0]
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"cannot infer SAM sizes from the SAM weights: {e!r} is missing or malformed. "
                          "Expected the keys of Meta's SAM checkpoint (image_encoder.*, prompt_encoder.*, "
                          "mask_decoder.*).") from None
    return SamSizes(image_size=grid * patch_size, patch_size=patch_size, encoder_embed_dim=embed_dim,
                    encoder_depth=depth, encoder_num_heads=embed_dim // head_dim,
                    encoder_global_attn_indexes=global_idx, window_size=window, prompt_embed_dim=prompt_dim,
                    mask_in_chans=mask_in, decoder_depth=dec_depth, decoder_mlp_dim=mlp_dim,
                    decoder_num_heads=decoder_num_heads, iou_head_hidden_dim=iou_hidden, iou_head_depth=iou_depth)


def nextchat_sam_decode(sam: Sam, image_embedding: torch.Tensor, boxes_sam: torch.Tensor,
                        seg_prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NExT-Chat's SAM call (reference §1.7 steps 2-4).

    image_embedding: [1, C, g, g]; boxes_sam: [K, 4] xyxy in SAM's padded input frame (pixels of the
    S x S input, unclamped); seg_prompt: [K, 4, C] from seg_prompt_mlp.
    Returns low-res mask logits [K, 1, 4g, 4g] and IoU predictions [K, 1] (mask token 0 only).
    """
    pe = sam.prompt_encoder
    box_tokens = pe._embed_boxes(boxes_sam)                           # [K, 2, C]: +0.5, Fourier PE, corner embeds
    sparse = torch.cat([seg_prompt, box_tokens], dim=1)               # [K, 6, C]: prompt tokens first
    k, g = boxes_sam.shape[0], pe.image_embedding_size
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(k, -1, g[0], g[1])
    low_res, iou = sam.mask_decoder(image_embeddings=image_embedding, image_pe=pe.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
    return low_res, iou


def upsample_mask_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """[K,1,h,w] logits -> [K,1,size,size] float32, bilinear, align_corners=False (still SAM-padded)."""
    return F.interpolate(low_res.float(), size=(size, size), mode="bilinear", align_corners=False)
