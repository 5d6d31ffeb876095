"""Isotropic 2-D Gaussian mixtures with everything exact: density, samples, the noisy marginal at any
level of a flow or VP path, its score and posterior mean (x0-prediction), classifier-free guidance, and
the reward-tilted mixture p(x) exp(beta r(x)) / Z for linear and quadratic rewards.

Paths (sigma in [0, 1], sigma = 1 is pure noise):
    flow (SD3-like):  x = (1 - sigma) x0 + sigma eps      alpha = 1 - sigma
    vp   (SDXL-like): x = alpha x0 + sigma eps            alpha = sqrt(1 - sigma^2)
Mode k is N(mu_k, s^2 I); at level sigma the marginal is the mixture of N(alpha mu_k, (alpha^2 s^2 + sigma^2) I).
"""

import math

import torch

PATHS = ("flow", "vp")


def path_alpha(sigma, path):
    """Signal coefficient alpha(sigma) of the path: x = alpha x0 + sigma eps."""
    if path == "flow":
        return 1.0 - sigma
    if path == "vp":
        return (1.0 - sigma**2).clamp(min=0.0).sqrt() if torch.is_tensor(sigma) else math.sqrt(max(0.0, 1.0 - sigma**2))
    raise ValueError(f"unknown path {path!r}; valid paths: {', '.join(PATHS)}")


class GaussianMixture:
    """sum_k w_k N(mu_k, s^2 I) in 2-D; mode k carries class label classes[k] (class n_classes is the null label).

    means (K, 2), weights (K,) summing to 1, std: the per-mode standard deviation s (one number, or (K,) per mode
    after a quadratic tilt, which shrinks every mode alike so it stays one number; kept general for clarity).
    """

    def __init__(self, means, weights, std, classes=None, n_classes=0):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.std = float(std)
        self.n_modes = self.means.shape[0]
        self.n_classes = int(n_classes)
        if classes is None:
            classes = torch.zeros(self.n_modes, dtype=torch.long)
        self.classes = torch.as_tensor(classes, dtype=torch.long)
        # allowed[c, k]: mode k belongs to the distribution conditioned on label c; the last row (null label) allows all.
        allowed = torch.zeros(self.n_classes + 1, self.n_modes, dtype=torch.bool)
        for c in range(self.n_classes):
            allowed[c] = self.classes == c
        allowed[self.n_classes] = True
        self.allowed = allowed

    @property
    def null_label(self):
        return self.n_classes

    # ---- the clean distribution ----
    def sample(self, n, generator=None, cond=None):
        """n samples (n, 2) float32; with cond (n,) labels, from p(x | cond) (null label: the whole mixture)."""
        logits = self._mode_logits(cond, n)
        k = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.std * eps).float()

    def sample_modes(self, n, generator=None):
        """The mode index of n draws from the mixture weights (for stratified checks)."""
        return torch.multinomial(self.weights, n, replacement=True, generator=generator)

    def log_prob(self, x, sigma=0.0, path="flow", cond=None):
        """Exact log-density (n,) of the marginal at noise level sigma (0: the clean mixture)."""
        x = x.double()
        alpha, var = self._coefficients(sigma, path, x)
        logits = self._component_logits(x, alpha, var, cond)  # (n, K), includes log w_k
        return torch.logsumexp(logits, -1).to(x.dtype)

    # ---- the noisy marginal: posterior mean and score ----
    def x0(self, x, sigma, path="flow", cond=None):
        """Posterior mean E[x0 | x_sigma = x] (n, 2), the exact denoiser (x0-prediction) at level sigma."""
        dtype = x.dtype
        x = x.double()
        alpha, var = self._coefficients(sigma, path, x)
        resp = self._component_logits(x, alpha, var, cond).softmax(-1)  # (n, K) responsibilities
        # E[x0 | x, k] = mu_k + (alpha s^2 / var) (x - alpha mu_k)
        diff = x[:, None, :] - alpha[:, None, None] * self.means[None]  # (n, K, 2)
        post_k = self.means[None] + (alpha * self.std**2 / var)[:, None, None] * diff
        return (resp[..., None] * post_k).sum(1).to(dtype)

    def score(self, x, sigma, path="flow", cond=None):
        """Exact score grad_x log p_sigma(x) (n, 2) of the marginal at level sigma."""
        dtype = x.dtype
        x = x.double()
        alpha, var = self._coefficients(sigma, path, x)
        resp = self._component_logits(x, alpha, var, cond).softmax(-1)
        diff = x[:, None, :] - alpha[:, None, None] * self.means[None]
        return (-(resp[..., None] * diff).sum(1) / var[:, None]).to(dtype)

    # ---- reward tilt: p~(x) = p(x) exp(beta r(x)) / Z, again a Gaussian mixture ----
    def tilt_linear(self, direction, beta):
        """r(x) = direction . x: every mode shifts by beta s^2 direction; weights w_k exp(beta d.mu_k) (the
        exp(beta^2 s^2 |d|^2 / 2) factor is common to all modes and cancels)."""
        d = torch.as_tensor(direction, dtype=torch.float64)
        means = self.means + beta * self.std**2 * d
        logw = self.weights.log() + beta * self.means @ d
        return GaussianMixture(means, logw.softmax(0), self.std, self.classes, self.n_classes)

    def tilt_quadratic(self, target, beta, scale=1.0):
        """r(x) = -scale |x - c|^2 / 2: mode k becomes N((mu_k / s^2 + beta scale c) / (1 / s^2 + beta scale),
        1 / (1 / s^2 + beta scale)) with weight w_k N(mu_k; c, (s^2 + 1 / (beta scale)) I)."""
        c = torch.as_tensor(target, dtype=torch.float64)
        b = beta * scale
        if b == 0:
            return GaussianMixture(self.means, self.weights, self.std, self.classes, self.n_classes)
        prec = 1.0 / self.std**2 + b
        means = (self.means / self.std**2 + b * c) / prec
        v = self.std**2 + 1.0 / b
        logw = self.weights.log() - ((self.means - c) ** 2).sum(-1) / (2 * v)
        return GaussianMixture(means, logw.softmax(0), prec**-0.5, self.classes, self.n_classes)

    # ---- internals ----
    def _coefficients(self, sigma, path, x):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma.reshape(-1)
        alpha = path_alpha(sigma, path)
        return alpha, alpha**2 * self.std**2 + sigma**2

    def _mode_logits(self, cond, n):
        logw = self.weights.log().expand(n, -1)
        if cond is None:
            return logw
        return logw.masked_fill(~self.allowed[cond], -math.inf)

    def _component_logits(self, x, alpha, var, cond):
        diff = x[:, None, :] - alpha[:, None, None] * self.means[None]  # (n, K, 2)
        log_normal = -(diff**2).sum(-1) / (2 * var[:, None]) - torch.log(2 * math.pi * var)[:, None]
        return self._mode_logits(cond, x.shape[0]) + log_normal


# ---- the named mixtures ----


def ring8(spread=0.25, radius=2.0, n_classes=0):
    """8 equal modes on a circle of the given radius; with n_classes > 0 mode k has label k % n_classes."""
    angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([angle.cos(), angle.sin()], -1)
    classes = torch.arange(8) % n_classes if n_classes else None
    return GaussianMixture(means, torch.ones(8), spread, classes, n_classes)


def grid25(spread=0.15, extent=2.0, n_classes=0):
    """A 5 x 5 grid on [-extent, extent]^2 with unequal weights: weight grows 1..9 from the bottom-left corner
    along the diagonal (w_ij proportional to 1 + i + j), so the heaviest mode carries 9x the lightest."""
    lin = torch.linspace(-extent, extent, 5, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="ij")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    weights = (1 + i + j).reshape(-1).double()
    classes = torch.arange(25) % n_classes if n_classes else None
    return GaussianMixture(means, weights, spread, classes, n_classes)


def line3(spread=0.12, n_classes=0):
    """3 unequal modes on a line (weights 0.6, 0.3, 0.1): a small asymmetric case for tilt and coverage demos."""
    means = torch.tensor([[-1.5, 0.0], [0.0, 0.0], [1.5, 0.0]], dtype=torch.float64)
    classes = torch.arange(3) % n_classes if n_classes else None
    return GaussianMixture(means, torch.tensor([0.6, 0.3, 0.1]), spread, classes, n_classes)


MIXTURES = {"ring8": ring8, "grid25": grid25, "line3": line3}


def make_mixture(name, spread=None, n_classes=0):
    """The mixture called name (see MIXTURES); spread=None keeps that mixture's default mode std."""
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}; valid mixtures: {', '.join(MIXTURES)}")
    if spread is not None and not spread > 0:
        raise ValueError(f"mode spread must be > 0, got {spread}")
    kwargs = {"n_classes": n_classes}
    if spread is not None:
        kwargs["spread"] = spread
    return MIXTURES[name](**kwargs)
