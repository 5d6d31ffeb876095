"""Differentiable analytic rewards on the toy plane, each x (n, 2) -> r (n,).

linear     r = d . x                 tilt in closed form (modes shift by beta s^2 d, reweight by exp(beta d . mu_k))
quadratic  r = -|x - c|^2 / 2        tilt in closed form (modes pulled toward c and sharpened)
radius     r = |x|                   "hackable": on the 8-mode ring every mode scores the same, so the only way to raise
                                     it is to leave the data manifold outward; it grows without bound off the manifold.
"""

import math

import torch

REWARDS = ("linear", "quadratic", "radius")


class Reward:
    """A named reward with its parameters; tilt(mixture, beta) gives the exact p(x) exp(beta r(x)) / Z when it exists."""

    def __init__(self, name="linear", angle_deg=0.0, target=(2.0, 0.0)):
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(REWARDS)}")
        self.name = name
        a = math.radians(angle_deg)
        self.direction = torch.tensor([math.cos(a), math.sin(a)])  # unit vector, linear reward
        self.target = torch.tensor(target, dtype=torch.float32)  # quadratic reward

    def __call__(self, x):
        if self.name == "linear":
            return x @ self.direction.to(x)
        if self.name == "quadratic":
            return -0.5 * ((x - self.target.to(x)) ** 2).sum(-1)
        return x.norm(dim=-1)

    def tilt(self, mixture, beta):
        """The exact reward-tilted mixture p(x) exp(beta r(x)) / Z (linear and quadratic rewards)."""
        if beta < 0:
            raise ValueError(f"tilt strength beta must be >= 0, got {beta}")
        if self.name == "linear":
            return mixture.tilt_linear(self.direction.double(), beta)
        if self.name == "quadratic":
            return mixture.tilt_quadratic(self.target.double(), beta)
        raise NotImplementedError(f"the {self.name!r} reward has no closed-form tilted teacher (use linear or quadratic)")

    def __repr__(self):
        if self.name == "linear":
            return f"Reward(linear, direction={self.direction.tolist()})"
        if self.name == "quadratic":
            return f"Reward(quadratic, target={self.target.tolist()})"
        return "Reward(radius)"
