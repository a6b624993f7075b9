"""nxc-demo --scene-out: the generated scene alone, the image the README's nxc-run examples ask about."""
import subprocess
import sys

import numpy as np
from PIL import Image

from nxc.shapes.data import make_scene


def test_scene_out_writes_the_scene_without_annotations_and_needs_no_build_nor_torch(tmp_path):
    out = tmp_path / "sub" / "scene.png"
    code = ("import sys\nsys.modules['torch'] = None\nfrom nxc.demo import main\n"
            f"sys.exit(main(['--seed', '1', '--scene-out', {str(out)!r}, '--build', {str(tmp_path / 'none')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    scene = make_scene(np.random.default_rng(1), max_objects=3)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(scene.image))         # pixel for pixel, nothing drawn
    assert r.stdout.startswith(f"wrote {out}: the generated scene of seed 1, ")
    assert all(o.phrase in r.stdout for o in scene.objects)
    assert not (tmp_path / "none").exists()


def test_a_build_that_draws_is_asked_to_draw_the_scene(shapes_nextgpt_build, tmp_path, capsys):
    """nxc-demo on the shipped NExT-GPT's build: it asks for the scene's objects as a picture (written, 4x) and one
    existence question about the scene."""
    from nxc.demo import main
    from nxc.shapes.generator_data import caption_of
    out = tmp_path / "pic.png"
    assert main(["--seed", "3", "--build", str(shapes_nextgpt_build), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    scene = make_scene(np.random.default_rng(3), max_objects=3)
    caption = caption_of([(o.colour, o.shape) for o in scene.objects])
    assert f"USER      : Draw {caption}." in text and f"ASSISTANT : Sure, {caption}." in text
    assert Image.open(out).size == (256, 256) and f"-> {out} (4x)" in text
    assert f"Is there a {scene.objects[0].phrase} in the image?" in text
