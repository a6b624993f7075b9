"""nxc.diffusion.schedulers against diffusers' own schedulers, built from the same scheduler_config.json: the same
timesteps, the same init_noise_sigma, and the same step on the same model outputs (and, for LCM, the same noise).

Tolerance: 1e-6 of the sample's magnitude. The numpy math is diffusers' op for op in float32 and alphas_cumprod is
bit-equal, but torch's CPU float32 sqrt is not correctly rounded (+-1 ulp on about a fifth of the values) where
numpy's is, so the per-step scalars (sqrt(alpha), sigma) can differ by one ulp: measured <= 3e-7 here.
"""
import numpy as np
import pytest

from nxc.diffusion import SCHEDULERS, DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, make_scheduler
from nxc.diffusion.schedulers import alphas_cumprod

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
        "prediction_type": "epsilon", "timestep_spacing": "leading", "skip_prk_steps": True}
NAMES = ("ddim", "euler", "lcm")
SPACINGS = ("leading", "trailing", "linspace")
STEPS = (1, 4, 20, 50)
TOL = 1e-6


@pytest.fixture(scope="module")
def reference():
    diffusers = pytest.importorskip("diffusers", reason="the diffusers oracle needs the export extra (diffusers, "
                                                        "torch); nxc's numpy schedulers need neither")
    return {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler, "lcm": diffusers.LCMScheduler}


@pytest.fixture
def lcm_noise(monkeypatch):
    """Feed diffusers' LCM step the noise nxc's step draws: its randn_tensor draws from a twin numpy Generator."""
    import diffusers.schedulers.scheduling_lcm as lcm
    import torch

    def use(twin: np.random.Generator):
        monkeypatch.setattr(lcm, "randn_tensor", lambda shape, generator=None, device=None, dtype=None:
                            torch.from_numpy(twin.standard_normal(tuple(shape), dtype=np.float32)))
    return use


def both(reference, name, config, steps):
    ours, ref = make_scheduler(name, config), reference[name].from_config(config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    return ours, ref


def close(ours, ref, what, magnitude=1.0):
    ref = np.asarray(ref, dtype=np.float32)
    err = float(np.abs(ours - ref).max())
    assert err <= TOL * max(magnitude, float(np.abs(ref).max())), f"{what}: max abs diff {err:.3g}"
    return err


@pytest.mark.parametrize("name", NAMES)
def test_alphas_cumprod_are_diffusers_to_the_bit(reference, name):
    ours, ref = make_scheduler(name, SD15), reference[name].from_config(SD15)
    assert np.array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    linear = {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
    assert np.array_equal(make_scheduler(name, linear).alphas_cumprod,
                          reference[name].from_config(linear).alphas_cumprod.numpy())


@pytest.mark.parametrize("name, steps", [(n, s) for n in NAMES for s in STEPS + ((61, 999) if n != "lcm" else ())])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_and_init_noise_sigma_equal_diffusers(reference, name, spacing, steps):
    ours, ref = both(reference, name, {**SD15, "timestep_spacing": spacing}, steps)
    expected = ref.timesteps.numpy()
    if name != "lcm" and spacing == "trailing" and len(expected) == steps + 1:
        assert expected[-1] == -1           # diffusers' float arange overshoots (steps 61, 103, ...); nxc keeps n
        expected = expected[:-1]
    assert ours.timesteps.dtype == expected.dtype and ours.timesteps.tolist() == expected.tolist()
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=TOL)


def configs():
    for spacing in SPACINGS:
        for prediction in ("epsilon", "v_prediction"):
            yield f"sd15-{spacing}-{prediction}", {**SD15, "timestep_spacing": spacing, "prediction_type": prediction}
    yield "linear-clip-alpha1", {"beta_schedule": "linear", "clip_sample": True, "clip_sample_range": 1.5,
                                 "set_alpha_to_one": True, "steps_offset": 0}
    yield "defaults", {}                     # each scheduler's own defaults (LCM's: scaled_linear, 50 original steps)
    yield "lcm-grid", {**SD15, "original_inference_steps": 100, "timestep_scaling": 4.0}


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", [c for _, c in configs()], ids=[i for i, _ in configs()])
@pytest.mark.parametrize("name", NAMES)
def test_step_equals_diffusers_step_for_step(reference, lcm_noise, name, config, steps):
    """From the same sample and random model output, each step's previous sample (and Euler's model input)."""
    ours, ref = both(reference, name, config, steps)
    torch = pytest.importorskip("torch")
    data, seed = np.random.default_rng(steps), 1000 + steps
    rng = np.random.default_rng(seed)
    lcm_noise(np.random.default_rng(seed))
    x = initial = data.standard_normal((2, 4, 8, 8), dtype=np.float32) * np.float32(ours.init_noise_sigma)
    for t, ref_t in zip(ours.timesteps, ref.timesteps):
        model_in = ours.scale_model_input(x, t)
        close(model_in, ref.scale_model_input(torch.from_numpy(x), ref_t), f"model input at t={t}")
        model_output = data.standard_normal(x.shape, dtype=np.float32)
        prev = ours.step(model_output, t, x, rng=rng)
        assert prev.dtype == np.float32 and prev.shape == x.shape
        close(prev, ref.step(torch.from_numpy(model_output), ref_t, torch.from_numpy(x)).prev_sample, f"t={t}",
              magnitude=unclipped_x0(ours, model_output, t, x))
        x = prev
    assert not np.array_equal(x, initial)


def unclipped_x0(scheduler, model_output, t, x) -> float:
    """max |x0| before clip_sample clips it, x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t): the magnitude a clipped
    step's error is made at (at t=999 a random eps makes x0 ~ 1 / sqrt(a_t), 25 for the linear schedule)."""
    if not getattr(scheduler.config, "clip_sample", False):
        return 1.0
    a = float(scheduler.alphas_cumprod[int(t)])
    return float(np.abs((x - np.sqrt(1 - a) * model_output) / np.sqrt(a)).max())


def test_the_registry_names_the_three_schedulers():
    assert SCHEDULERS == {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "lcm": LCMScheduler}
    assert isinstance(make_scheduler("euler", SD15), EulerDiscreteScheduler)
    assert make_scheduler("ddim", SD15).config.steps_offset == 1      # read; `_class_name`, skip_prk_steps ignored


def test_lcm_one_step_needs_no_rng_and_ddim_none_ever():
    lcm = LCMScheduler()
    lcm.set_timesteps(1)
    x = np.ones((1, 4, 2, 2), np.float32)
    assert lcm.step(x, lcm.timesteps[0], x).shape == x.shape
    ddim = DDIMScheduler.from_config(SD15)
    ddim.set_timesteps(4)
    assert ddim.step(x, ddim.timesteps[0], x).dtype == np.float32


def test_the_schedule_is_numpy_only():
    ac = alphas_cumprod(DDIMScheduler.from_config(SD15).config)
    assert ac.dtype == np.float32 and ac.shape == (1000,) and np.all(np.diff(ac) < 0)


@pytest.mark.parametrize("name, config, steps, error", [
    ("ddim", SD15, 0, "num_inference_steps must be a whole number in 1..1000 (num_train_timesteps), got 0"),
    ("euler", SD15, -3, "num_inference_steps must be a whole number in 1..1000 (num_train_timesteps), got -3"),
    ("ddim", SD15, 1001, "num_inference_steps must be a whole number in 1..1000 (num_train_timesteps), got 1001"),
    ("ddim", SD15, 2.5, "num_inference_steps must be a whole number in 1..1000 (num_train_timesteps), got 2.5"),
    ("euler", SD15, True, "num_inference_steps must be a whole number in 1..1000 (num_train_timesteps), got True"),
    ("lcm", SD15, 51, "num_inference_steps must be a whole number in 1..50 (original_inference_steps), got 51"),
    ("ddim", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 4,
     "beta_schedule must be one of 'linear', 'scaled_linear' (what nxc's numpy schedulers implement), got "
     "'squaredcos_cap_v2'"),
    ("euler", {**SD15, "prediction_type": "sample"}, 4,
     "prediction_type must be one of 'epsilon', 'v_prediction' (what nxc's numpy schedulers implement), got 'sample'"),
    ("lcm", {**SD15, "prediction_type": "sample"}, 4, "prediction_type must be one of 'epsilon', 'v_prediction'"),
    ("ddim", {**SD15, "timestep_spacing": "karras"}, 4, "timestep_spacing must be one of 'leading', 'trailing', "
                                                        "'linspace'"),
    ("ddim", {**SD15, "thresholding": True}, 4,
     "scheduler config sets thresholding=True; nxc's numpy DDIMScheduler implements only thresholding=False"),
    ("euler", {**SD15, "use_karras_sigmas": True}, 4, "scheduler config sets use_karras_sigmas=True;"),
    ("euler", {**SD15, "trained_betas": [0.1, 0.2]}, 4, "scheduler config sets trained_betas=[0.1, 0.2];"),
    ("ddim", {**SD15, "beta_start": 0.02, "beta_end": 0.01}, 4,
     "beta_start and beta_end must be numbers with 0 <= beta_start <= beta_end < 1, got 0.02 and 0.01"),
    ("ddim", {**SD15, "steps_offset": -1}, 4, "steps_offset must be a whole number >= 0, got -1"),
    ("ddim", {**SD15, "clip_sample": "yes"}, 4, "clip_sample must be true or false, got 'yes'"),
    ("lcm", {**SD15, "original_inference_steps": 2000}, 4,
     "original_inference_steps must be a whole number in 1..num_train_timesteps (1000), got 2000"),
    ("pndm", SD15, 4, "unknown scheduler 'pndm': expected one of 'ddim', 'euler', 'lcm'"),
])
def test_bad_configs_and_steps_are_refused_in_one_line(name, config, steps, error):
    with pytest.raises(ValueError) as e:
        make_scheduler(name, config).set_timesteps(steps)
    assert str(e.value).startswith(error) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name, call, error", [
    ("ddim", lambda s, x: s.step(x, 981, x), "DDIMScheduler: call set_timesteps(num_inference_steps) before stepping"),
    ("euler", lambda s, x: s.init_noise_sigma, "EulerDiscreteScheduler: call set_timesteps(num_inference_steps)"),
    ("euler", lambda s, x: (s.set_timesteps(4), s.scale_model_input(x, 500))[1],
     "timestep 500 is not one of this scheduler's 4 timesteps (999.0 .. 0.0); step with the values of .timesteps"),
    ("ddim", lambda s, x: (s.set_timesteps(4), s.step(x, -1, x))[1], "timestep -1 is not one of this scheduler's"),
    ("lcm", lambda s, x: (s.set_timesteps(4), s.step(x, s.timesteps[0], x))[1],
     "LCMScheduler.step needs rng, a numpy Generator, for the noise between steps (e.g. "
     "np.random.default_rng(seed)); got None"),
])
def test_misuse_is_refused_in_one_line(name, call, error):
    config = {**SD15, "timestep_spacing": "linspace"} if name == "euler" else SD15
    with pytest.raises((ValueError, RuntimeError)) as e:
        call(make_scheduler(name, config), np.zeros((1, 4, 2, 2), np.float32))
    assert str(e.value).startswith(error) and "\n" not in str(e.value), str(e.value)


def test_a_config_that_is_not_a_mapping_is_refused():
    with pytest.raises(TypeError, match="a scheduler config must be a mapping"):
        make_scheduler("ddim", ["beta_start", 0.00085])
