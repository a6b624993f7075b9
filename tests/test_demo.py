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
