"""The toy world: a 2-D Gaussian-mixture teacher with exact denoisers, behind the same interface as t2i/.

Roles (mirroring one frozen base with LoRA adapters):
    teacher    the exact mixture denoiser (frozen, analytic, differentiable in x)
    fake       teacher + adapter_scale * fake MLP adapter
    generator  teacher + adapter_scale * generator MLP adapter
An adapter corrects the model's native output, as a LoRA on SD3 / SDXL does: the velocity on the flow path
(x0 = x0_teacher - sigma * A), the noise on the VP path (x0 = x0_teacher - sigma / alpha * A). Its last layer
starts at zero, so at step 0 fake == generator == teacher. The VP path stops at sigma_max = 0.9977 (SDXL's
last timestep: alpha = 0.068), where eps-prediction is still defined.
Classifier-free guidance is exact: uncond + cfg * (cond - uncond), the adapter added to both branches,
as a LoRA is active in both passes of a guided SD3 call.
"""

import math
from pathlib import Path

import torch
from torch import nn

from .metrics import (energy_distance, energy_floor, max_relative_mass_error, mode_width_ratios, modes_covered,
                      off_manifold_fraction)
from .mixture import PATHS, make_mixture, path_alpha
from .rewards import Reward

ROLES = ("teacher", "fake", "generator")


class Adapter(nn.Module):
    """MLP correction to the teacher's x0-prediction: (x, sigma, label) -> (n, 2); last layer zero-initialised."""

    def __init__(self, n_labels, hidden=128, depth=3, n_freq=6, label_dim=8):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32))
        self.label_embed = nn.Embedding(n_labels, label_dim)
        dims = [2 + 1 + 2 * n_freq + label_dim] + [hidden] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, 2)
        nn.init.zeros_(self.out.weight)  # starts as the teacher, as LoRA's B = 0 does
        nn.init.zeros_(self.out.bias)

    def forward(self, x, sigma, label):
        s = sigma[:, None]
        h = torch.cat([x, s, (s * self.freqs).sin(), (s * self.freqs).cos(), self.label_embed(label)], -1)
        return self.out(self.body(h))


class ToyWorld:
    """Gaussian-mixture world. The interface (shared with t2i.T2IWorld) is the methods' only view of it."""

    name = "toy2d"
    data_shape = (2,)

    def __init__(
        self,
        mixture="ring8",
        spread=None,
        path="flow",
        shift=1.0,
        n_classes=0,
        reward="linear",
        reward_angle=0.0,
        reward_target=(2.0, 0.0),
        n_fakes=1,
        hidden=128,
        depth=3,
        seed=0,
        device="cpu",
    ):
        if path not in PATHS:
            raise ValueError(f"unknown toy path {path!r}; valid paths: {', '.join(PATHS)}")
        if not shift > 0:
            raise ValueError(f"timestep shift must be > 0, got {shift}")
        if n_classes < 0:
            raise ValueError(f"n_classes must be >= 0 (0: unconditional), got {n_classes}")
        if n_fakes < 1:
            raise ValueError(f"n_fakes must be >= 1, got {n_fakes}")
        self.mixture = make_mixture(mixture, spread, n_classes)
        self.mixture_name = mixture
        self.path = path
        self.is_flow = path == "flow"
        self.shift = float(shift)
        self.sigma_max = 1.0 if self.is_flow else 0.9977
        self.reward_fn = Reward(reward, reward_angle, reward_target)
        self.device = torch.device(device)
        self.null_label = self.mixture.null_label
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            self.adapters = {
                "fake": Adapter(n_classes + 1, hidden, depth).to(self.device),
                "generator": Adapter(n_classes + 1, hidden, depth).to(self.device),
            }
            for k in range(1, n_fakes):  # per-step fake scores "fake1", ... (after the first two: their init is unchanged)
                self.adapters[f"fake{k}"] = Adapter(n_classes + 1, hidden, depth).to(self.device)
        self.adapter_roles = ["generator"] + [r for r in self.adapters if r != "generator"]
        extent = float(self.mixture.means.abs().max() + 4 * self.mixture.std)
        self.plot_limit = math.ceil(extent * 2) / 2  # fixed axes [-L, L]^2 for every figure of this mixture

    # ---- conditions and noise ----
    def sample_cond(self, n, generator=None):
        """n condition labels (n,): class labels by their mixture weight, or all null when unconditional."""
        if self.mixture.n_classes == 0:
            return torch.full((n,), self.null_label, dtype=torch.long, device=self.device)
        k = self.mixture.sample_modes(n, generator)
        return self.mixture.classes[k].to(self.device)

    def null_cond(self, cond):
        """The null condition (classifier-free guidance's unconditional branch), shaped like cond."""
        return torch.full_like(cond, self.null_label)

    def noise(self, cond, generator=None):
        """Pure noise (n, 2) for the conditions cond."""
        return torch.randn(cond.shape[0], 2, generator=generator, device=self.device)

    # ---- time and path ----
    def sigma(self, t):
        """The model's noise level for a pre-shift time t in [0, 1]: shifted as SD3 does, s t / (1 + (s - 1) t),
        then scaled to the path's top level (flow: 1; vp: 0.9977, like SDXL's t = 999)."""
        return self.sigma_max * self.shift * t / (1 + (self.shift - 1) * t)

    def alpha(self, sigma):
        """Signal coefficient of the path at sigma (flow: 1 - sigma; vp: sqrt(1 - sigma^2))."""
        return path_alpha(sigma, self.path)

    def renoise(self, x0, sigma, eps):
        """x_sigma = alpha(sigma) x0 + sigma eps; sigma a number or per-sample (n,)."""
        sigma = self._per_sample(sigma, x0)[:, None]
        return self.alpha(sigma) * x0 + sigma * eps

    def loss_weight(self, sigma):
        """Weight that turns an x0 error into the model's native diffusion loss: the flow model's velocity loss
        |v - v*|^2 = |x0 - x0*|^2 / sigma^2, the VP model's eps loss |eps - eps*|^2 = alpha^2 / sigma^2 |x0 - x0*|^2."""
        return self.alpha(sigma) ** 2 / sigma**2 if self.path == "vp" else 1.0 / sigma**2

    # ---- the three roles ----
    def x0(self, role, x, sigma, cond, cfg=1.0, adapter_scale=1.0):
        """x0-prediction (n, 2) of a role at level sigma, with classifier-free guidance cfg.
        teacher: the exact mixture denoiser; fake / generator (and per-step fakes fake1, ...): teacher + adapter_scale *
        that role's adapter.
        DynaDG's real score is x0("fake", ..., cfg=w, adapter_scale=lambda): teacher + lambda * fake adapter."""
        if role != "teacher" and role not in self.adapters:
            raise ValueError(f"unknown role {role!r}; valid roles: teacher, {', '.join(self.adapters)}")
        sigma = self._per_sample(sigma, x)
        pred = self._x0_branch(role, x, sigma, cond, adapter_scale)
        if cfg == 1.0 or bool((cond == self.null_label).all()):
            return pred
        uncond = self._x0_branch(role, x, sigma, self.null_cond(cond), adapter_scale)
        return uncond + cfg * (pred - uncond)

    def params(self, role):
        """Trainable parameters of the role's adapter (the teacher has none)."""
        return list(self.adapters[role].parameters())

    def lora_factors(self, role):
        """Low-rank factors of a LoRA adapter: None here (the toy adapters are MLPs)."""
        return None

    def reward(self, x0, cond):
        """Differentiable per-sample reward (n,) of clean samples."""
        return self.reward_fn(x0)

    def reward_terms(self, x0, cond):
        """The reward's terms {name: (weight, per-sample score (n,))}, whose weighted sum is reward(): one term here."""
        return {self.reward_fn.name: (1.0, self.reward(x0, cond))}

    def decode(self, x0):
        """Toy samples are already 'pixels'."""
        return x0

    def save(self, role, directory):
        """Save the role's adapter to directory/<role>.pt."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(self.adapters[role].state_dict(), Path(directory) / f"{role}.pt")

    def load(self, role, directory):
        """Load the role's adapter from directory/<role>.pt (weights only: a checkpoint cannot run code)."""
        path = Path(directory) / f"{role}.pt"
        if not path.exists():
            raise FileNotFoundError(f"no {role} checkpoint at {path}")
        self.adapters[role].load_state_dict(torch.load(path, map_location=self.device, weights_only=True))  # tensors only

    # ---- evaluation and figures ----
    def evaluate(self, samples, cond, beta=None, steps=None, reference_size=4000, seed=1234):
        """Metrics of generator samples against the teacher p(x | cond) (and the exact tilted teacher when beta is given):
        energy distance and its noise floor, modes covered, worst relative mode-mass error, per-mode widths against the
        teacher's, mean reward, mean teacher log-density. steps: every student step's x0 outputs (a list of K (n, 2)
        tensors, the last one = samples): their energy distances (energy_distance_step{k}) and that of their mixture
        (sample i taken from step i mod K: energy_distance_mixture, same floor as the final samples')."""
        gen = torch.Generator().manual_seed(seed)
        samples = samples.detach().cpu().float()
        cond = cond.cpu()
        ref_cond = cond[torch.randint(0, cond.shape[0], (reference_size,), generator=gen)]
        reference = self.mixture.sample(reference_size, gen, ref_cond)
        n = samples.shape[0]
        out = {
            "energy_distance": energy_distance(samples, reference),
            "energy_floor": energy_floor(reference, n, reference_size),
            "modes_covered": modes_covered(samples, self.mixture),
            "n_modes": self.mixture.n_modes,
            "max_mode_mass_error": max_relative_mass_error(samples, self.mixture),
            **mode_width_ratios(samples, reference, self.mixture),
            "off_manifold": off_manifold_fraction(samples, self.mixture),
            "mean_reward": float(self.reward(samples, cond).mean()),
            "teacher_logp": float(self.mixture.log_prob(samples, cond=cond).mean()),
        }
        if steps is not None:
            outputs = [s.detach().cpu().float() for s in steps]
            for k, x in enumerate(outputs):
                out[f"energy_distance_step{k}"] = energy_distance(x, reference)
            mixture = torch.stack(outputs)[torch.arange(n) % len(outputs), torch.arange(n)]  # (n, 2)
            out["energy_distance_mixture"] = energy_distance(mixture, reference)
        if beta is not None and self.reward_fn.name in ("linear", "quadratic"):
            tilted = self.reward_fn.tilt(self.mixture, beta)
            ref_tilted = tilted.sample(reference_size, gen, ref_cond)
            out["energy_distance_tilted"] = energy_distance(samples, ref_tilted)
            out["energy_floor_tilted"] = energy_floor(ref_tilted, n, reference_size)
        return out

    def plot_samples(self, samples, path, title="", beta=None):
        """Scatter samples over the teacher's density contours (solid) on fixed axes, and the tilted teacher's
        (dashed) when beta is given and the reward has a closed-form tilt."""
        from .plots import plot_samples

        tilted = self.reward_fn.tilt(self.mixture, beta) if beta and self.reward_fn.name != "radius" else None
        plot_samples(samples, self.mixture, path, title, self.plot_limit, tilted, f"tilted teacher, beta={beta:g}"
                     if tilted is not None else None)

    def plot_curves(self, history, keys, path, title="", stage_boundaries=None):
        """Metric curves (one panel per key, 3 a row) from metrics.jsonl records: energy distances with their noise
        floor, stage boundaries marked (None: where the records' "stage" changes)."""
        from .plots import plot_curves

        plot_curves(history, keys, path, title, stage_boundaries)

    # ---- internals ----
    def _x0_branch(self, role, x, sigma, cond, adapter_scale):
        base = self.mixture.x0(x, sigma, self.path, cond)
        if role == "teacher" or adapter_scale == 0:
            return base
        correction = self.adapters[role](x, sigma.to(x.dtype), cond)  # native output: velocity (flow) / eps (vp)
        to_x0 = sigma if self.is_flow else sigma / self.alpha(sigma)  # x0 = x - sigma v ; x0 = (x - sigma eps) / alpha
        return base - adapter_scale * to_x0[:, None] * correction

    def _per_sample(self, sigma, x):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma.reshape(-1)
