"""Diffusers' DDIM, Euler (discrete) and LCM schedulers in numpy, each an object with two verbs (STYLE 16):

    scheduler = make_scheduler("ddim", json.load(open("scheduler/scheduler_config.json")))
    scheduler.set_timesteps(20)                      # .timesteps: diffusers' exact values, first = noisiest
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)     # identity for DDIM / LCM; x / sqrt(sigma^2 + 1) for Euler
        x = scheduler.step(model(x_in, t), t, x)     # -> the previous (less noisy) sample

The math follows diffusers 0.42 op for op, in its dtypes: betas as torch.linspace makes them in float32 (a fused
multiply-add from whichever end is nearer), alphas_cumprod accumulated in float64 and kept as float32 (as torch's CPU
cumprod does), every step in float32. On the same model outputs the numpy and the diffusers steps then agree to the
last bit on a CPU, and within 1e-6 anywhere. Samples are [B, C, H, W] (any shape works) float32; other dtypes are
cast to float32. `step` takes the timestep it was given by `.timesteps`; Euler and LCM look its position up there
(diffusers keeps a step counter instead: the same position, as the timesteps never repeat).

Implemented: beta_schedule "linear" / "scaled_linear", prediction_type "epsilon" / "v_prediction", timestep_spacing
"leading" / "trailing" / "linspace", deterministic DDIM (eta 0). Config keys that would change the math in a way
not implemented here (thresholding, karras sigmas, ...) are refused in one line; keys no scheduler here reads
(`_class_name`, PNDM's `skip_prk_steps`, ...) are ignored, as diffusers ignores them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

F32 = np.float32
BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers config keys whose other values change the math in ways not implemented here: key -> the value nxc does
UNSUPPORTED = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False,
               "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
               "interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero"}


def _whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _number(v) -> bool:
    return (_whole(v) or isinstance(v, (float, np.floating))) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """The keys of a diffusers scheduler_config.json that the schedulers here read, with diffusers' defaults."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        if not (_whole(self.num_train_timesteps) and self.num_train_timesteps >= 1):
            raise ValueError(f"num_train_timesteps must be a whole number >= 1, got {self.num_train_timesteps!r}")
        if not (_number(self.beta_start) and _number(self.beta_end) and 0 <= self.beta_start <= self.beta_end < 1):
            raise ValueError(f"beta_start and beta_end must be numbers with 0 <= beta_start <= beta_end < 1, got "
                             f"{self.beta_start!r} and {self.beta_end!r}")
        for key, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                             ("timestep_spacing", TIMESTEP_SPACINGS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))} (what nxc's numpy "
                                 f"schedulers implement), got {getattr(self, key)!r}")
        if not (_whole(self.steps_offset) and self.steps_offset >= 0):
            raise ValueError(f"steps_offset must be a whole number >= 0, got {self.steps_offset!r}")


@dataclass(frozen=True, kw_only=True)
class DDIMConfig(ScheduleConfig):
    set_alpha_to_one: bool = True      # the alphas_cumprod "before step 0": 1, or alphas_cumprod[0]
    clip_sample: bool = True           # clip the predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        for key in ("set_alpha_to_one", "clip_sample"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not (_number(self.clip_sample_range) and self.clip_sample_range > 0):
            raise ValueError(f"clip_sample_range must be a number > 0, got {self.clip_sample_range!r}")


@dataclass(frozen=True, kw_only=True)
class EulerConfig(ScheduleConfig):
    timestep_spacing: str = "linspace"


@dataclass(frozen=True, kw_only=True)
class LCMConfig(DDIMConfig):
    """LCM reads neither timestep_spacing nor steps_offset (diffusers' LCMScheduler does not either)."""
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    clip_sample: bool = False
    original_inference_steps: int = 50   # the distillation's timestep grid, which the inference steps subsample
    timestep_scaling: float = 10.0       # scales t in the consistency boundary condition (c_skip, c_out)

    def __post_init__(self):
        super().__post_init__()
        if not (_whole(self.original_inference_steps) and 1 <= self.original_inference_steps
                <= self.num_train_timesteps):
            raise ValueError(f"original_inference_steps must be a whole number in 1..num_train_timesteps "
                             f"({self.num_train_timesteps}), got {self.original_inference_steps!r}")
        if not (_number(self.timestep_scaling) and self.timestep_scaling > 0):
            raise ValueError(f"timestep_scaling must be a number > 0, got {self.timestep_scaling!r}")


def _torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) to the bit: a float32 step, then fma(step, i, start) for the
    first half and fma(-step, n - 1 - i, end) for the second (a float64 product and sum is exact enough)."""
    start, end = F32(start), F32(end)
    if n == 1:
        return np.array([start], dtype=F32)
    step = np.float64((end - start) / F32(n - 1))
    i = np.arange(n)
    return np.where(i < n // 2, start + step * i, end - step * (n - 1 - i)).astype(F32)


def alphas_cumprod(config: ScheduleConfig) -> np.ndarray:
    """[num_train_timesteps] float32: prod_{s<=t} (1 - beta_s), the signal fraction alpha-bar_t of DDPM/DDIM."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = _torch_linspace(config.beta_start, config.beta_end, n)
    else:                                                   # "scaled_linear": linear in sqrt(beta)
        root = _torch_linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n)
        betas = root * root
    return np.cumprod((F32(1) - betas).astype(np.float64)).astype(F32)


def spaced_timesteps(config: ScheduleConfig, n: int) -> np.ndarray:
    """[n] float64, noisiest first, diffusers' `timestep_spacing` (arXiv 2305.08891, table 2); "linspace" is not
    rounded here (DDIM rounds it, Euler keeps the fractions). Note diffusers' DDIM still steps to t - train // n
    for "trailing" and "linspace" (diffusers issue 12633), and so does nxc's: the parity is the point."""
    train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, train - 1, n)[::-1].copy()
    if config.timestep_spacing == "leading":
        return (np.arange(0, n) * (train // n)).round()[::-1] + config.steps_offset
    # "trailing": for some n (61, 103, ...) diffusers' float arange yields an (n+1)-th timestep, -1; nxc keeps n
    return np.round(np.arange(train, 0, -train / n))[:n] - 1


def _check_steps(num_inference_steps, most: int, what: str) -> int:
    if not (_whole(num_inference_steps) and 1 <= num_inference_steps <= most):
        raise ValueError(f"num_inference_steps must be a whole number in 1..{most} ({what}), got "
                         f"{num_inference_steps!r}")
    return int(num_inference_steps)


class _Scheduler:
    """What the three share: the config, alphas_cumprod and the state set_timesteps makes."""
    config_class: type[ScheduleConfig] = ScheduleConfig

    def __init__(self, **config):
        self.config = self.config_class(**config)
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray | None = None

    @classmethod
    def from_config(cls, config: Mapping):
        """From a diffusers scheduler_config.json, as a dict: the keys this scheduler reads are taken, keys that
        would need math not implemented here are refused, the rest ignored."""
        if not isinstance(config, Mapping):
            raise TypeError(f"a scheduler config must be a mapping (scheduler_config.json's object), got "
                            f"{type(config).__name__}")
        for key, supported in UNSUPPORTED.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"scheduler config sets {key}={config[key]!r}; nxc's numpy {cls.__name__} "
                                 f"implements only {key}={supported!r}")
        names = {f.name for f in fields(cls.config_class)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def scale_model_input(self, sample: np.ndarray, t) -> np.ndarray:
        """The model's input at timestep t; DDIM and LCM feed the sample as it is."""
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
        """`original` noised to training timestep t: sqrt(a_t) x + sqrt(1 - a_t) noise, float32 (diffusers'
        DDPM-family add_noise; GLIGEN's inpainting blends it outside the edited region every step)."""
        a = self.alphas_cumprod[int(t)]
        return np.sqrt(a) * _f32(original) + np.sqrt(F32(1) - a) * _f32(noise)

    def _require_timesteps(self):
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")

    def _index(self, t) -> int:
        """t's position in .timesteps (diffusers' step index)."""
        self._require_timesteps()
        hits = np.flatnonzero(self.timesteps == t)
        if hits.size == 0:
            raise ValueError(f"timestep {t} is not one of this scheduler's {self.timesteps.size} timesteps "
                             f"({self.timesteps[0]} .. {self.timesteps[-1]}); step with the values of .timesteps")
        return int(hits[0])

    def _x0_and_eps(self, model_output, sample, alpha_prod_t):
        """The predicted clean sample x0 and noise eps, from eps or v = sqrt(a) eps - sqrt(1 - a) x0."""
        sqrt_a, sqrt_b = np.sqrt(alpha_prod_t), np.sqrt(F32(1) - alpha_prod_t)
        if self.config.prediction_type == "epsilon":
            return (sample - sqrt_b * model_output) / sqrt_a, model_output
        return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=F32)


class DDIMScheduler(_Scheduler):
    """DDIM (arXiv 2010.02502) with eta 0: deterministic, x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    config_class = DDIMConfig
    init_noise_sigma = 1.0

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = F32(1) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        """.timesteps: [n] int64, noisiest first."""
        n = _check_steps(num_inference_steps, self.config.num_train_timesteps, "num_train_timesteps")
        self.num_inference_steps = n
        self.timesteps = spaced_timesteps(self.config, n).round().astype(np.int64)

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, *, rng=None) -> np.ndarray:
        """-> the sample at t - num_train_timesteps // n (diffusers' rule, for every spacing); rng is unused."""
        self._index(t)                                   # t must be one of .timesteps
        model_output, sample = _f32(model_output), _f32(sample)
        prev_t = int(t) - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[int(t)]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x0, eps = self._x0_and_eps(model_output, sample, alpha_prod_t)
        if self.config.clip_sample:
            x0 = np.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range).astype(F32)
        return np.sqrt(alpha_prod_prev) * x0 + np.sqrt(F32(1) - alpha_prod_prev) * eps


class EulerDiscreteScheduler(_Scheduler):
    """Euler's method on the probability-flow ODE in sigma (Karras et al., arXiv 2206.00364; k-diffusion's
    sample_euler): sigma_t = sqrt((1 - a_t) / a_t), x_next = x + (x - x0) / sigma * (sigma_next - sigma), with
    sigma interpolated linearly at the (possibly fractional) timesteps and a final sigma of 0."""
    config_class = EulerConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.sigmas: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """.timesteps: [n] float32, noisiest first (diffusers' values: "linspace" ones are fractional, and the
        model is given them so); .sigmas: [n + 1] float32, ending in 0."""
        n = _check_steps(num_inference_steps, self.config.num_train_timesteps, "num_train_timesteps")
        timesteps = spaced_timesteps(self.config, n).astype(F32)
        ac = self.alphas_cumprod
        sigmas = np.interp(timesteps, np.arange(ac.size), np.sqrt((F32(1) - ac) / ac))
        self.num_inference_steps = n
        self.timesteps = timesteps
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)

    @property
    def init_noise_sigma(self) -> np.float32:
        """The initial noise's scale: sigma_max for "linspace" / "trailing", sqrt(sigma_max^2 + 1) for "leading"
        (diffusers' rule: a "leading" grid never reaches the last training step)."""
        self._require_timesteps()
        sigma_max = self.sigmas.max()
        return sigma_max if self.config.timestep_spacing != "leading" else np.sqrt(sigma_max * sigma_max + F32(1))

    def scale_model_input(self, sample: np.ndarray, t) -> np.ndarray:
        """x / sqrt(sigma_t^2 + 1): the model was trained on unit-variance inputs x_t = sqrt(a) x0 + sqrt(1-a) eps."""
        sigma = self.sigmas[self._index(t)]
        return _f32(sample) / np.sqrt(sigma * sigma + F32(1))

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t) -> np.ndarray:
        """x + sigma_t noise, sigma_t at t's place in .timesteps (diffusers' Euler add_noise inside a sampling loop)."""
        return _f32(original) + _f32(noise) * self.sigmas[self._index(t)]

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, *, rng=None) -> np.ndarray:
        """-> the sample at the next sigma (rng is unused: no churn)."""
        i = self._index(t)
        model_output, sample = _f32(model_output), _f32(sample)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:
            x0 = model_output * (-sigma / np.sqrt(sigma * sigma + F32(1))) + sample / (sigma * sigma + F32(1))
        derivative = (sample - x0) / sigma
        return sample + derivative * (sigma_next - sigma)


class LCMScheduler(_Scheduler):
    """Latent Consistency Models' multi-step sampling (arXiv 2310.04378): each step predicts x0, applies the
    consistency boundary condition denoised = c_out x0 + c_skip x, and, but for the last step, noises it back to
    the next timestep with fresh noise: x_prev = sqrt(a_prev) denoised + sqrt(1 - a_prev) z."""
    config_class = LCMConfig
    init_noise_sigma = 1.0
    sigma_data = F32(0.5)

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = F32(1) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        """.timesteps: [n] int64, a subsample of the distillation grid k - 1, 2k - 1, ... (k = train // original)."""
        original = self.config.original_inference_steps
        n = _check_steps(num_inference_steps, original, "original_inference_steps")
        k = self.config.num_train_timesteps // original
        grid = (np.arange(1, original + 1) * k - 1)[::-1]
        self.num_inference_steps = n
        self.timesteps = grid[np.floor(np.linspace(0, original, num=n, endpoint=False)).astype(np.int64)]

    def boundary_scalings(self, t) -> tuple[np.float32, np.float32]:
        """(c_skip, c_out) at t, in float32 as diffusers computes them from a tensor timestep."""
        scaled = F32(t) * F32(self.config.timestep_scaling)
        sd2 = self.sigma_data * self.sigma_data
        return sd2 / (scaled * scaled + sd2), scaled / np.sqrt(scaled * scaled + sd2)

    def step(self, model_output: np.ndarray, t, sample: np.ndarray, *, rng: np.random.Generator | None = None
             ) -> np.ndarray:
        """-> the sample at the next timestep; every step but the last draws z = rng.standard_normal(sample.shape,
        float32), so rng (a numpy Generator) is required when there is more than one step."""
        i = self._index(t)
        model_output, sample = _f32(model_output), _f32(sample)
        prev_t = self.timesteps[i + 1] if i + 1 < self.timesteps.size else t
        alpha_prod_t = self.alphas_cumprod[int(t)]
        alpha_prod_prev = self.alphas_cumprod[int(prev_t)] if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self.boundary_scalings(t)
        x0, _ = self._x0_and_eps(model_output, sample, alpha_prod_t)
        if self.config.clip_sample:
            x0 = np.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range).astype(F32)
        denoised = c_out * x0 + c_skip * sample
        if i == self.num_inference_steps - 1:
            return denoised
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"LCMScheduler.step needs rng, a numpy Generator, for the noise between steps "
                             f"(e.g. np.random.default_rng(seed)); got {rng!r}")
        z = rng.standard_normal(sample.shape, dtype=F32)
        return np.sqrt(alpha_prod_prev) * denoised + np.sqrt(F32(1) - alpha_prod_prev) * z


SCHEDULERS: dict[str, type[_Scheduler]] = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
                                           "lcm": LCMScheduler}


def make_scheduler(name: str, config: Mapping):
    """SCHEDULERS[name].from_config(config): e.g. ("euler", SD-1.5's scheduler_config.json as a dict)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: expected one of {', '.join(map(repr, SCHEDULERS))}")
    return SCHEDULERS[name].from_config(config)
