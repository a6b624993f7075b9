"""The build's manifest.json body from the model, its tokenizer and the export's options: what the runtime reads
to run the build without the model's code (prompt template, preprocessing, the decode loop's head table, axes).
The graphs' records and the sha256 of every file are added by the exporter and nxc.manifest.write_manifest."""
from __future__ import annotations

import time

from nxc import __version__, names
from nxc.export.options import ExportOptions
from nxc.specs import axis_ranges


def manifest_body(model, tokenizer, opts: ExportOptions, max_context: int, source: dict) -> dict:
    """manifest.json without its "graphs" (the exporter's per-graph records) and "files" (write_manifest's)."""
    from nxc.model import processing
    from nxc.model.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD
    cfg = model.config
    added = tokenizer.added_token_ids
    tokens = {**added, names.BOS: tokenizer.bos_id, names.EOS: tokenizer.eos_id,
              names.UNK: tokenizer.token_to_id(names.UNK)}
    return {
        "nxc_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "precision": opts.precision,
        "config": cfg.to_dict(),
        "tokens": tokens,
        "prompt": {"template": "vicuna_v1.1", "system": names.SYSTEM_PROMPT, "roles": list(names.ROLES),
                   "sep": names.SEP, "sep2": names.SEP2, "image_placeholder": names.IMAGE_PLACEHOLDER,
                   "num_image_tokens": cfg.num_image_tokens, "use_im_start_end": cfg.mm_use_im_start_end},
        "preprocess": {
            "clip": {**processing.clip_preprocess_of(model).manifest(), "pad": "white square, centred"},
            **({"sam": {"size": cfg.sam.image_size, "mean": list(SAM_PIXEL_MEAN), "std": list(SAM_PIXEL_STD),
                        "resample": "bilinear", "pad": "longest side to size, zeros, centred"}}
               if cfg.sam is not None else {}),
            **({"objects": {"size": cfg.objects.image_size, "mean": list(processing.CLIP_MEAN),
                            "std": list(processing.CLIP_STD), "resample": "bicubic", "pad": "white square, centred"}}
               if cfg.objects is not None else {})},
        "generation": {"max_new_tokens": 512, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "iou_threshold": 0.3,
                       "eos": names.EOS},
        "heads": decode_heads(opts.graphs, region_encoder=cfg.region_encoder),
        "max_context": max_context,
        "kv_cache": {"dtype": "float16" if opts.precision == "fp16" else "float32",
                     "layout": "[batch, position, kv_heads, head_dim]",
                     # rows of different lengths decode together by mask (ONNX Runtime; TensorRT engines: batch 1)
                     "batch_rows": "masked"},
        "axes": axis_ranges(max_context, prefill_opt=min(max_context, cfg.num_image_tokens + 64),
                            # a generator's denoiser takes [unconditional, conditional] rows in one call
                            max_batch=2 if names.GRAPH_DENOISER in opts.graphs else 1),
        "embeddings": {"file": "embeddings.npy", "shape": [cfg.llm.vocab_size, cfg.llm.hidden_size],
                       "dtype": "float32"},
        "tokenizer": {"file": "tokenizer.json"},
    }


def decode_heads(graphs: tuple[str, ...], *, region_encoder: bool = False) -> list[dict]:
    """The decode loop's dispatch table (nxc.manifest.Head) for the graphs exported: one head per family's
    decode-time graph (region_encoder: the box head's graph also takes the patch features, VITRON's region
    extractor)."""
    heads = []
    if names.GRAPH_OBJECT_FEATURES in graphs:
        # retrieval: no decode-time graph call (indices are tokens, nxc.runtime.dispatch.IndexKind parses them);
        # its slot `<objfeat>` holds the object rows of the prompt (proposals, then region boxes)
        from nxc.object_index import OBJ_FEAT
        heads.append({"kind": "index", "trigger": None, "emit": OBJ_FEAT, "graph": names.GRAPH_OBJECT_FEATURES,
                      "inputs": {"features": f"{names.GRAPH_PROPOSALS}:features", "boxes": "zeros",
                                 "indices": "slot_index"},
                      "collect": [], "feedback": None, "finish": None,
                      "encode_input": "boxes", "encode_output": "rows"})
    if names.GRAPH_PROJECTOR in graphs:
        # generation (NExT-GPT): [IMG0] sampled, [IMG1..3] emitted, their hiddens -> projector -> a picture
        from nxc.export.nextgpt import signal_head
        heads.append(signal_head())
    if names.GRAPH_LOC_HEADS in graphs:
        sam = {names.GRAPH_SAM_ENCODER, names.GRAPH_SAM_DECODER} <= set(graphs)
        inputs = {"hidden": "hidden", "boxes": "zeros"}
        if region_encoder:         # VITRON's region extractor: the image's patches, which slots are user regions
            inputs.update({"patch_features": f"{names.GRAPH_VISION}:patch_features", "is_region": "slot_is_region"})
        heads.append({"kind": "box", "trigger": names.AT, "emit": names.BOXES, "graph": names.GRAPH_LOC_HEADS,
                      "inputs": inputs, "collect": ["box", "seg_prompt"],
                      "feedback": "feedback", "finish": "sam_masks" if sam else None,
                      "encode_input": "boxes", "encode_output": "loc_embeds"})
    return heads
