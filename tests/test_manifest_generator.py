"""The manifest's generator entry (nxc.manifest_generator): a build with the tiny generator's graphs round-trips
through load_manifest, a build without one loads as before, and an entry the runtime could not rely on is refused in
one line naming the field."""
import json
import shutil

import numpy as np
import pytest

from nxc.config import GENERATOR_SIZES
from nxc.manifest import BuildError, load_manifest, parse_manifest, write_manifest
from nxc.specs import generator_specs

FIX = "; re-export the build with this nxc-export"


def _write(build, data) -> None:
    data = {k: v for k, v in data.items() if k not in ("schema", "files")}
    write_manifest(build, data)


@pytest.fixture
def drawing_build(tiny_build, tiny_generator_fp32, tmp_path):
    """The tiny NExT-Chat build with the tiny generator's graphs, uncond.npy and entry added as an exporter would,
    and a batch axis up to 2 (the denoiser's [uncond, cond] call)."""
    out, result = tiny_generator_fp32
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    for rec in result.graphs.values():
        shutil.copy(out / rec["file"], build / rec["file"])
    shutil.copy(out / "uncond.npy", build / "uncond.npy")
    data = json.loads((build / "manifest.json").read_text())
    data["graphs"].update(result.graphs)
    data["generator"] = result.entry
    data["axes"]["batch"] = [1, 1, 2]
    _write(build, data)
    return build


def test_the_generator_entry_round_trips(drawing_build, tiny_generator_fp32):
    _, result = tiny_generator_fp32
    m = load_manifest(drawing_build)
    g = m.generator
    assert g.sizes == GENERATOR_SIZES["tiny"] and (g.denoiser, g.decoder) == ("denoiser", "latent_decoder")
    assert (g.default_scheduler, g.default_steps, g.default_guidance, g.pixel_format) == ("ddim", 50, 7.5, "rgb01")
    assert dict(g.scheduler) == result.entry["scheduler"] and g.to_dict() == result.entry
    assert m.to_dict() == json.loads((drawing_build / "manifest.json").read_text())
    assert parse_manifest(m.to_dict(), m.root) == m
    assert m.graph_spec(g.denoiser) == generator_specs(g.sizes)["denoiser"]
    assert np.load(m.path(g.uncond_file)).shape == (1, g.sizes.context_length, g.sizes.cross_attention_dim)
    assert m.files[g.uncond_file].bytes == (drawing_build / "uncond.npy").stat().st_size


def test_a_build_without_a_generator_loads_as_before(tiny_build):
    m = load_manifest(tiny_build)
    assert m.generator is None and "generator" not in m.to_dict()


def _set(path, value):
    """change(data) setting data[path...] = value (None: delete it)."""
    def change(data):
        *outer, last = path
        d = data
        for k in outer:
            d = d[k]
        if value is None:
            del d[last]
        else:
            d[last] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set(("generator", "uncond_file"), "missing.npy"),
     "generator.uncond_file: 'missing.npy' is not listed under files, so its sha256 cannot be checked"),
    (_set(("generator", "sizes", "latent_height"), 16),
     "generator.denoiser: graph denoiser's tensors [('sample', 'float32', ['batch', 4, 8, 8])"),
    (_set(("generator", "sizes", "scaling_factor"), -1),
     "generator.sizes.scaling_factor: expected a number > 0, found -1"),
    (_set(("generator", "decoder"), "denoiser"),
     "generator.decoder: graph denoiser's tensors"),
    (_set(("generator", "denoiser"), "unet"),
     "generator.denoiser: 'unet' is not a graph of this build"),
    (_set(("generator", "default_scheduler"), "plms"),
     "generator.default_scheduler: 'plms' is not a sampler nxc has (ddim, euler, lcm)"),
    (_set(("generator", "default_steps"), 0), "generator.default_steps: expected an integer between 1 and 1000"),
    (_set(("generator", "default_guidance"), -2), "generator.default_guidance: expected a number >= 0, found -2"),
    (_set(("generator", "pixel_format"), "rgb255"),
     "generator.pixel_format: 'rgb255' is not a pixel format nxc writes (rgb01)"),
    (_set(("generator", "scheduler", "prediction_type"), "v_prediction"),
     "generator.scheduler.prediction_type: 'v_prediction' is not a prediction type nxc's samplers take (epsilon)"),
    (_set(("generator", "scheduler", "num_train_timesteps"), None), "generator.scheduler.num_train_timesteps: missing"),
    (_set(("generator", "guidance"), 7.5), "generator.guidance: unknown field"),
    (_set(("axes", "batch"), [1, 1, 1]),
     "generator: the denoiser is called with 2 rows (unconditional, conditional), but axes.batch is [1, 1, 1]"),
    (_set(("graphs", "denoiser"), None), "generator.denoiser: 'denoiser' is not a graph of this build"),
])
def test_a_bad_generator_entry_is_refused_in_one_line(drawing_build, change, message):
    data = json.loads((drawing_build / "manifest.json").read_text())
    change(data)
    _write(drawing_build, data)
    with pytest.raises(BuildError) as e:
        load_manifest(drawing_build)
    text = str(e.value)
    assert text.startswith(f"{drawing_build / 'manifest.json'}: {message}"), text
    assert text.endswith(FIX) and "\n" not in text


@pytest.mark.parametrize("array, found", [
    (np.zeros((1, 77, 16), np.float32), "float32 [1, 77, 16]"),
    (np.zeros((1, 77, 32), np.float16), "float16 [1, 77, 32]"),
])
def test_an_uncond_file_of_another_shape_is_refused(drawing_build, array, found):
    np.save(drawing_build / "uncond.npy", array)
    _write(drawing_build, json.loads((drawing_build / "manifest.json").read_text()))    # hashes of the new file
    with pytest.raises(BuildError) as e:
        load_manifest(drawing_build)
    assert str(e.value) == (f"{drawing_build / 'uncond.npy'}: {found}, but generator.sizes gives float32 [1, 77, 32]; "
                            "the unconditional conditioning is not this generator's, re-export the build")
