"""nxc-make-checkpoint --family vitron: VITRON's layout (issue 29) as nxc deploys it, random weights.

    NExT-Chat's checkpoint (nxc.model.maker: Vicuna + CLIP tower + location heads + SAM, one tensor at a time)
      + region_encoder.* (VITRON's region extractor, nxc.model.region: a user's box -> one row from the tower's patches)
      + generator/  GLIGEN in diffusers' layout: --generator gligen = gligen-1-4-generation-text-box's sizes (SD-1.4's
                    UNet with attention_type "gated", 1.07 B parameters, SD's VAE, a CLIP-L-sized text encoder whose
                    pooled output embeds the phrases); tiny = make_tiny_generator(gated=True)
      + modules.json  VITRON's calls A (generate), B (segment), C (edit), E (track), which nxc-export reads

VITRON itself segments with SEEM; nxc's segment / track backends are the checkpoint's SAM (nxc.runtime.modules).
"""
from __future__ import annotations

import json
from pathlib import Path

GENERATORS = ("tiny", "gligen")
MODULES = {"grammar": "vitron", "region": "pixels",
           "calls": {"A": {"task": "image generation", "backend": "generate"},
                     "B": {"task": "image segmentation", "backend": "segment"},
                     "C": {"task": "image editing", "backend": "edit"},
                     "E": {"task": "video segmentation", "backend": "track"}},
           "generator": {"path": "generator", "default_steps": 20, "default_guidance": 4.0}}


def generator_bytes(generator: str, itemsize: int) -> int:
    """About what `generator` takes on disk (the UNet, VAE and text encoder)."""
    if generator != "gligen":
        return 16 << 20
    from nxc.model.generator import SD15_UNET, sd15_numel
    return sd15_numel(unet={**SD15_UNET, "attention_type": "gated"}) * itemsize + (500 << 20)


def vitron_extras(generator: str, *, seed: int, dtype, log):
    """extras(work) for nxc.model.maker.make_checkpoint: generator/ and modules.json written into the checkpoint
    being made; returns their record."""
    from nxc.model.generator import make_sd15_generator, make_tiny_generator
    if generator not in GENERATORS:
        raise ValueError(f"--generator {generator!r}: --family vitron takes {' or '.join(GENERATORS)}")

    def extras(work: Path) -> dict:
        folder = work / MODULES["generator"]["path"]
        if generator == "gligen":
            make_sd15_generator(folder, seed=seed + 1, dtype=dtype, gligen=True,
                                log=lambda m: log(f"[nxc-make-checkpoint] generator/{m}"))
        else:
            make_tiny_generator(folder, seed=seed + 1, gated=True)
        (work / "modules.json").write_text(json.dumps(MODULES, indent=1) + "\n")
        return {"generator": generator, "modules": sorted(MODULES["calls"]), "region_encoder": True}
    return extras
