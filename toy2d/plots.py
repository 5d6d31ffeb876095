"""Figures on fixed axes (so frames of a run, and runs of different methods, compare by eye)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

TEACHER_STYLE = dict(colors="0.55", linewidths=0.8, linestyles="solid")
TILTED_STYLE = dict(colors="tab:red", linewidths=0.8, linestyles="dashed")
CURVE_COLUMNS = 3  # panels per row of a curves figure
CURVE_TITLES = {  # a metric key whose name alone does not say where its samples come from
    "reward": "reward (training rollouts)", "train_reward": "reward (training batch)",
    "mean_reward": "mean reward (evaluation)", "teacher_logp": "teacher log-density (evaluation)",
}


def _contours(ax, mixture, limit, **style):
    """Three log-density levels (peak - 1, - 3, - 6). The line style is always given: matplotlib would otherwise
    dash the negative levels of a one-colour contour, and log-densities are negative."""
    lin = torch.linspace(-limit, limit, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="xy")
    logp = mixture.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)).reshape(200, 200)
    peak = float(logp.max())
    ax.contour(gx.numpy(), gy.numpy(), logp.numpy(), levels=[peak - 6, peak - 3, peak - 1], **style)


def outside_axes(samples, limit):
    """Boolean mask (n,) of the samples a [-limit, limit]^2 panel does not show: outside it, or not finite."""
    x = samples.detach().cpu().double()
    return ~(torch.isfinite(x).all(-1) & (x.abs() <= limit).all(-1))


def draw_samples(ax, samples, mixture, limit, title="", tilted=None, max_points=2000, legend=True, tilted_label=None):
    """Samples (n, 2) as dots over the teacher's log-density contours (solid); the tilted teacher's dashed if given.
    Samples outside the fixed axes are drawn as crosses on the border, and the panel says how many there are (of all
    n samples, not only the max_points drawn), so a reward-hacked student is not an empty panel. legend: a legend in
    the panel; either way the legend's handles are returned (for figure_legend)."""
    _contours(ax, mixture, limit, **TEACHER_STYLE)
    if tilted is not None:
        _contours(ax, tilted, limit, **TILTED_STYLE)
    out = outside_axes(samples, limit)
    x = samples[:max_points].detach().cpu().float()
    shown = ~out[:max_points]
    ax.scatter(x[shown, 0], x[shown, 1], s=2, alpha=0.5, color="tab:blue")
    if out.any():
        finite = x[~shown & torch.isfinite(x).all(-1)]
        border = finite.clamp(-limit, limit)  # the direction the samples left in
        ax.scatter(border[:, 0], border[:, 1], s=14, marker="x", linewidths=0.8, color="tab:orange", clip_on=False)
        far = samples.detach().cpu().double()[out]
        far = far[torch.isfinite(far).all(-1)]
        where = f"max |x| {float(far.abs().max()):.2g}; " if far.numel() else ""
        share = float(out.double().mean())
        percent = f"{share:.0%}" if share >= 0.1 else f"{share:.1%}"
        note = f"{percent} outside the axes ({int(out.sum())} of {out.numel()})\n{where}x: where they left"
        ax.text(*_emptiest_spot(x, limit), note, transform=ax.transAxes, ha="center", va="center", fontsize=6,
                color="tab:orange", bbox=dict(boxstyle="round", fc="white", ec="tab:orange", alpha=0.85))
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$", fontsize=8, labelpad=1)
    ax.set_ylabel("$x_2$", fontsize=8, labelpad=1)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    handles = [Line2D([], [], color="0.55", lw=0.8, label="teacher log p (peak -1, -3, -6)"),
               Line2D([], [], ls="", marker="o", ms=3, color="tab:blue", label="samples")]
    if tilted is not None:
        handles.insert(1, Line2D([], [], color="tab:red", lw=0.8, ls="--", label=tilted_label or "tilted teacher"))
    if out.any():
        handles.append(Line2D([], [], ls="", marker="x", ms=4, color="tab:orange", label="samples outside the axes"))
    if legend:  # in the panel: short names, in the corner the ring leaves empty
        short = {"teacher log p (peak -1, -3, -6)": "teacher", "samples outside the axes": "outside"}
        ax.legend(handles, [short.get(h.get_label(), h.get_label()) for h in handles], fontsize=5.5, loc="lower left",
                  framealpha=0.8, handlelength=1.2, borderpad=0.3, labelspacing=0.2, handletextpad=0.4,
                  borderaxespad=0.2)
    return handles


def figure_legend(fig, handles):
    """One legend for a figure, below its panels, from the handles the panels returned (each label once), as many
    entries a row as the figure's width holds. Returns the share of the figure's height it takes (for tight_layout)."""
    unique = {h.get_label(): h for h in handles}
    ncol = max(1, min(len(unique), int(fig.get_figwidth() // 2.3)))
    fig.legend(list(unique.values()), list(unique), loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    return (0.15 + 0.17 * math.ceil(len(unique) / ncol)) / fig.get_figheight()


def _emptiest_spot(x, limit):
    """Where a note covers the fewest drawn points (x (n, 2), clamped to the panel): the centre, the top or the
    bottom of the panel, in axes coordinates (the centre first: the ring's hole)."""
    u = ((x.double().nan_to_num(0.0).clamp(-limit, limit) + limit) / (2 * limit))  # (n, 2) in [0, 1]
    spots = [(0.5, 0.5), (0.5, 0.9), (0.5, 0.1)]
    covered = [int(((u[:, 0] - sx).abs() < 0.33).logical_and((u[:, 1] - sy).abs() < 0.1).sum()) for sx, sy in spots]
    return spots[covered.index(min(covered))]


def plot_samples(samples, mixture, path, title="", limit=3.0, tilted=None, tilted_label=None):
    fig, ax = plt.subplots(figsize=(4.6, 4.9))
    handles = draw_samples(ax, samples, mixture, limit, title, tilted, legend=False, tilted_label=tilted_label)
    fig.tight_layout(rect=(0, figure_legend(fig, handles), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_boundaries_of(history):
    """The steps where a two-stage run's records change stage: the last step recorded in each stage >= 1 that a later
    stage follows (dmdr and rtdmd record "stage"; stage 0 is dmdr's untrained step-0 record)."""
    last = {}
    for r in history:
        if r.get("stage", 0) >= 1:
            last[r["stage"]] = max(last.get(r["stage"], r["step"]), r["step"])
    stages = sorted(last)
    return [last[s] for s in stages[:-1]]


def plot_curves(history, keys, path, title="", stage_boundaries=None):
    """curves_figure saved to path (nothing when no key has a record)."""
    fig = curves_figure(history, keys, title, stage_boundaries)
    if fig is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)


def curves_figure(history, keys, title="", stage_boundaries=None):
    """One panel per metric key (value against step, from a list of metrics.jsonl records), at most CURVE_COLUMNS
    panels a row. An energy distance is drawn with its noise floor (energy_floor / energy_floor_tilted of the same
    records) on a log scale. stage_boundaries: the last steps of stages that another stage follows, marked in every
    panel (None: from the records' "stage" key, see stage_boundaries_of; [] for none). Keys without records are
    skipped, repeated keys drawn once. Returns the figure, or None when no key has a record."""
    keys = [k for k in dict.fromkeys(keys) if any(k in r for r in history)]
    if not keys:
        return None
    if stage_boundaries is None:
        stage_boundaries = stage_boundaries_of(history)
    cols = min(CURVE_COLUMNS, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    handles = {}
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in history if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", ms=3, lw=1, color="tab:blue")
        ax.set_title(CURVE_TITLES.get(key, key), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key.startswith("energy_distance"):
            floor_key = key.replace("energy_distance", "energy_floor")
            floor = [(r["step"], r[floor_key]) for r in history if floor_key in r]
            if floor:
                (line,) = ax.plot([p[0] for p in floor], [p[1] for p in floor], ls="--", lw=1, color="0.35")
                handles["noise floor (a perfect student's expected value)"] = line
            ax.set_yscale("log")
        for step in stage_boundaries:
            handles["stage boundary"] = ax.axvline(step, ls=":", lw=1.2, color="tab:purple")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=7,
                   frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    return fig
