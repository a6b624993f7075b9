"""The generation family's part of an export (NExT-GPT, nxc.model.nextgpt): its pooled vision wrapper, and the
drawing graphs with their manifest entries.

    vision          PooledVisionGraph: CLIP to the selected layer, CLS dropped, patches mean-pooled, input projector
                    ─▶ image_embeds [B,1,H]; exported, linted and parity-checked by the exporter like every graph
    llm             the exporter's streamed writer, unchanged (only the LLaMA's tensors are read)
    projector       nxc.export.projector.export_projector(gen_text_hidden_fcs.0) ─▶ graphs/projector.onnx
    denoiser, latent_decoder
                    nxc.export.generator.export_generator(<ckpt>/generator) ─▶ graphs/*.onnx, uncond.npy
    manifest        the "signal" head over [IMG0]..[IMG3] (graph projector, finish "generate"), the "generator"
                    entry (defaults from config.json "generator"), axes.batch max 2 (the denoiser's [uncond, cond])
Each graph's parity report joins reports/parity.json; below fp32 their accuracy joins reports/accuracy.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nxc import names
from nxc.export.wrappers import VisionGraph


class PooledVisionGraph(VisionGraph):
    """pixel_values [B,3,R,R] -> image_embeds [B,1,H]: VisionGraph's tower and layer choice, then the patches'
    mean (NExT-GPT's one vector per image) through the input projector (mm_projector, one Linear)."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        return self.projector(h[:, 1:].mean(dim=1, keepdim=True))


def signal_head() -> dict:
    """The manifest's head for the signal tokens (nxc.runtime.heads.signal)."""
    return {"kind": "signal", "signals": list(names.SIGNAL_TOKENS), "graph": names.GRAPH_PROJECTOR,
            "inputs": {"hidden": "hidden", "embeds": "signal_embeds"}, "collect": ["conditioning"],
            "finish": "generate"}


@dataclass(frozen=True)
class DrawingExport:
    graphs: dict           # manifest records of projector, denoiser, latent_decoder
    entry: dict            # the manifest's "generator"
    accuracy: dict         # {graph: report} below fp32, else empty


def export_drawing(model, out: Path, *, precision: str, parity: bool = True, log) -> DrawingExport:
    """projector, denoiser and latent_decoder of a loaded generation model into the build directory `out` (the
    exporter's partial directory); their parity reports are merged into `out`/reports/parity.json. `parity` False
    (--skip-parity) skips the generator's checks; the projector's (a few ms) always runs."""
    from nxc.export.generator import export_generator
    from nxc.export.projector import export_projector
    d = model.draw_defaults
    gen = export_generator(model.generator_dir, out, precision=precision, default_scheduler=d["default_scheduler"],
                           default_steps=int(d["default_steps"]), default_guidance=float(d["default_guidance"]),
                           parity=parity, log=log)
    record = export_projector(model.output_projector, model.config.projector, out, precision=precision, log=log)
    parity = {**gen.parity, names.GRAPH_PROJECTOR: record.pop("parity")}
    accuracy = dict((gen.accuracy or {}).get("graphs", {}))
    if "accuracy" in record:
        accuracy[names.GRAPH_PROJECTOR] = record.pop("accuracy")
    path = out / "reports" / "parity.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**merged, **parity}, indent=2, default=str) + "\n")
    return DrawingExport(graphs={**gen.graphs, names.GRAPH_PROJECTOR: record}, entry=gen.entry, accuracy=accuracy)
