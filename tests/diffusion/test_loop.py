"""nxc.diffusion.loop: seeded initial latents, classifier-free guidance, and `sample`, the loop diffusers'
text-to-image pipelines run, against that loop written with diffusers' schedulers on the same fake model."""
import numpy as np
import pytest

from nxc.diffusion import classifier_free, guide, initial_latents, make_scheduler, sample

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon",
        "timestep_spacing": "leading"}
SHAPE = (2, 4, 8, 8)


def fake_model(x: np.ndarray, t) -> np.ndarray:
    """A fixed 'UNet' for [2B] = [uncond, cond] or [B] = cond batches: 0.1 x + t / 1000, the cond rows + 0.05."""
    noise = np.float32(0.1) * x + np.float32(float(t) / 1000)
    return noise + np.float32(0.05) * (np.arange(x.shape[0]) >= x.shape[0] - SHAPE[0]).reshape(-1, 1, 1, 1)


def diffusers_loop(scheduler, latents, steps, guidance, torch):
    """StableDiffusionPipeline.__call__'s denoising loop, model and all but the model (fake_model, in numpy)."""
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(latents) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if guidance > 1 else latents
        model_in = scheduler.scale_model_input(model_in, t)
        noise = torch.from_numpy(fake_model(model_in.numpy(), t.item()))
        if guidance > 1:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents.numpy()


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("name, spacing", [("ddim", "leading"), ("ddim", "trailing"), ("euler", "leading"),
                                           ("euler", "linspace"), ("lcm", "leading")])
def test_sample_equals_the_diffusers_pipeline_loop(monkeypatch, name, spacing, steps, guidance):
    diffusers = pytest.importorskip("diffusers", reason="the diffusers oracle needs the export extra (diffusers, "
                                                        "torch); nxc's numpy loop needs neither")
    import diffusers.schedulers.scheduling_lcm as lcm
    import torch
    twin = np.random.default_rng(3)        # diffusers' LCM draws the noise nxc's draws (from default_rng(3))
    monkeypatch.setattr(lcm, "randn_tensor", lambda shape, generator=None, device=None, dtype=None:
                        torch.from_numpy(twin.standard_normal(tuple(shape), dtype=np.float32)))
    classes = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
               "lcm": diffusers.LCMScheduler}
    config = {**SD15, "timestep_spacing": spacing}
    latents = initial_latents(SHAPE, seed=11)
    ours = sample(fake_model, latents, make_scheduler(name, config), steps, guidance, rng=np.random.default_rng(3))
    ref = diffusers_loop(classes[name].from_config(config), latents, steps, guidance, torch)
    assert ours.dtype == np.float32 and ours.shape == SHAPE
    # one step agrees to 1e-6 of the magnitude (test_schedulers); over up to 50 chained steps the one-ulp
    # differences add up: measured <= 1.0e-6 of the magnitude here (DDIM, 50 steps: 4.2e-5 on 42), allowed 1e-5
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-5 * max(1.0, float(np.abs(ref).max())), f"max abs diff {err:.3g}"


def test_the_denoise_contract_batches_uncond_then_cond_only_when_guiding():
    seen, progress = [], []

    def denoise(x, t):
        seen.append((x.shape, type(t)))
        return np.zeros_like(x)
    scheduler = make_scheduler("euler", SD15)
    sample(denoise, initial_latents(SHAPE, 0), scheduler, 3, 7.5, on_step=lambda i, n: progress.append((i, n)))
    sample(denoise, initial_latents(SHAPE, 0), scheduler, 2, 1.0)
    assert seen == [((4, 4, 8, 8), np.float32)] * 3 + [(SHAPE, np.float32)] * 2
    assert progress == [(0, 3), (1, 3), (2, 3)]
    assert classifier_free(7.5) and not classifier_free(1.0) and not classifier_free(0)


def test_same_seed_same_latents_and_picture():
    a, b = initial_latents(SHAPE, 5), initial_latents([2, 4, 8, 8], 5)
    assert a.dtype == np.float32 and a.shape == SHAPE and np.array_equal(a, b)
    assert np.array_equal(a, np.random.default_rng(5).standard_normal(SHAPE, dtype=np.float32))
    assert not np.array_equal(a, initial_latents(SHAPE, 6))
    runs = [sample(fake_model, a, make_scheduler("lcm", SD15), 4, 1.0, rng=np.random.default_rng(9))
            for _ in range(2)]
    assert np.array_equal(*runs)


def test_guide_is_classifier_free_guidance():
    u, c = np.full((1, 2), 1.0, np.float32), np.full((1, 2), 3.0, np.float32)
    assert guide(u, c, 7.5).tolist() == [[16.0, 16.0]] and guide(u, c, 7.5).dtype == np.float32
    assert np.array_equal(guide(u, c, 1.0), c) and np.array_equal(guide(u, c, 0), u)


@pytest.mark.parametrize("call, error", [
    (lambda: guide(np.zeros(2), np.zeros(2), -1.0),
     "guidance must be a finite number >= 0 (<= 1: no classifier-free guidance; SD's default 7.5), got -1.0"),
    (lambda: guide(np.zeros(2), np.zeros(2), float("nan")), "guidance must be a finite number >= 0"),
    (lambda: guide(np.zeros(2), np.zeros(3), 2.0),
     "guide needs the unconditional and conditional predictions in one shape, got [2] and [3]"),
    (lambda: sample(fake_model, np.zeros(SHAPE), make_scheduler("ddim", SD15), 4, float("inf")),
     "guidance must be a finite number >= 0"),
    (lambda: sample(fake_model, np.zeros(SHAPE), make_scheduler("ddim", SD15), 0, 7.5),
     "num_inference_steps must be a whole number in 1..1000 (num_train_timesteps), got 0"),
    (lambda: sample(lambda x, t: x[:1], np.zeros(SHAPE), make_scheduler("ddim", SD15), 2, 7.5),
     "denoise returned shape [1, 4, 8, 8] for an input of shape [4, 4, 8, 8] at timestep 501; it must return"),
    (lambda: sample(fake_model, np.zeros(SHAPE), make_scheduler("lcm", SD15), 4, 1.0),
     "LCMScheduler.step needs rng, a numpy Generator"),
    (lambda: initial_latents(SHAPE, -1), "seed must be a whole number >= 0, got -1"),
    (lambda: initial_latents((2, 0, 8), 1), "latent shape must be a non-empty sequence of whole numbers >= 1, got"),
])
def test_bad_input_is_refused_in_one_line(call, error):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(error) and "\n" not in str(e.value), str(e.value)
