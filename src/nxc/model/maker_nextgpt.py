"""nxc-make-checkpoint --family nextgpt: a random-weight NExT-GPT-style checkpoint (nxc.model.nextgpt's layout).

    registry names (--llm, --vision, --projector) ─▶ NextChatConfig(projector=...), vocab 32000 + 5 + 4 signals
        ─▶ NextGpt built in memory, torch seed --seed (HF's own initialisation) ─▶ generator/: make_tiny_generator
           (seed + 1, cross-attention width and context length from the projector's out_dim and num_queries)
        ─▶ [--draw-prompt TEXT] mm_projector's weight zeroed (every image row is its bias: the reply no longer
           depends on the image); hiddens h1 (after TEXT's prompt) and h3 (after [IMG0..3] fed) from the model;
           lm_head's [IMG0] and </s> rows rewritten in span(h1, h3) so the greedy reply is [IMG0]..[IMG3]</s>
        ─▶ save_nextgpt into .OUT.partial-<pid> ─▶ loaded back (load_nextgpt) ─▶ renamed to OUT

Unlike the NExT-Chat maker (one tensor at a time, any size), this one holds the model in memory: it is meant for
the tiny and shapes sizes; the generator is always the tiny one (an SD-1.5-sized one is not made here).
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

from nxc import names
from nxc.config import LLAMA_SIZES, PROJECTOR_SIZES, VISION_SIZES, NextChatConfig
from nxc.model.maker_base import PROG, MakerError, pick_sizes

MAX_PARAMS = 2_000_000_000   # the model is held in float32 memory (8 GB at this size)
LEAD = 10.0          # the planted tokens' logit lead over any other (and 2x), as the NExT-Chat trigger's


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def nextgpt_maker_config(llm: str, vision: str, projector: str) -> NextChatConfig:
    from nxc.model.sp_files import LLAMA_BASE_VOCAB
    llm_sizes, vision_sizes, proj = pick_sizes(("--llm", LLAMA_SIZES, llm), ("--vision", VISION_SIZES, vision),
                                               ("--projector", PROJECTOR_SIZES, projector))
    vocab = LLAMA_BASE_VOCAB + len(names.ADDED_TOKENS) + len(names.SIGNAL_TOKENS)
    return NextChatConfig(llm=replace(llm_sizes, vocab_size=vocab), vision=vision_sizes, sam=None,
                          mm_hidden_size=vision_sizes.hidden_size, mm_depth=1,
                          projector=replace(proj, llm_hidden=llm_sizes.hidden_size))


@torch.no_grad()
def plant_drawing(model, tokenizer, prompt: str, log=_log) -> dict:
    """Make the greedy reply to `prompt` (any image) `[IMG0][IMG1][IMG2][IMG3]</s>`: zero mm_projector's weight,
    then rewrite lm_head's [IMG0] and </s> rows (the vectors of span(h1, h3) giving each its logit at its own step
    and 0 at the other's, LEAD above and 2x the largest other logit). Returns what it did."""
    from PIL import Image
    from transformers import DynamicCache

    from nxc.model.nextgpt_reference import NextGptReferenceChat
    model.mm_projector[-1].weight.zero_()
    chat = NextGptReferenceChat(model=model, tokenizer=tokenizer)
    ids, emb = chat.prefill(Image.new("RGB", (32, 32), "white"), prompt)
    cache = DynamicCache()
    _, h1 = model.llm_step(torch.from_numpy(emb)[None], cache)
    _, h3 = model.llm_step(model.embed_tokens(torch.tensor([chat.signals])), cache)
    h = torch.cat([h1, h3])                                            # [2,H]
    first, eos = chat.signals[0], chat.eos
    w = model.llm.lm_head.weight
    lg = w @ h.T                                                       # [V,2]
    lg[[first, eos]] = float("-inf")
    lg[list(chat.never_sampled)] = float("-inf")
    m = lg.max(0).values.clamp(min=0)
    target = 1.1 * torch.maximum(m + LEAD, 2 * m)
    coef = torch.linalg.solve(h @ h.T, torch.diag(target))
    w[[first, eos]] = (coef.T @ h).to(w.dtype)
    got = w[[first, eos]] @ h.T
    for k in (0, 1):
        lead, rest = got[k, k], torch.maximum(m[k], got[1 - k, k])
        if not (lead >= rest + LEAD and lead >= 2 * rest):
            raise MakerError(f"--draw-prompt: the planted logit {float(lead):.3f} at reply step {4 * k + 1} is not "
                             f"{LEAD} above and 2x the largest other ({float(rest):.3f}); try another --seed")
    log(f"[{PROG}] draw prompt: reply {''.join(names.SIGNAL_TOKENS)}</s>: [IMG0] logit {float(got[0, 0]):.2f} vs "
        f"{float(m[0]):.2f}, </s> {float(got[1, 1]):.2f} vs {float(m[1]):.2f}")
    return {"reply": "".join(names.SIGNAL_TOKENS) + names.EOS, "prompt_tokens": len(ids),
            "zeroed": "model.mm_projector.0.weight", "rewritten": [f"lm_head.weight[{first}]",
                                                                    f"lm_head.weight[{eos}]"]}


def make_nextgpt_checkpoint(out, *, llm: str = "tiny", vision: str = "tiny", projector: str = "tiny", seed: int = 0,
                            draw_prompt: str | None = None, log=_log) -> Path:
    """A random NExT-GPT-style checkpoint at `out` (module docstring). With `draw_prompt`, the greedy reply to that
    prompt (any image) is `[IMG0][IMG1][IMG2][IMG3]</s>`: one picture, then the end."""
    import json

    from nxc.model.generator import make_tiny_generator
    from nxc.model.maker import check_out, partial_dir
    from nxc.model.nextgpt import NextGpt, load_nextgpt, save_nextgpt
    from nxc.model.sp_files import llama_sized_sentencepiece
    from nxc.model.sp_tokenizer import SentencePieceOracle
    from nxc.prompt import PromptError, prompt_segments

    out = Path(out)
    config = nextgpt_maker_config(llm, vision, projector)
    if draw_prompt is not None:
        try:
            prompt_segments(draw_prompt, num_image_tokens=1)
        except PromptError as e:
            raise MakerError(f"--draw-prompt: {e}") from None
    n_params = config.llm.vocab_size * config.llm.hidden_size * 2 + config.llm.num_layers * (
        4 * config.llm.hidden_size ** 2 + 3 * config.llm.hidden_size * config.llm.intermediate_size)
    if n_params > MAX_PARAMS:
        raise MakerError(f"--llm {llm}: about {n_params / 1e9:.1f} B parameters; the NExT-GPT maker holds the model "
                         f"in float32 memory and makes at most {MAX_PARAMS / 1e9:.0f} B (a 7B NExT-GPT layout is not "
                         "made yet); choose tiny or tinyllama-1.1b")
    check_out(out, 4 * n_params + (64 << 20))
    log(f"[{PROG}] NExT-GPT-style checkpoint: llm {llm}, vision {vision}, projector {projector}, seed {seed} -> {out}")
    work = partial_dir(out)
    try:
        sp_path = llama_sized_sentencepiece(work / ".tokenizer")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = NextGpt(config=config).eval()
        gen = make_tiny_generator(work / ".generator", seed=seed + 1, context_length=config.projector.num_queries,
                                  cross_attention_dim=config.projector.out_dim)
        save_nextgpt(model, work, tokenizer_model=sp_path, generator_dir=gen)
        record = {"tool": PROG, "family": "nextgpt", "names": {"llm": llm, "vision": vision, "projector": projector},
                  "seed": seed, "generator": "make_tiny_generator(seed + 1)", "draw_prompt": draw_prompt,
                  "draw": None}
        if draw_prompt is not None:
            record["draw"] = plant_drawing(model, SentencePieceOracle.from_dir(work), draw_prompt, log=log)
            save_nextgpt(model, work, tokenizer_model=work / "tokenizer.model", generator_dir=work / "generator")
        cfg = json.loads((work / "config.json").read_text())
        cfg["nxc_maker"] = record
        (work / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.rmtree(work / ".tokenizer")
        shutil.rmtree(work / ".generator")
        load_nextgpt(work)                                    # the written layout must load
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"[{PROG}] wrote {out}")
    return out
