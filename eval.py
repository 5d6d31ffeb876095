"""eval.py: metrics, a markdown table and figures for one or several run directories (any method, toy world).

    python eval.py runs/dmd__toy2d__0__<time>                 # -> that run dir: eval.json, eval.md, eval_samples.png
    python eval.py runs/dmd__toy2d__0__* runs/rtdmd__toy2d__0__* --out-dir evals/dmd_vs_rtdmd   # side by side
    python eval.py runs/gdmd__toy2d__0__<time> --beta 0.5 --samples 8000 --seed 7            # held-out noise
    python bench.py                                           # the side-by-side benchmark (trains, then uses this file)

What it does, for every run directory:
    1. reads config.json and checks it against the `Args` of the method file named by its "method" key (dmd.py,
       dmdr.py, rtdmd.py, gdmd.py): a key the method does not know, or a key it lacks, means the config comes from
       another method or another version of the file, and is a clear error rather than a silently different world;
    2. builds a fresh world with that method file's own make_world and loads checkpoint/generator.pt (world.load);
    3. samples the K-step student with that method file's own sampler (dmd, dmdr, gdmd: the DMD2 multi-step sampler
       `sample_student(world, cond, sigmas, noise)`; rtdmd: its CPS sampler at the run's eta), so eval measures the
       student the method trained, not a re-implementation of it;
    4. measures it (toy): energy distance to the teacher and to the exact reward-tilted teacher p exp(beta r) / Z, each
       with its noise floor (the value a perfect student reaches on average at this sample size, so distance / floor
       ~ 1 means "indistinguishable"), modes covered, worst mode-mass error, off-manifold fraction, mean reward, mean
       teacher log-density (low: samples off the data manifold, e.g. reward hacking), and diversity (mean pairwise
       distance, beside the teacher's own), plus a figure of the samples over the teacher's contours (tilted: dashed).
With the default seed (None: the run's own evaluation noise, config seed + 1) and sample count (the run's
eval_samples), eval.json reproduces the run's last evaluation in metrics.jsonl exactly: same noise, same reference.

beta: the reward-tilted teacher needs a temperature. rtdmd has one (--beta, the tilt it trains toward); dmd, dmdr and
gdmd do not (dmdr's rt_dm_beta scales r / ||r||, not r), so they are compared with the tilt at --beta (default 1.0).

Text-to-image runs: NOT DONE yet (the t2i world is being built, issue 6); a t2i run directory is refused with a clear
message. Planned, on held-out prompts with fixed seeds: CLIP score, PickScore, HPSv2.1, aesthetic score, ImageReward
(each only when its weights are present, otherwise a table row that says which were skipped and why), diversity as the
mean pairwise distance of CLIP image embeddings (mean_pairwise_distance below already takes any (n, ...) features),
NFE and seconds per image of the K-step student against the teacher (its default steps with CFG), and an image grid
of student and teacher side by side from the same noise.

Config versions: a config.json may carry a "version" key; when the method file defines VERSION, the two must agree.
Without it, the check is the key check of step 1.
"""

import dataclasses
import importlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import tyro
from tqdm import tqdm

METHODS = ("dmd", "dmdr", "rtdmd", "gdmd")  # method files eval can load (method files never import each other; eval may)
CONFIG_META_KEYS = ("method", "version")  # config.json keys that are not Args fields
DEFAULT_BETA = 1.0


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """one or several run directories (each with config.json and checkpoint/)"""
    out_dir: Optional[str] = None
    """where eval.json, eval.md and eval_samples.png go (default: the run directory for one run, evals/<time> for several)"""
    samples: Optional[int] = None
    """student samples per run (default: the run's eval_samples, so the numbers match its metrics.jsonl)"""
    seed: Optional[int] = None
    """noise seed of the student samples (default: the run's own evaluation seed, config seed + 1)"""
    beta: Optional[float] = None
    """tilt strength of the reward-tilted teacher p exp(beta r) / Z (default: the run's --beta for rtdmd, else 1.0)"""
    allow_new_options: bool = False
    """accept a config that lacks Args fields the method file gained after the run (they take their defaults; each
    result lists them under "options_defaulted"); keys the method does not know are always an error"""
    reference: bool = True
    """add reference rows: exact teacher samples and exact tilted-teacher samples, measured the same way"""
    device: str = "cpu"
    """cpu, cuda, or auto (cuda when available)"""
    progress: bool = True
    """show a tqdm progress bar over runs"""


# =====================================================================================================
#                                   loading a run directory
# =====================================================================================================


def read_config(run_dir):
    """config.json of a run directory as a dict; clear errors for a missing directory, file or method key."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory (expected a run directory such as runs/dmd__toy2d__0__<time>)")
    path = run_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.json: not a run directory written by dmd.py, dmdr.py, rtdmd.py "
                                "or gdmd.py")
    config = json.loads(path.read_text())
    method = config.get("method")
    if method not in METHODS:
        raise ValueError(f"{path}: unknown method {method!r}; eval.py knows {', '.join(METHODS)}")
    return config


def method_module(method):
    """The method file's module (dmd.py -> dmd). eval.py may import method files; they never import each other."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; eval.py knows {', '.join(METHODS)}")
    return importlib.import_module(method)


def config_to_args(config, module, where="config.json", allow_new_options=False):
    """The method's Args from a config dict. Its keys must be exactly the Args fields (plus "method" / "version"):
    an unknown key or a missing one means the run was written by another method or another version of the file,
    and building a world from it would silently differ from the one it was trained on. allow_new_options: missing
    fields (options added to the file after the run) take their defaults instead; unknown keys stay an error."""
    version = getattr(module, "VERSION", None)
    if "version" in config and version is not None and config["version"] != version:
        raise ValueError(f"{where} was written by {module.__name__}.py version {config['version']!r}; this is version "
                         f"{version!r}. Evaluate it with the version of the code that wrote it.")
    fields = {f.name for f in dataclasses.fields(module.Args)}
    keys = set(config) - set(CONFIG_META_KEYS)
    unknown, missing = sorted(keys - fields), sorted(fields - keys)
    if allow_new_options:
        missing = []
    if unknown or missing:
        parts = [f"keys {module.__name__}.py's Args does not have: {unknown}" if unknown else "",
                 f"Args fields the config lacks: {missing}" if missing else ""]
        raise ValueError(f"{where} does not match {module.__name__}.py (method {config.get('method')!r}): "
                         + "; ".join(p for p in parts if p)
                         + ". It was written by another method or another version of the file; re-run it, or evaluate "
                         "it with the version of the code that wrote it"
                         + (" (if only fields are missing: --allow-new-options gives them their defaults)." if not unknown
                            else "."))
    args = module.Args(**{k: config[k] for k in fields if k in config})
    return module.resolve_defaults(args) if hasattr(module, "resolve_defaults") else args


def load_run(run_dir, device="cpu", allow_new_options=False):
    """Everything eval needs from a run directory: config, method module, Args, a fresh world with the trained
    generator loaded, and the checkpoint's step. Raises before any work on a run without a usable checkpoint."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    module = method_module(config["method"])
    args = config_to_args(config, module, run_dir / "config.json", allow_new_options)
    if args.model != "toy2d":
        raise NotImplementedError(f"{run_dir}: evaluation of {args.model} runs (text-to-image) is not implemented yet; "
                                  "eval.py evaluates toy2d runs (see docs/eval.md for the planned t2i metrics)")
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "generator.pt").exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoint ({ckpt / 'generator.pt'} is missing): the run stopped "
                                "before its first checkpoint, or this is not a finished run directory")
    world = module.make_world(args, device)
    world.load("generator", ckpt)
    state = ckpt / "state.json"
    step = json.loads(state.read_text())["step"] if state.exists() else None
    defaulted = sorted({f.name for f in dataclasses.fields(module.Args)} - set(config))
    return {"run_dir": run_dir, "config": config, "method": config["method"], "module": module, "args": args,
            "world": world, "step": step, "options_defaulted": defaulted}


# =====================================================================================================
#                                 sampling with the method's own sampler
# =====================================================================================================


@torch.no_grad()
def sample_run(run, n, seed):
    """n student samples and their conditions, drawn exactly as the method's own evaluate() draws them:
    cond, then noise, then the sampler, all from one generator seeded with `seed`."""
    world, args, module = run["world"], run["args"], run["module"]
    gen = torch.Generator().manual_seed(seed)
    cond = world.sample_cond(n, gen)
    noise = world.noise(cond, gen)
    if run["method"] == "rtdmd":  # CPS sampler at the run's eta, on the levels [t_0, ..., t_K = 0]
        schedule = module.student_schedule(world, args.student_steps)
        samples = module.sample_student(world, cond, schedule, args.eta, noise, generator=gen)
    else:  # dmd, dmdr, gdmd: DMD2's multi-step sampler
        sigmas = module.student_sigmas(world, args.student_steps)
        samples = module.sample_student(world, cond, sigmas, noise, generator=gen)
    return samples, cond


# =====================================================================================================
#                                          toy metrics
# =====================================================================================================


def mean_pairwise_distance(x, max_points=4000):
    """Diversity: mean Euclidean distance between distinct samples (diagonal excluded, so unbiased for E|X - X'|);
    x (n, ...) is flattened per sample (the same measure serves image embeddings). At most max_points are used."""
    x = x[:max_points].flatten(1).double()
    n = x.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least 2 samples")
    return float(torch.cdist(x, x).sum() / (n * (n - 1)))


def run_beta(run, beta=None):
    """The tilt strength to compare with, and where it came from: the eval option, the run's own beta (rtdmd), or 1."""
    if beta is not None:
        return float(beta), "eval --beta"
    if "beta" in run["config"]:
        return float(run["config"]["beta"]), "run config"
    return DEFAULT_BETA, "eval default"


def toy_metrics(world, samples, cond, beta=None, reference_size=4000, seed=1234):
    """All toy metrics of samples (n, 2) with conditions cond (n,): the world's own (energy distance to the teacher
    and, for a linear / quadratic reward, to the exact tilted teacher, with noise floors; modes; reward; log-density)
    plus distance / floor ratios and diversity beside the teacher's. `seed` draws the exact reference sets."""
    out = world.evaluate(samples, cond, beta=beta, reference_size=reference_size, seed=seed)
    out["energy_ratio"] = out["energy_distance"] / out["energy_floor"]
    if "energy_distance_tilted" in out:
        out["energy_ratio_tilted"] = out["energy_distance_tilted"] / out["energy_floor_tilted"]
    elif beta is not None:
        out["tilted_skipped"] = f"the {world.reward_fn.name} reward has no closed-form tilted teacher"
    out["diversity"] = mean_pairwise_distance(samples)
    teacher = world.mixture.sample(cond.shape[0], torch.Generator().manual_seed(seed + 1), cond.cpu())  # same conditions
    out["diversity_teacher"] = mean_pairwise_distance(teacher)
    return out


def evaluate_run(run_dir, samples=None, seed=None, beta=None, device="cpu", allow_new_options=False):
    """Load a run directory, sample its student and measure it. Returns (result dict, samples, cond, run)."""
    run = load_run(run_dir, device, allow_new_options)
    args = run["args"]
    n = samples if samples is not None else args.eval_samples
    seed = seed if seed is not None else args.seed + 1  # the run's own evaluation noise (see the methods' evaluate)
    beta, beta_source = run_beta(run, beta)
    x, cond = sample_run(run, n, seed)
    metrics = toy_metrics(run["world"], x, cond, beta)
    result = {
        "run_dir": str(run["run_dir"]), "name": run["run_dir"].name, "method": run["method"], "model": args.model,
        "step": run["step"], "student_steps": args.student_steps, "sampler": "cps" if run["method"] == "rtdmd" else "dmd2",
        "samples": n, "seed": seed, "beta": beta, "beta_source": beta_source, **metrics,
    }
    if run["options_defaulted"]:
        result["options_defaulted"] = run["options_defaulted"]
    return result, x, cond, run


def reference_results(world, n, beta, seed=4321):
    """Rows for exact samples of the teacher and of the tilted teacher, measured exactly like a student: what a
    perfect distillation (or a perfect reward-tilted distillation) scores at this sample size."""
    gen = torch.Generator().manual_seed(seed)
    cond = world.sample_cond(n, gen)
    rows, sets = [], []
    targets = [("teacher (exact samples)", world.mixture)]
    if world.reward_fn.name in ("linear", "quadratic"):
        targets.append((f"tilted teacher, beta={beta:g} (exact samples)", world.reward_fn.tilt(world.mixture, beta)))
    for name, mixture in targets:
        x = mixture.sample(n, gen, cond.cpu())
        rows.append({"name": name, "method": "reference", "step": None, "samples": n, "beta": beta,
                     **toy_metrics(world, x, cond, beta)})
        sets.append((name, x))
    return rows, sets


# =====================================================================================================
#                                       table and figures
# =====================================================================================================

# (key, header, format); a missing key prints as "-"
TABLE_COLUMNS = [
    ("energy_distance", "ED to teacher", "{:.4f}"),
    ("energy_ratio", "ED / floor", "{:.1f}"),
    ("energy_distance_tilted", "ED to tilted", "{:.4f}"),
    ("energy_ratio_tilted", "ED tilted / floor", "{:.1f}"),
    ("modes_covered", "modes", "{:.0f}"),
    ("max_mode_mass_error", "worst mass err", "{:.2f}"),
    ("off_manifold", "off-manifold", "{:.3f}"),
    ("mean_reward", "reward", "{:.3f}"),
    ("teacher_logp", "teacher log p", "{:.2f}"),
    ("diversity", "diversity", "{:.3f}"),
]


def _cell(value, fmt):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (tuple, list)):  # (mean, std) from aggregated seeds
        return (fmt + " ± " + fmt).format(*value)
    return fmt.format(value)


def markdown_table(rows, first=("name", "run"), columns=TABLE_COLUMNS, extra=(("step", "step", "{}"),)):
    """A markdown table, one row per result dict; first = (key, header) of the label column."""
    cols = list(extra) + list(columns)
    lines = ["| " + " | ".join([first[1]] + [h for _, h, _ in cols]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [str(r.get(first[0], ""))] + [_cell(r.get(k), f) for k, _, f in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_notes(rows):
    """Footnotes of a table: the tilt used, the samples and floors, skipped tilted distances."""
    notes = []
    betas = sorted({(r.get("beta"), r.get("beta_source")) for r in rows if r.get("method") != "reference"},
                   key=str)
    for beta, source in betas:
        notes.append(f"- tilted teacher: p exp(beta r) / Z with beta = {beta:g} ({source})")
    floors = [r["energy_floor"] for r in rows if "energy_floor" in r]
    if floors:
        notes.append(f"- noise floor of the energy distance at these sample sizes: {min(floors):.4f} to {max(floors):.4f} "
                     "(a perfect student's expected value; ED / floor ~ 1: indistinguishable from the teacher)")
    for r in rows:
        if r.get("options_defaulted"):
            notes.append(f"- {r['name']}: options newer than the run, taken at their defaults: "
                         f"{', '.join(r['options_defaulted'])}")
        if "tilted_skipped" in r:
            notes.append(f"- {r['name']}: tilted distance skipped: {r['tilted_skipped']}")
    notes.append("- modes: modes holding at least a tenth of their weight; off-manifold: samples farther than 3 mode "
                 "stds from every mode; diversity: mean pairwise distance of the samples")
    return "\n".join(notes)


def plot_panels(panels, world, path, beta=None, title=""):
    """One panel per (title, samples) on the world's fixed axes over the teacher's contours (tilted teacher dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toy2d import draw_samples

    tilted = world.reward_fn.tilt(world.mixture, beta) if beta is not None and world.reward_fn.name != "radius" else None
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, x) in zip(axes.flat, panels):
        draw_samples(ax, x, world.mixture, world.plot_limit, name, tilted)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def same_world(a, b):
    """Whether two runs' worlds are the same teacher and reward (so their samples share one figure's contours)."""
    keys = ("model", "toy_mixture", "toy_spread", "toy_path", "toy_classes", "toy_reward", "toy_reward_angle")
    return all(a.get(k) == b.get(k) for k in keys)


# =====================================================================================================
#                                             main
# =====================================================================================================


def main(args):
    if not args.run_dirs:
        raise ValueError("give at least one run directory")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    # fail on every bad run directory before sampling any
    for run_dir in args.run_dirs:
        load_run(run_dir, device, args.allow_new_options)
    if args.out_dir is not None:
        out_dir = Path(args.out_dir)
    elif len(args.run_dirs) == 1:
        out_dir = Path(args.run_dirs[0])
    else:
        out_dir = Path("evals") / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)

    results, panels, first = [], [], None
    for run_dir in tqdm(args.run_dirs, desc="eval", disable=not args.progress or len(args.run_dirs) == 1):
        result, x, _, run = evaluate_run(run_dir, args.samples, args.seed, args.beta, device, args.allow_new_options)
        results.append(result)
        if first is None:
            first = run
        if same_world(first["config"], run["config"]):
            panels.append((f"{result['name']}\n{result['method']}, step {result['step']}", x))
    refs = []
    if args.reference:
        refs, ref_sets = reference_results(first["world"], results[0]["samples"], results[0]["beta"])
        panels = [(name, x) for name, x in ref_sets[:1]] + panels

    (out_dir / "eval.json").write_text(json.dumps({"runs": results, "references": refs}, indent=2))
    table = markdown_table(refs + results)
    cmd = "python eval.py " + " ".join(args.run_dirs)
    (out_dir / "eval.md").write_text(f"# Evaluation\n\n`{cmd}`\n\n{table}\n\n{table_notes(refs + results)}\n")
    plot_panels(panels, first["world"], out_dir / "eval_samples.png", results[0]["beta"],
                "student samples over the teacher's contours (tilted teacher dashed)")
    print(table)
    print(f"eval: wrote eval.json, eval.md, eval_samples.png to {out_dir}")
    return {"out_dir": out_dir, "results": results, "references": refs}


if __name__ == "__main__":
    main(tyro.cli(Args))
