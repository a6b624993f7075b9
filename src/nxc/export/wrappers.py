"""Export wrappers for `vision`, `loc_heads`, `sam_encoder` and `sam_decoder` (the `llm` one is in llm.py).

Each is a small nn.Module that exists only for export: it reads the reference modules' weights, fixes the
choices the reference makes at run time (which CLIP layer, which mask token) and leaves nxc.model untouched.
Tensor names and axes are in nxc.specs.
"""
from __future__ import annotations

import torch
from torch import nn

from nxc.model.nextchat import NextChat


class VisionGraph(nn.Module):
    """pixel_values [B,3,R,R] (CLIP-normalised, white-padded square) -> image_embeds [B,N,H].

    Runs CLIP only up to the selected hidden layer (reference §1.1: index -2 = output of the second-to-last
    encoder layer; the last layer is never computed), drops CLS, applies mm_projector."""

    def __init__(self, model: NextChat):
        super().__init__()
        vm = getattr(model.vision_tower, "vision_model", model.vision_tower)   # transformers 5 flattened it
        n_layers = len(vm.encoder.layers)
        sel = model.config.mm_vision_select_layer
        keep = sel if sel >= 0 else n_layers + 1 + sel      # hidden_states[k] is the output of the first k layers
        if not 0 <= keep <= n_layers:
            raise ValueError(f"mm_vision_select_layer {sel} is outside CLIP's {n_layers} layers")
        self.embeddings, self.pre_layrnorm = vm.embeddings, vm.pre_layrnorm
        self.layers = vm.encoder.layers[:keep]
        self.projector = model.mm_projector
        self.patches = model.config.region_encoder         # also output the patch features (the region extractor's)

    def forward(self, pixel_values: torch.Tensor):
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        rows = self.projector(h[:, 1:])
        return (rows, h[:, 1:]) if self.patches else rows


class LocHeadsGraph(nn.Module):
    """The three small MLPs (reference §1.4, §1.5), two independent halves in one graph:

        hidden [K,H] ─ loc_decoder ─▶ box [K,4] ─ loc_encoder ─▶ feedback [K,H]   (trigger: box + next input)
                     └ seg_prompt_mlp ─▶ seg_prompt [K,4,C]                          (SAM prompt tokens)
        boxes [M,4] ─ loc_encoder ─▶ loc_embeds [M,H]                                 (region input <boxes> rows)
    Boxes are normalised xyxy in the padded square, unclamped. A region extractor's build also takes the image's
    patch_features [1,N,Dv] and is_region [M]: a user's region (1) is region_encoder(patches, box) instead
    (NextChat.slot_rows)."""

    def __init__(self, model: NextChat):
        super().__init__()
        self.loc_encoder, self.loc_decoder, self.seg_prompt_mlp = model.loc_encoder, model.loc_decoder, model.seg_prompt_mlp
        self.region_encoder = getattr(model, "region_encoder", None) if model.config.region_encoder else None
        self.c = model.config.sam.prompt_embed_dim

    def forward(self, hidden: torch.Tensor, boxes: torch.Tensor, patch_features: torch.Tensor | None = None,
                is_region: torch.Tensor | None = None):
        box = self.loc_decoder(hidden)
        seg = self.seg_prompt_mlp(hidden).reshape(hidden.shape[0], 4, self.c)
        rows = self.loc_encoder(boxes)
        if self.region_encoder is not None:
            rows = torch.where((is_region > 0)[:, None], self.region_encoder(patch_features[0], boxes), rows)
        return box, self.loc_encoder(box), seg, rows


# query tokens per chunk of a SAM global-attention block (SamEncoderGraph). SAM ViT-H fp32 in ONNX Runtime, one
# 1024 px image, RSS the run adds: 1.87 GB with chunks of 1024, 1.31 GB with 256 (2026-12-05, this 2-core machine)
GLOBAL_ATTENTION_TOKENS = 256


class SamEncoderGraph(nn.Module):
    """image [1,3,S,S] (SAM-normalised, centre-padded; reference §4.2) -> image_embedding [1,C,S/16,S/16].

    segment_anything's ImageEncoderViT, but its global-attention blocks take their queries in chunks of whole image
    rows (`_global_attention`): SAM ViT-H's 4 global blocks otherwise hold [16 heads, 4096, 4096] float32 scores
    three times over (scores, + relative positions, softmax), 3.2 GB at once in ONNX Runtime; a chunk of 1024
    queries holds a quarter. Same arithmetic per query row, so the same numbers."""

    def __init__(self, model: NextChat):
        super().__init__()
        self.encoder = model.sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.patch_embed(image)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for blk in enc.blocks:
            if blk.window_size == 0 and x.shape[1] * x.shape[2] > GLOBAL_ATTENTION_TOKENS:
                x = x + _global_attention(blk.attn, blk.norm1(x), GLOBAL_ATTENTION_TOKENS)
                x = x + blk.mlp(blk.norm2(x))
            else:
                x = blk(x)
        return enc.neck(x.permute(0, 3, 1, 2))


def _global_attention(attn: nn.Module, x: torch.Tensor, tokens: int) -> torch.Tensor:
    """segment_anything's Attention.forward (with add_decomposed_rel_pos) on x [B,H,W,C], the queries taken
    `tokens // W` image rows at a time against all keys; each row's scores, softmax and output as in SAM."""
    from segment_anything.modeling.image_encoder import get_rel_pos
    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
    if attn.use_rel_pos:
        rel_pos_h, rel_pos_w = get_rel_pos(h, h, attn.rel_pos_h), get_rel_pos(w, w, attn.rel_pos_w)
    rows = max(1, tokens // w)
    outs = []
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        qc = q[:, r0 * w:r1 * w]
        scores = (qc * attn.scale) @ k.transpose(-2, -1)
        if attn.use_rel_pos:
            r_q = qc.reshape(b * heads, r1 - r0, w, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_pos_h[r0:r1])
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_pos_w)
            scores = (scores.view(b * heads, r1 - r0, w, h, w) + rel_h[:, :, :, :, None]
                      + rel_w[:, :, :, None, :]).view(b * heads, (r1 - r0) * w, h * w)
        outs.append(scores.softmax(dim=-1) @ v)
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


class SamDecoderGraph(nn.Module):
    """NExT-Chat's SAM call (reference §1.7), not the stock SAM decoder export: no points, no mask input, no
    padding point; sparse prompt = [4 seg-prompt tokens, 2 box-corner tokens]; mask token 0 only.

        boxes [K,4] (SAM frame px) ─ +0.5, Fourier PE, corner embeds ─▶ [K,2,C] ─┐
        seg_prompt [K,4,C] ──────────────────────────────────────────────────────┴▶ sparse [K,6,C]
        [iou, mask x4] tokens + sparse ─▶ two-way transformer with image_embedding (expanded to K) + no_mask
                                         ─▶ mask token 0 ─ hypernetwork ─▶ low_res_masks [K,1,4g,4g]
                                         ─▶ iou token ─ head ─▶ iou [K,1]
    The image is expanded to K rows (a broadcast view) instead of SAM's repeat_interleave."""

    def __init__(self, model: NextChat):
        super().__init__()
        sam = model.sam
        self.pe, self.decoder = sam.prompt_encoder, sam.mask_decoder
        dtype = sam.mask_decoder.iou_token.weight.dtype
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach().to(dtype), persistent=False)

    def forward(self, image_embedding: torch.Tensor, boxes: torch.Tensor, seg_prompt: torch.Tensor):
        dec, pe = self.decoder, self.pe
        k = boxes.shape[0]
        # Fourier features in float32 (sin/cos of coordinates x a random matrix), then the decoder's dtype
        corners = self.pe.pe_layer.forward_with_coords((boxes.float() + 0.5).reshape(-1, 2, 2), pe.input_image_size)
        corners = corners.to(seg_prompt.dtype)
        corners = torch.stack([corners[:, 0] + pe.point_embeddings[2].weight[0],
                               corners[:, 1] + pe.point_embeddings[3].weight[0]], dim=1)      # [K,2,C]
        sparse = torch.cat([seg_prompt, corners], dim=1)                                        # [K,6,C]
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens[None].expand(k, -1, -1), sparse], dim=1)
        c, g1, g2 = image_embedding.shape[1:]
        src = (image_embedding + pe.no_mask_embed.weight.reshape(1, -1, 1, 1)).expand(k, c, g1, g2)
        pos = self.image_pe.expand(k, c, g1, g2)
        hs, src = dec.transformer(src, pos, tokens)
        up = dec.output_upscaling(src.transpose(1, 2).reshape(k, c, g1, g2))
        hyper = dec.output_hypernetworks_mlps[0](hs[:, 1])[:, None]                           # [K,1,c']
        _, cu, h, w = up.shape
        masks = torch.matmul(hyper, up.reshape(k, cu, h * w)).reshape(k, 1, h, w)
        iou = dec.iou_prediction_head(hs[:, 0])[:, :1]
        return masks, iou


class ProposalsGraph(nn.Module):
    """The retrieval family's once-per-image graph (nxc.model.retrieval): pixels [1,3,S,S] (the white-padded
    square, CLIP mean/std) -> the detector's top-K boxes [1,K,4] (normalised xyxy, square frame) and scores [1,K]
    (score threshold and NMS are applied after the graph, nxc.proposal_filter), and the object encoder's feature
    map [1,C,S/4,S/4] that object_features reads."""

    def __init__(self, model):
        super().__init__()
        self.proposal_net, self.object_encoder = model.proposal_net, model.object_encoder

    def forward(self, pixels: torch.Tensor):
        boxes, scores = self.proposal_net(pixels)
        return boxes, scores, self.object_encoder.features(pixels)


class ObjectFeaturesGraph(nn.Module):
    """features [1,C,f,f] + boxes [M,4] (normalised xyxy, square frame) + indices [M] (each box's place in the
    object list) -> rows [M,H]: the LLM input row of each `<objfeat>` (RoI-align 7x7 mean-pooled + sine box
    embedding through the projector, plus the index's learned vector)."""

    def __init__(self, model):
        super().__init__()
        self.object_encoder = model.object_encoder

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, indices: torch.Tensor):
        return self.object_encoder.rows(features, boxes, indices)
