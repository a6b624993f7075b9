"""The retrieval family (ChatRex-style, issue 19): boxes come from a proposal detector, each proposal's features
enter the prompt as an object row, and the LLM answers with the indices of the proposals it means.

    image ─▶ CLIP tower + projector ───────────────────────────▶ image rows (as NExT-Chat)
          └▶ square pixels (S) ─▶ proposal_net ─▶ boxes, scores ─▶ score threshold + NMS (numpy, after the graph)
                                └▶ object_encoder.features ─▶ [1,C,S/4,S/4] ─┐
                   boxes (proposals, then region-input boxes) ───────────────┴▶ object_encoder.rows ─▶ [N,H]
    prompt   <image span>\\n<obj0><objfeat><obj1><objfeat>...\\n{question}    (object rows at the <objfeat>s)
    answer   <ground>the red circle</ground><objects><obj1></objects>        (nxc.object_index parses it)

The object rows follow RexSeek's multi-level RoI path (visual_prompt_encoder/multi_level_roi.py): the encoder's
levels upsampled to the first and concatenated, RoI-align 7x7 (aligned), mean-pooled, plus a sine embedding of the
box, through a 2-layer GELU projector. The proposal detector is the small `nxc.model.proposals.ProposalNet` (UPN's
place), trained on its own. Region input is a box appended to the object list: `[k]` in a question becomes
`<objN><objfeat>` with its row from the same encoder, so the model can answer with that index too. Each row also
carries a learned vector of its index in the object list (a deviation from RexSeek, for a small LLM).

Checkpoint layout (nxc's own; ChatRex's is remote code): the NExT-Chat layout's config.json (LLaMA + mm fields,
`"grounding": "retrieval"`, `"objects": ObjectSizes`), model.safetensors with `model.*` / `lm_head.*` (LLaMA),
`model.mm_projector.*`, `object_encoder.*`, `proposal_net.*`; CLIP in `clip/`; the LLaMA tokenizer with the 5
NExT-Chat tokens and then nxc.object_index.ADDED_TOKENS in added_tokens.json.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from nxc.config import ObjectSizes
from nxc.model.llm_steps import LlmSteps
from nxc.object_index import MAX_OBJECTS

FAMILY = "retrieval"


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GELU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GELU())


def box_sine_embedding(boxes: torch.Tensor, frequencies: int) -> torch.Tensor:
    """[N,4] normalised xyxy -> [N, 8F]: sin and cos of each coordinate at F frequencies (2^0 .. 2^(F-1)) x pi / 2
    (DETR-style positional features of the box, as RexSeek adds to each RoI feature)."""
    scales = (2.0 ** torch.arange(frequencies, dtype=torch.float32, device=boxes.device)) * (math.pi / 2)
    x = boxes[:, :, None] * scales                       # [N,4,F]
    return torch.cat([x.sin(), x.cos()], dim=2).flatten(1)


class ObjectEncoder(nn.Module):
    """The high-resolution encoder and the object projector: features(pixels) once per image, rows(features, boxes)
    for any boxes of that image."""

    def __init__(self, sizes: ObjectSizes, hidden_size: int):
        super().__init__()
        self.sizes = sizes
        c = sizes.channels
        self.stem = nn.Sequential(nn.Conv2d(3, c[0], 3, stride=2, padding=1), nn.GELU())
        self.levels = nn.ModuleList([_conv(c[0], c[0], 2)] + [_conv(c[i - 1], c[i], 2) for i in range(1, len(c))])
        d_in = sizes.feature_channels + 8 * sizes.box_frequencies
        self.projector = nn.Sequential(nn.Linear(d_in, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        # each row also carries a learned vector of its index in the object list (the N of the `<objN>` before it):
        # our deviation from RexSeek, so that a small LLM names the row it matched in one attention step
        self.index_embed = nn.Embedding(MAX_OBJECTS, hidden_size)
        nn.init.normal_(self.index_embed.weight, std=0.1)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1,3,S,S] square pixels -> [1, sum(channels), S/4, S/4]: every level upsampled to the first, concatenated."""
        x = self.stem(pixels)
        outs = []
        for level in self.levels:
            x = level(x)
            outs.append(x)
        size = outs[0].shape[-2:]
        return torch.cat([outs[0]] + [nn.functional.interpolate(o, size=size, mode="bilinear", align_corners=False)
                                      for o in outs[1:]], dim=1)

    def rows(self, features: torch.Tensor, boxes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """features [1,C,h,w], boxes [N,4] normalised xyxy in the square frame, indices [N] (each box's place in
        the object list) -> [N,H] LLM input rows."""
        from torchvision.ops import roi_align
        h = features.shape[-1]
        rois = torch.cat([torch.zeros(boxes.shape[0], 1, dtype=boxes.dtype, device=boxes.device), boxes * h], dim=1)
        pooled = roi_align(features, rois, output_size=self.sizes.roi_size, spatial_scale=1.0, sampling_ratio=2,
                           aligned=True).mean(dim=(2, 3))
        rows = self.projector(torch.cat([pooled, box_sine_embedding(boxes, self.sizes.box_frequencies)], dim=1))
        return rows + self.index_embed(indices)


class RetrievalChat(nn.Module, LlmSteps):
    """The retrieval model for inference and training. `config`: nxc.config.NextChatConfig with `objects` set and no
    SAM. Submodule names are the checkpoint's (nxc.model.checkpoint maps `model.*` to `llm.model.*`)."""

    def __init__(self, *, config, llm_device: str | None = None):
        super().__init__()
        from transformers import CLIPVisionModel, LlamaForCausalLM

        from nxc.model.nextchat import build_projector, clip_config, llama_config
        from nxc.model.proposals import ProposalNet, ProposalSizes
        self.config = config
        h = config.llm.hidden_size
        self.vision_tower = CLIPVisionModel(clip_config(config.vision))
        self.mm_projector = build_projector(config.mm_hidden_size, h, config.mm_depth)
        with torch.device(llm_device) if llm_device else contextlib.nullcontext():
            self.llm = LlamaForCausalLM(llama_config(config.llm))
        self.object_encoder = ObjectEncoder(config.objects, h)
        self.proposal_net = ProposalNet(ProposalSizes.from_dict(config.objects.proposals))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        return self.mm_projector(out.hidden_states[self.config.mm_vision_select_layer][:, 1:])

    def proposals(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[1,3,S,S] -> (boxes [1,K,4], scores [1,K]) before the score threshold and NMS."""
        return self.proposal_net(pixels)


# -- checkpoint ----------------------------------------------------------------------------------------------------
def is_retrieval_checkpoint(ckpt) -> bool:
    import json
    from pathlib import Path
    path = Path(ckpt) / "config.json"
    try:
        return json.loads(path.read_text()).get("grounding") == FAMILY
    except (OSError, ValueError, AttributeError):
        return False


def load_retrieval(ckpt, *, clip_dir=None):
    """(RetrievalChat, SentencePieceOracle) from a retrieval checkpoint directory (module docstring's layout)."""
    from pathlib import Path

    from transformers import CLIPVisionModel

    from nxc.config import NextChatConfig, ObjectSizes
    from nxc.model.checkpoint import (CheckpointError, internal_key, load_state_dict, read_clip_preprocess,
                                      read_config_and_tokenizer, resolve_clip_dir)
    from nxc.model.layout import check_rope_buffer, is_rope_buffer
    from nxc.model.nextchat import vision_sizes_from_clip

    ckpt = Path(ckpt)
    cfg, llm_sizes, tokenizer = read_config_and_tokenizer(ckpt)
    if "objects" not in cfg:
        raise CheckpointError(f"{ckpt / 'config.json'} says grounding 'retrieval' but has no 'objects' sizes")
    clip_path = resolve_clip_dir(ckpt, cfg, clip_dir)
    clip = CLIPVisionModel.from_pretrained(str(clip_path), local_files_only=True, attn_implementation="eager")
    config = NextChatConfig(llm=llm_sizes, vision=vision_sizes_from_clip(clip.config), sam=None,
                            mm_hidden_size=int(cfg["mm_hidden_size"]), mm_depth=int(cfg["mm_depth"]),
                            mm_vision_select_layer=int(cfg["mm_vision_select_layer"]),
                            mm_use_im_start_end=bool(cfg["mm_use_im_start_end"]),
                            objects=ObjectSizes.from_dict(cfg["objects"]))
    model = RetrievalChat(config=config)
    model.vision_tower.load_state_dict(clip.state_dict())
    raw = load_state_dict(ckpt)
    for k in [k for k in raw if is_rope_buffer(k)]:               # transformers 4.31's buffers: checked, skipped
        check_rope_buffer(k, raw[k], llm_sizes)
    sd = {internal_key(k): v for k, v in raw.items()}
    sd.pop(None, None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("vision_tower.")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: the weights do not match a retrieval model of config.json's sizes: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.clip_preprocess = read_clip_preprocess(clip_path, int(clip.config.image_size))
    return model.eval(), tokenizer


def save_retrieval(model: RetrievalChat, out, *, tokenizer_dir, training: dict | None = None) -> None:
    """Write `model` in the retrieval checkpoint layout; the tokenizer files come from `tokenizer_dir` (a NExT-Chat
    checkpoint's), with the object tokens appended to its added_tokens.json."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from nxc import names
    from nxc.model.checkpoint import official_key
    from nxc.object_index import ADDED_TOKENS

    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    llm = c.llm
    cfg = {"architectures": ["NxcRetrievalForCausalLM"], "model_type": "nextchat", "grounding": FAMILY,
           "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
           "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
           "num_key_value_heads": llm.num_kv_heads, "vocab_size": llm.vocab_size, "rms_norm_eps": llm.rms_norm_eps,
           "rope_theta": llm.rope_theta, "max_position_embeddings": llm.max_position_embeddings,
           "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 0, "torch_dtype": "float32", "use_mm_proj": True, "mm_hidden_size": c.mm_hidden_size,
           "mm_depth": c.mm_depth, "mm_vision_select_layer": c.mm_vision_select_layer,
           "mm_use_im_start_end": c.mm_use_im_start_end, "mm_vision_tower": "clip",
           "objects": c.objects.to_dict()}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    sd = {official_key(k): v.detach().contiguous() for k, v in model.state_dict().items()
          if not k.startswith("vision_tower.")}
    save_file(sd, str(out / "model.safetensors"))
    model.vision_tower.save_pretrained(str(out / "clip"), safe_serialization=True)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    base = json.loads((tokenizer_dir / "added_tokens.json").read_text())
    n0 = min(base.values())
    added = {t: n0 + i for i, t in enumerate(names.ADDED_TOKENS + ADDED_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    if training is not None:
        (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")


# -- the reference chat --------------------------------------------------------------------------------------------
class RetrievalReferenceChat:
    """Image + text (+ region boxes) -> reply, groundings and pixel boxes; batch 1, float32, greedy or seeded
    sampling through nxc.decode (no heads fire during decoding: indices are ordinary tokens, parsed as they come).
    What the retrieval build's graphs and the runtime are compared with."""

    def __init__(self, *, model: RetrievalChat, tokenizer):
        from nxc import names
        from nxc.object_index import OBJ_FEAT, IndexTokens
        self.model, self.tokenizer = model.eval(), tokenizer
        ids = tokenizer.added_token_ids
        self.im_start, self.im_patch, self.im_end = ids[names.IM_START], ids[names.IM_PATCH], ids[names.IM_END]
        self.objfeat, self.eos = ids[OBJ_FEAT], tokenizer.eos_id
        self.index_tokens = IndexTokens.from_vocab(tokenizer.token_to_id)
        # the ids only the prompt holds (the runtime bans the same: its index head's slot and the image span)
        self.never_sampled = tuple(sorted((self.objfeat, self.im_start, self.im_patch, self.im_end)))

    @classmethod
    def load(cls, ckpt, *, clip_dir=None) -> "RetrievalReferenceChat":
        model, tokenizer = load_retrieval(ckpt, clip_dir=clip_dir)
        return cls(model=model, tokenizer=tokenizer)

    def object_pixels(self, image) -> torch.Tensor:
        from nxc.model import processing
        return processing.clip_pixels(image.convert("RGB"), self.model.config.objects.image_size)

    @torch.no_grad()
    def proposals(self, image):
        """-> (boxes [P,4] normalised square frame, scores [P]) after the score threshold and NMS."""
        from nxc.proposal_filter import filter_proposals
        o = self.model.config.objects
        boxes, scores = self.model.proposals(self.object_pixels(image))
        return filter_proposals(boxes[0].numpy(), scores[0].numpy(), score_threshold=o.score_threshold,
                                iou_threshold=o.nms_iou, max_out=o.max_proposals)

    @torch.no_grad()
    def chat(self, image, text: str, *, boxes=None, history=None, history_boxes=None, max_new_tokens: int = 64,
             sampling=None, special_tokens_in_text: bool = False):
        """One turn. history_boxes: the region boxes (normalised) of the earlier turns' references, in order."""
        import numpy as np
        from transformers import DynamicCache

        from nxc.decode import assemble_prefill, decode_loop
        from nxc.model import processing
        from nxc.model.reference import ChatResult
        from nxc.object_index import ObjectIndexParser, render
        from nxc.prompt import PromptFormat, prompt_segments
        from nxc.sampling import SamplingParams, pick_token

        sampling = sampling or SamplingParams()
        image = image.convert("RGB")
        w, h = image.size
        cfg = self.model.config
        props, scores = self.proposals(image)
        boxes_px = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
        segments, order = prompt_segments(text, num_image_tokens=cfg.num_image_tokens, num_boxes=len(boxes_px),
                                          history=history, special_tokens_in_text=special_tokens_in_text,
                                          fmt=PromptFormat(objects=len(props)))
        region = processing.normalise_boxes(boxes_px[order], w, h).numpy() if order else np.zeros((0, 4), np.float32)
        earlier = np.asarray(history_boxes if history_boxes is not None else [], np.float32).reshape(-1, 4)
        values = np.concatenate([props, earlier, region]).astype(np.float32)
        ids = self.tokenizer.encode_segments(segments)
        features = self.model.encode_image(processing.clip_preprocess_of(self.model).pixels(image))
        fmap = self.model.object_encoder.features(self.object_pixels(image))
        rows = self.model.embed_tokens(torch.tensor([ids]))[0].numpy()
        emb = assemble_prefill(ids, rows, image_span=(self.im_start, self.im_end, cfg.num_image_tokens),
                               image_features=lambda: features[0].numpy(), slot=self.objfeat,
                               num_slot_values=len(values),
                               slot_rows=lambda ks: self.model.object_encoder.rows(
                                   fmap, torch.from_numpy(values[ks]), torch.tensor(ks, dtype=torch.long)).numpy())
        cache = DynamicCache()
        logits, hidden = self.model.llm_step(torch.from_numpy(emb)[None], cache)
        rng = sampling.rng()

        def step(token, x):
            return self.model.llm_step(self.model.embed_tokens(torch.tensor([[token]])), cache)

        out = [t for t, _ in decode_loop(
            logits=logits, hidden=hidden, fed=ids[-1], step=step, heads={}, max_new=max_new_tokens, eos=self.eos,
            pick=lambda lg, n: pick_token(lg[0].float().numpy(), sampling, rng, banned=self.never_sampled))]
        parser = ObjectIndexParser(self.index_tokens, len(values), self.tokenizer.decode)
        for t in out:
            parser.feed(t)
        detections = []
        for g in parser.groundings:
            for i in g.indices:
                px = processing.boxes_to_pixels(torch.from_numpy(values[i:i + 1]), w, h).numpy()[0]
                detections.append(IndexDetection(box=px, box_norm=values[i], phrase=g.phrase, index=i,
                                                 score=float(scores[i]) if i < len(scores) else None))
        raw = self.tokenizer.decode(out)
        return ChatResult(text=render(raw, len(values)), raw_text=raw, token_ids=out, prompt_ids=ids,
                          finish_reason="stop" if out and out[-1] == self.eos else "length",
                          detections=detections)


class IndexDetection:
    """A box the reply names by index: the object list's box (proposal or region input), its phrase."""
    mask = None

    def __init__(self, *, box, box_norm, phrase: str, index: int, score: float | None):
        self.box, self.box_norm, self.phrase, self.index, self.score = box, box_norm, phrase, index, score

    def __repr__(self) -> str:
        return f"IndexDetection(index={self.index}, phrase={self.phrase!r}, box={list(map(float, self.box))})"
