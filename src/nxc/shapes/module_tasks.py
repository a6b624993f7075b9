"""VITRON-style module-call tasks on shapes scenes (issue 29: the embedded VITRON, `embedded:shapes-vitron`).

A request about the scene is answered with one VITRON call (nxc.module_calls), the region grounded by the model's own
box head (`<at> <boxes>`, trained like a REC answer) or copied from the user's box (`[0]`):

- module_segment:  "Segment the red circle."                -> <module>B</module><instruction>segmentation: the red
                                                               circle</instruction><region><at> <boxes></region>
- module_track:    "Track the red circle through the video." -> <module>E</module><instruction>video segmentation: ...
- module_edit:     "Replace the red circle with a blue star." -> <module>C</module><instruction>editing: a blue
                                                               star</instruction><region><at> <boxes></region>
                                                               (the box: the red circle's)
- module_generate: "Draw a blue star." / "Draw a blue star in [0]." + a box
                                                            -> <module>A</module><instruction>image generation: a blue
                                                               star</instruction>[<region>[0]</region>]

The module names are VITRON's (A generation, B segmentation, C editing, E video segmentation); MODULES is the
manifest table a build of this model carries. Torch-free.
"""
from __future__ import annotations

import numpy as np

from nxc.prompt import SLOT
from nxc.shapes.data import COLOURS, SHAPES, Sample, Scene, _pick

MODULE_TASKS = ("module_segment", "module_track", "module_edit", "module_generate")
MODULE_OF = {"module_segment": "B", "module_track": "E", "module_edit": "C", "module_generate": "A"}
MODULES = {"grammar": "vitron", "region": "pixels",
           "calls": {"A": {"task": "image generation", "backend": "generate"},
                     "B": {"task": "image segmentation", "backend": "segment"},
                     "C": {"task": "image editing", "backend": "edit"},
                     "E": {"task": "video segmentation", "backend": "track"}}}
SEGMENT_TEMPLATES = ("Segment the <expr>.", "Please segment the <expr> in the image.", "Can you segment the <expr>?",
                     "Give me a mask of the <expr>.")
TRACK_TEMPLATES = ("Track the <expr>.", "Track the <expr> through the video.", "Follow the <expr> in the video.",
                   "Segment the <expr> in every frame.")
EDIT_TEMPLATES = ("Replace the <expr> with a <new>.", "Change the <expr> into a <new>.",
                  "Turn the <expr> into a <new>.", "Edit the image: make the <expr> a <new>.")
GENERATE_TEMPLATES = ("Draw a <new>.", "Generate a picture of a <new>.", "Please draw a <new>.",
                      "Make an image of a <new>.")
GENERATE_IN_TEMPLATES = ("Draw a <new> in [0].", "Generate a <new> in region [0].", "Please draw a <new> at [0].")


def call_text(module: str, task: str, text: str, region: str | None = None) -> str:
    """The VITRON call a reply writes."""
    tail = "" if region is None else f"<region>{region}</region>"
    return f"<module>{module}</module><instruction>{task}: {text}</instruction>{tail}"


def _absent(rng, scene: Scene) -> tuple[str, str]:
    have = {(o.colour, o.shape) for o in scene.objects}
    free = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in have]
    return _pick(rng, free)


def module_sample(rng: np.random.Generator, task: str, scene: Scene) -> Sample:
    """One request of `task` about `scene` and the call that answers it."""
    if task in ("module_segment", "module_track"):
        o = _pick(rng, scene.objects)
        q = _pick(rng, SEGMENT_TEMPLATES if task == "module_segment" else TRACK_TEMPLATES)
        kind = "segmentation" if task == "module_segment" else "video segmentation"
        answer = call_text(MODULE_OF[task], kind, f"the {o.phrase}", SLOT)
        return Sample(task, scene.image, q.replace("<expr>", o.phrase), answer, answer_objects=[o], target=o)
    if task == "module_edit":
        o = _pick(rng, scene.objects)
        new = " ".join(_absent(rng, scene))
        q = _pick(rng, EDIT_TEMPLATES).replace("<expr>", o.phrase).replace("<new>", new)
        return Sample(task, scene.image, q, call_text("C", "editing", f"a {new}", SLOT), answer_objects=[o],
                      target=o)
    if task == "module_generate":
        new = " ".join(_absent(rng, scene))
        if rng.random() < 0.5:
            return Sample(task, scene.image, _pick(rng, GENERATE_TEMPLATES).replace("<new>", new),
                          call_text("A", "image generation", f"a {new}"))
        w, h = scene.image.size
        x1, y1 = rng.uniform(0, 0.6) * w, rng.uniform(0, 0.6) * h
        box = (x1, y1, x1 + rng.uniform(0.2, 0.4) * w, y1 + rng.uniform(0.2, 0.4) * h)
        return Sample(task, scene.image, _pick(rng, GENERATE_IN_TEMPLATES).replace("<new>", new),
                      call_text("A", "image generation", f"a {new}", "[0]"), boxes_in=[box])
    raise ValueError(f"unknown module task {task!r}; expected one of {MODULE_TASKS}")
