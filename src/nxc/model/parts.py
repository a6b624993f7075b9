"""A NExT-Chat (or NExT-GPT) whose modules are made real only while a graph needs them (issue 17: the export at true
size).

    load_nextchat(..., llm=False) ─▶ NextChat on the meta device (names, shapes, config; no storage)
                                     + model.parts = LazyParts(tensors read one at a time, the CLIP directory)
    load_nextgpt(..., llm=False)  ─▶ likewise for NextGpt's vision tower and input projector (its output
                                     projector, 32 M parameters, is loaded real)
    export of graph g: parts.load(g) ─▶ its modules built and filled from the checkpoint ─▶ wrapper, trace, parity
                       parts.release(g) ─▶ back to the meta device, their memory freed

At true size the vision tower (1.2 GB in float32) and SAM ViT-H (2.5 GB) are never in memory together, and neither
is there while the llm is written. The LLaMA is never made real (nxc.export.llm_writer reads its tensors itself).
"""
from __future__ import annotations

import gc

import torch

from nxc import names

# the NextChat / NextGpt submodules each graph's wrapper reads (nxc.export.wrappers, nxc.export.nextgpt); a graph not
# listed (the drawing graphs: their modules are always real) needs none
GRAPH_MODULES = {
    names.GRAPH_VISION: ("vision_tower", "mm_projector"),
    names.GRAPH_LOC_HEADS: ("loc_encoder", "loc_decoder", "seg_prompt_mlp", "region_encoder"),
    names.GRAPH_SAM_ENCODER: ("sam",),
    names.GRAPH_SAM_DECODER: ("sam",),
    names.GRAPH_LLM: (),
}


class LazyParts:
    """Makes a meta-device NextChat's submodules real on demand. `tensors`: internal name -> callable returning the
    tensor (read when called); the vision tower comes from `clip_dir` (HF CLIPVisionModel)."""

    def __init__(self, model, tensors: dict, clip_dir):
        self.model, self.tensors, self.clip_dir = model, tensors, clip_dir
        self.convert = None            # set by an fp16 export (nxc.export.fp16.to_fp16): applied to each module made real

    def _build(self, name: str) -> torch.nn.Module:
        from nxc.model.nextchat import build_projector, mlp2
        from nxc.model.sam import build_sam
        cfg, h = self.model.config, self.model.config.llm.hidden_size
        if name == "vision_tower":
            from transformers import CLIPVisionModel
            return CLIPVisionModel.from_pretrained(str(self.clip_dir), local_files_only=True,
                                                   attn_implementation="eager").float()    # the float32 reference
        module = {"mm_projector": lambda: build_projector(cfg.mm_hidden_size, h, cfg.mm_depth),
                  "loc_encoder": lambda: mlp2(4, h // 2, h), "loc_decoder": lambda: mlp2(h, h // 2, 4),
                  "seg_prompt_mlp": lambda: mlp2(h, h, 4 * cfg.sam.prompt_embed_dim),
                  "sam": lambda: build_sam(cfg.sam), "region_encoder": lambda: _region_encoder(cfg)}[name]()
        with torch.no_grad():
            for key, t in module.state_dict(keep_vars=True).items():
                src = self.tensors.get(f"{name}.{key}")
                if src is not None:
                    t.copy_(src().to(t.dtype))
        return module

    def is_real(self, name: str) -> bool:
        return next(getattr(self.model, name).parameters()).device.type != "meta"

    def load(self, graph: str) -> None:
        for name in GRAPH_MODULES.get(graph, ()):
            if hasattr(self.model, name) and not self.is_real(name):
                module = self._build(name).eval()
                if self.convert is not None:
                    module = self.convert(module)
                setattr(self.model, name, module)

    def release(self, graph: str, *, keep: tuple[str, ...] = ()) -> None:
        """Back to the meta device: graph's modules, except those the graphs in `keep` still need."""
        needed = {m for g in keep for m in GRAPH_MODULES.get(g, ())}
        for name in GRAPH_MODULES.get(graph, ()):
            if name not in needed and hasattr(self.model, name) and self.is_real(name):
                setattr(self.model, name, getattr(self.model, name).to("meta"))
        gc.collect()


def _region_encoder(cfg):
    from nxc.model.region import RegionEncoder
    v = cfg.vision
    return RegionEncoder(cfg.mm_hidden_size, cfg.llm.hidden_size, grid=v.image_size // v.patch_size,
                         image_size=v.image_size)
