"""A CLIP directory's preprocessor_config.json -> the reference's pixels, the manifest's preprocess.clip and the
runtime's pixels, all the same."""
import json
import shutil

import numpy as np
from PIL import Image

from nxc import names
from nxc.model import processing

CONFIG = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
          "crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
          "resample": 2}


def test_preprocessor_config_reaches_the_manifest_and_the_runtime(tiny_ckpt_export, tmp_path):
    from nxc.export.exporter import ExportOptions, export_build
    from nxc.model.reference import ReferenceChat
    from nxc.runtime.pipeline import Pipeline

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt_export, ckpt)
    (ckpt / "clip" / "preprocessor_config.json").write_text(json.dumps(CONFIG))
    build = export_build(ckpt, tmp_path / "build", options=ExportOptions(max_context=256))
    clip = json.loads((build / "manifest.json").read_text())["preprocess"]["clip"]
    assert clip == {"size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "resample": "bilinear",
                    "pad": "white square, centred"}

    pipe, ref = Pipeline.load(build), ReferenceChat.load(ckpt)
    fed, encoded = [], []
    run, encode = pipe.run, ref.model.encode_image
    pipe.run = lambda graph, **feeds: (graph == names.GRAPH_VISION and fed.append(feeds["pixel_values"]),
                                       run(graph, **feeds))[1]
    ref.model.encode_image = lambda px: (encoded.append(px.numpy()), encode(px))[1]
    rng = np.random.default_rng(0)
    for text, boxes, (w, h) in [("hello there", None, (41, 30)), ("What is [0]?", [[3, 4, 20, 30]], (30, 70)),
                                ("Where is the dog?", None, (300, 7))]:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        r, q = pipe.chat(image, text, boxes=boxes, max_new_tokens=12), ref.chat(image, text, boxes=boxes,
                                                                                 max_new_tokens=12)
        assert r.token_ids == q.token_ids, text
        np.testing.assert_allclose(fed[-1], encoded[-1], atol=1e-6)
        assert not np.allclose(fed[-1], processing.clip_pixels(image, 32).numpy(), atol=1e-3)  # not the defaults
