"""Figures on fixed axes (so frames of a run, and runs of different methods, compare by eye)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _contours(ax, mixture, limit, **kwargs):
    lin = torch.linspace(-limit, limit, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="xy")
    logp = mixture.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)).reshape(200, 200)
    peak = float(logp.max())
    ax.contour(gx.numpy(), gy.numpy(), logp.numpy(), levels=[peak - 6, peak - 3, peak - 1], **kwargs)


def draw_samples(ax, samples, mixture, limit, title="", tilted=None, max_points=2000):
    """Samples (n, 2) as dots over the teacher's log-density contours; the tilted teacher dashed if given."""
    _contours(ax, mixture, limit, colors="0.55", linewidths=0.8)
    if tilted is not None:
        _contours(ax, tilted, limit, colors="tab:red", linewidths=0.8, linestyles="dashed")
    x = samples[:max_points].detach().cpu().float()
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, color="tab:blue")
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)


def plot_samples(samples, mixture, path, title="", limit=3.0, tilted=None):
    fig, ax = plt.subplots(figsize=(4, 4))
    draw_samples(ax, samples, mixture, limit, title, tilted)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(history, keys, path, title=""):
    """One panel per metric key: value against step, from a list of metrics.jsonl records."""
    keys = [k for k in keys if any(k in r for r in history)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in history if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        if key.startswith("energy_distance"):
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
