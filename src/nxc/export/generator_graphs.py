"""Export wrappers for the generator's graphs, `denoiser`, `latent_decoder` and, for GLIGEN, `latent_encoder`
(nxc.specs.generator_specs), and its optional `text_encoder`.

Each reads diffusers' modules (nxc.model.generator) and leaves them untouched; the sampler (timesteps, the
scheduler's input scaling and step, classifier-free guidance) is the runtime's, in numpy, not in a graph.
"""
from __future__ import annotations

import torch
from torch import nn


ATTENTION_CHUNK = 1024       # query rows per attention block: SD-1.5 at 512x512, [2*8, 1024, 4096] scores, 0.27 GB


class ChunkedAttention:
    """diffusers' plain attention (AttnProcessor: to_q/k/v, get_attention_scores, bmm, to_out) with the queries
    taken `chunk` rows at a time, so that no [B*heads, N, N] score tensor exists whole in the graph (SD-1.5's
    self-attention at 512x512: N = 4096, 1.07 GB a tensor, and the softmax's copy beside it). The same arithmetic
    row for row; the number of chunks is fixed by the latent size, so the graph's batch axis stays dynamic.
    OnnxStream slices SD's attention the same way for a 512 MB Raspberry Pi."""

    def __init__(self, chunk: int = ATTENTION_CHUNK):
        self.chunk = chunk

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        rows = []
        for start in range(0, query.shape[1], self.chunk):
            stop = start + self.chunk
            mask = None if attention_mask is None else attention_mask[:, start:stop]
            rows.append(torch.bmm(attn.get_attention_scores(query[:, start:stop], key, mask), value))
        hidden_states = attn.batch_to_head_dim(rows[0] if len(rows) == 1 else torch.cat(rows, dim=1))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class _Gate:
    """The grounding input [B] of the graph being traced, read by every gated fuser of the UNet."""
    value: torch.Tensor | None = None


def _gated(fuser, gate: _Gate):
    """GatedSelfAttentionDense.forward with its on / off switch (`enabled`, which StableDiffusionGLIGENPipeline
    flips at the scheduled-sampling step) as a number per row: x + g tanh(a) Attn(..) and x + g tanh(b) FF(..).
    g = 1 is diffusers' enabled fuser, op for op (times 1); g = 0 adds 0 to x: its disabled fuser, exactly."""
    def forward(x, objs):
        n_visual = x.shape[1]
        objs = fuser.linear(objs)
        g = gate.value                                   # [B, 1, 1], x's dtype (DenoiserGraph.forward)
        x = x + g * fuser.alpha_attn.tanh() * fuser.attn(fuser.norm1(torch.cat([x, objs], dim=1)))[:, :n_visual, :]
        return x + g * fuser.alpha_dense.tanh() * fuser.ff(fuser.norm2(x))
    return forward


class DenoiserGraph(nn.Module):
    """sample [B,C,h,w] (the scheduler's model input), timestep [B] (float32, 0..num_train_timesteps - 1),
    encoder_hidden_states [B,L,D] -> noise [B,C,h,w]: the UNet's epsilon prediction for one step. The runtime's
    call is B = 2, [unconditional, conditional], as StableDiffusionPipeline's. The UNet's attention runs as
    ChunkedAttention (its processors are replaced: same arithmetic, query chunks of `chunk` rows).

    A GLIGEN UNet (attention_type "gated": it has a position_net) also takes boxes [B,N,4], phrase_embeddings
    [B,N,P], object_mask [B,N] (diffusers' cross_attention_kwargs["gligen"] boxes / positive_embeddings / masks) and
    grounding [B], each gated fuser's switch (see _gated); one graph serves both parts of scheduled sampling."""

    def __init__(self, unet: nn.Module, *, chunk: int = ATTENTION_CHUNK):
        super().__init__()
        self.unet = unet
        unet.set_attn_processor(ChunkedAttention(chunk))
        self.gate = _Gate()
        self.grounded = getattr(unet, "position_net", None) is not None
        if self.grounded:
            from diffusers.models.attention import GatedSelfAttentionDense
            for m in unet.modules():
                if type(m) is GatedSelfAttentionDense:
                    m.forward = _gated(m, self.gate)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                boxes=None, phrase_embeddings=None, object_mask=None, grounding=None):
        kwargs = None
        if self.grounded:
            self.gate.value = grounding.to(sample.dtype).view(-1, 1, 1)     # once, outside the fusers (If)
            kwargs = {"gligen": {"boxes": boxes, "positive_embeddings": phrase_embeddings, "masks": object_mask}}
        return self.unet(sample, timestep, encoder_hidden_states, cross_attention_kwargs=kwargs, return_dict=False)[0]


class LatentDecoderGraph(nn.Module):
    """latents [B,C,h,w] (raw, as the sampler ends) -> pixels [B,3,H,W], RGB in [0, 1]:

        latents / scaling_factor (+ shift_factor, for VAEs that have one) ─ vae.decode ─▶ x in about [-1, 1]
          ─▶ (x / 2 + 0.5).clamp(0, 1)      (diffusers' VaeImageProcessor.postprocess up to its uint8 step)"""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        x = self.vae.decode(z, return_dict=False)[0]
        return (x / 2 + 0.5).clamp(0, 1)


class LatentEncoderGraph(nn.Module):
    """pixels [B,3,H,W], RGB in [0, 1] ─▶ latent_mean, latent_std [B,C,h,w]: the VAE encoder's posterior (diffusers'
    DiagonalGaussianDistribution: std = exp(logvar / 2), logvar clamped to [-30, 20]) on 2 x pixels - 1 (the
    VaeImageProcessor's normalisation), both times scaling_factor, as StableDiffusionGLIGENPipeline scales its
    source latents. The runtime draws the latent, mean + std * standard normal (latent_dist.sample())."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, pixels: torch.Tensor):
        dist = self.vae.encode(pixels * 2 - 1, return_dict=False)[0]
        return (dist.mean - self.shift_factor) * self.scaling_factor, dist.std * self.scaling_factor


class TextEncoderGraph(nn.Module):
    """input_ids [B,L] ─▶ the CLIP text encoder's last hidden state [B,L,D] (no attention mask: SD's pipelines pass
    none to CLIPTextModel, whose config has no use_attention_mask) and its pooler output [B,D] (the row at the first
    end-of-text token; causal attention: the padding after it does not change it, so a phrase padded to L pools as
    GLIGEN's `text_encoder(**tokenizer(phrases, padding=True)).pooler_output`)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids)
        return out[0], out[1]
