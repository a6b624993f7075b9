"""Checkpoints as NExT-Chat's own code saved them: transformers 4.31's save_pretrained wrote every LLaMA layer's
`self_attn.rotary_emb.inv_freq` buffer (today's transformers no longer does). Shared by tests/model and
tests/export."""
import json
import shutil

import torch

INV_FREQ = "model.layers.{}.self_attn.rotary_emb.inv_freq"


def official_inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    """transformers 4.31's LlamaRotaryEmbedding.__init__, written out."""
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


def saved_by_4_31(ckpt, out, *, dtype=torch.float32, safetensors=False, theta=10000.0, edit=None,
                  torch_dtype: bool = False):
    """A copy of `ckpt` with its weights in `dtype` and every layer's inv_freq buffer (in `dtype` too, as
    save_pretrained wrote an fp16 model), right after the layer's o_proj as 4.31's state dict had it. edit(sd)
    may change the state dict before it is written; torch_dtype: config.json says the dtype, as 4.31 wrote it."""
    from nxc.model.checkpoint import load_state_dict
    shutil.copytree(ckpt, out)
    sd = load_state_dict(out)
    for f in [*out.glob("pytorch_model*.bin*"), *out.glob("model*.safetensors*")]:
        f.unlink()
    cfg = json.loads((out / "config.json").read_text())
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    saved = {}
    for k, v in sd.items():
        saved[k] = v.to(dtype) if v.is_floating_point() else v
        if k.endswith(".self_attn.o_proj.weight"):
            saved[k.replace("o_proj.weight", "rotary_emb.inv_freq")] = official_inv_freq(dim, theta).to(dtype)
    if edit is not None:
        edit(saved)
    if safetensors:
        from safetensors.torch import save_file
        save_file(saved, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(saved, out / "pytorch_model.bin")
    if torch_dtype:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
