"""bench.py: the side-by-side benchmark on the toy: every method and the ablations that carry the papers' claims,
the same budget, 3 seeds, one table (mean ± std over seeds) and one figure.

    python bench.py                                  # 13 configurations x 3 seeds, ~20-25 min on 2 idle CPU cores
    python bench.py --steps 1200 --seeds 0 1 2 3 4   # a larger budget
    python bench.py --only dmd rtdmd --seeds 0       # a subset
    python bench.py --report runs/bench__<time>      # re-render an earlier benchmark's table and figures
    python bench.py --help

It trains each (configuration, seed) in a worker process (one torch thread each: on these tiny 2-D tensors one
thread is as fast as two, and two workers use both cores), then measures every run with eval.py at the SAME held-out
noise (eval seed, 4000 samples), so rows differ only by the trained students. Writes <out_dir>/: bench.json (every
run's eval), bench_rows.jsonl (the same, written as each run finishes), bench.md (the table and the command),
bench_samples.png (seed 0 of each configuration over the teacher's contours, the exact tilted teacher dashed),
bench_reward_vs_logp.png, and the runs themselves.

The budget is the number of generator updates, --steps per run (default 600, reduced from the method files' toy
defaults of 1200-1600 so that 27 runs fit in 15 minutes); two-stage methods spend half on each stage. Every run has a
4-step student and 256 samples per generator update; every other option is the method file's toy default. The world is
the toy default (ring8, linear reward r = x_1); the reward-tilted teacher is p exp(beta r) / Z with beta = 1 (rtdmd's
own beta). Configurations:
    dmd                   dmd.py: DMD2 distillation only (the baseline), one fake score per student step (--fake-tracks
                          per-step, the toy default)
    dmd-mixture           dmd.py --fake-tracks mixture: DMD2's own estimator (one fake on a random step's outputs)
    dmdr                  dmdr.py: RT-DM + DynaDG + DynaRS cold start, then joint DMD + ReFL
    rtdmd                 rtdmd.py (its default, the paper's stage 2 at the toy scales): AC-DMD cold start, then SubGRPO
                          (M = 2) + the L_det hinge + AC-DMD on the last step, global-std advantages
    rtdmd-natural         rtdmd.py --stage2-recipe natural: the reward-tilted KL at natural scales (beta a temperature;
                          DM through all K steps, leave-one-out advantages, exact log-probabilities)
    rtdmd-tilted          rtdmd.py --dm-target tilted --stage2-recipe natural (beyond the paper): DM against the exact
                          tilted teacher's noisy marginals, no reward term
    gdmd                  gdmd.py: plain-DMD cold start, then GDMD (rewards of the DMD targets)
    rl-only               dmdr.py --stage1-steps 0 --no-dmd: ReFL alone on the teacher-initialised student, no distillation
    dmd-then-rl           dmdr.py plain DMD stage 1 (--no-rt-dm --no-dyna-dg --no-dyna-rs --lora-scale-f 1), then ReFL
                          alone (--no-dmd): distil first, fine-tune with RL after (sequential, not joint)
    dmdr-no-dyna          dmdr.py --no-dyna-dg --no-dyna-rs: DMDR without its cold-start schedules
    rtdmd-naive-grpo      rtdmd.py --naive-grpo (the paper's stage 2): independent noise and every step in the
                          estimator (no SubGRPO)
    gdmd-raw-samples      gdmd.py --naive-fusion: the reward of the raw sample instead of the DMD targets (our
                          baseline, not the paper's DMD + NFT on SDE rollouts)
    gdmd-no-cold-start    gdmd.py --cold-start-steps 0: GDMD from the teacher-initialised student, the noisy early
                          stage the abstract is about
What to read in the table: ED to teacher / to tilted teacher (each with its floor ratio), mean reward against the
tilted teacher's (its reference row), teacher log-density and off-manifold fraction (reward hacking sends both the
wrong way), diversity against the teacher's.
"""

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Literal, Optional, get_args

from tqdm import tqdm

STUDENT_STEPS = 4  # pinned here, not taken from the method files' defaults, so that every row is the same student
BATCH_SIZE = 256  # samples per generator update (rtdmd's stage 2 uses groups x group_size = 16 x 16 = 256 as well)
BenchConfig = Literal["dmd", "dmd-mixture", "dmdr", "rtdmd", "gdmd", "rl-only", "dmd-then-rl", "dmdr-no-dyna",
                      "rtdmd-naive-grpo", "rtdmd-natural", "rtdmd-tilted", "gdmd-raw-samples", "gdmd-no-cold-start"]
BENCH_CONFIGS = get_args(BenchConfig)  # the configurations (see the top of this file); --help lists them


@dataclass
class Args:
    steps: int = 600
    """generator updates per run (the shared budget); two-stage methods: half cold start, half the reward stage"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """training seeds of every configuration"""
    only: tuple[BenchConfig, ...] = ()
    """run only these configurations (default: every one, listed at the top of this file)"""
    workers: int = 2
    """parallel training processes (one torch thread each)"""
    eval_samples: int = 4000
    """student samples per run in the final evaluation"""
    eval_seed: int = 12345
    """noise seed of the final evaluation, shared by every run (held out: training evaluates with seed + 1)"""
    beta: float = 1.0
    """tilt strength of the reward-tilted teacher every run is compared with (rtdmd trains toward this beta)"""
    out_dir: Optional[str] = None
    """output directory (default runs/bench__<time>)"""
    progress: bool = True
    """show a tqdm progress bar over runs"""
    report: Optional[str] = None
    """no training: re-render the table and figures of an earlier benchmark directory from its bench_rows.jsonl
    (student samples re-drawn from its checkpoints at the eval seed)"""


def method_args(config, steps, seed, beta, out_dir):
    """(method file, its Args keyword arguments) of a benchmark configuration at a budget of `steps` updates."""
    half = steps // 2
    run = dict(seed=seed, output_dir=str(out_dir / "runs"), run_name=f"{config}__{seed}", progress=False,
               eval_every=steps, eval_samples=1000, student_steps=STUDENT_STEPS, batch_size=BATCH_SIZE)
    # dmdr at K = 4: its toy default sampler (sde, DMD2's); the rows of docs/benchmark.md were measured with it. The
    # authors' ode backward simulation is 3-30x closer at K = 4 (dmdr.py's docstring), and eval.py now samples a dmdr
    # run with its own --sampler (dmdr.rollout), so sampler="ode" here would be measured as trained; switching is a
    # benchmark change (re-run, new table), not made yet. lambda_rl: dmdr's toy default (0.3).
    dmdr_base = dict(stage1_steps=half, stage2_steps=steps - half, dynamic_steps=max(1, half // 2))  # toy: 300 of 600
    if config == "dmd":
        return "dmd", dict(num_steps=steps, **run)
    if config == "dmd-mixture":
        return "dmd", dict(num_steps=steps, fake_tracks="mixture", **run)
    if config == "dmdr":
        return "dmdr", dict(**dmdr_base, **run)
    if config == "rl-only":
        return "dmdr", dict(stage1_steps=0, stage2_steps=steps, dmd=False, dynamic_steps=max(1, half // 2), **run)
    if config == "dmd-then-rl":
        return "dmdr", dict(**dmdr_base, rt_dm=False, dyna_dg=False, dyna_rs=False, lora_scale_f=1.0, dmd=False, **run)
    if config == "dmdr-no-dyna":
        return "dmdr", dict(**dmdr_base, dyna_dg=False, dyna_rs=False, **run)
    if config == "rtdmd":
        return "rtdmd", dict(cold_steps=half, rl_steps=steps - half, beta=beta, **run)
    if config == "rtdmd-naive-grpo":
        return "rtdmd", dict(cold_steps=half, rl_steps=steps - half, beta=beta, naive_grpo=True, **run)
    if config == "rtdmd-natural":
        return "rtdmd", dict(cold_steps=half, rl_steps=steps - half, beta=beta, stage2_recipe="natural", **run)
    if config == "rtdmd-tilted":
        return "rtdmd", dict(cold_steps=half, rl_steps=steps - half, beta=beta, stage2_recipe="natural",
                             dm_target="tilted", **run)
    if config == "gdmd":
        return "gdmd", dict(num_steps=steps, cold_start_steps=half, **run)
    if config == "gdmd-raw-samples":
        return "gdmd", dict(num_steps=steps, cold_start_steps=half, naive_fusion=True, **run)
    if config == "gdmd-no-cold-start":
        return "gdmd", dict(num_steps=steps, cold_start_steps=0, **run)
    raise ValueError(f"unknown benchmark configuration {config!r}; valid: {', '.join(BENCH_CONFIGS)}")


def train_and_eval(config, steps, seed, beta, out_dir, eval_samples, eval_seed):
    """Worker: train one configuration at one seed, then evaluate its run directory with eval.py (in this process,
    with the code that trained it). Returns (eval row with the configuration, seed and training time; the student's
    evaluation samples, for the figure). A run that diverges is a row, not a crash."""
    import torch

    torch.set_num_threads(1)
    import importlib

    import eval as ev

    method, kwargs = method_args(config, steps, seed, beta, Path(out_dir))
    module = importlib.import_module(method)
    start, cpu = time.time(), time.process_time()
    try:
        out = module.main(module.Args(**kwargs))
    except FloatingPointError as err:
        return {"config": config, "seed": seed, "method": method, "failed": str(err),
                "train_seconds": time.time() - start}, None
    train_s, train_cpu = time.time() - start, time.process_time() - cpu
    row, x, _, _ = ev.evaluate_run(out["run_dir"], eval_samples, eval_seed, beta)
    return {**row, "config": config, "seed": seed, "eval_seed": row["seed"], "train_seconds": train_s,
            "train_cpu_seconds": train_cpu}, x


# =====================================================================================================
#                                       aggregation and figures
# =====================================================================================================

AGG_KEYS = ("energy_distance", "energy_ratio", "energy_distance_tilted", "energy_ratio_tilted", "modes_covered",
            "max_mode_mass_error", "off_manifold", "mean_reward", "teacher_logp", "diversity", "train_seconds")


def aggregate(rows, configs):
    """Per configuration: (mean, std over seeds) of every AGG_KEYS metric (std with ddof 1; 0 for one seed)."""
    out = []
    for config in configs:
        runs = [r for r in rows if r["config"] == config and "failed" not in r]
        agg = {"name": config, "seeds": len(runs), "failed": sum(r["config"] == config and "failed" in r for r in rows)}
        for key in AGG_KEYS:
            vals = [float(r[key]) for r in runs if key in r]
            if vals:
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                agg[key] = (mean, std)
        out.append(agg)
    return out


BENCH_COLUMNS = [
    ("energy_distance", "ED to teacher", "{:.3g}"),
    ("energy_ratio", "ED / floor", "{:.3g}"),
    ("energy_distance_tilted", "ED to tilted", "{:.3g}"),
    ("energy_ratio_tilted", "ED tilted / floor", "{:.3g}"),
    ("modes_covered", "modes", "{:.1f}"),
    ("off_manifold", "off-manifold", "{:.3f}"),
    ("mean_reward", "reward", "{:.3g}"),
    ("teacher_logp", "teacher log p", "{:.3g}"),
    ("diversity", "diversity", "{:.3g}"),
]


def plot_reward_vs_logp(agg, refs, path, xlim=(-10.0, -1.5), ylim=(-0.5, 3.0)):
    """Mean reward against mean teacher log-density per configuration (error bars: std over seeds): up is more
    reward, right is closer to the data manifold. A configuration outside the axes (reward hacking: rewards ~1e15,
    log-densities ~-1e30) is drawn as a triangle on the border with its values written beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    off_chart = 0
    for i, a in enumerate(agg):
        if "mean_reward" not in a:
            continue
        (r, rs), (lp, lps) = a["mean_reward"], a["teacher_logp"]
        color = f"C{i % 10}"
        if xlim[0] <= lp <= xlim[1] and ylim[0] <= r <= ylim[1]:
            ax.errorbar(lp, r, xerr=lps, yerr=rs, fmt="o", capsize=3, color=color, label=a["name"])
        else:
            x, y = min(max(lp, xlim[0]), xlim[1]), min(max(r, ylim[0]), ylim[1])
            ax.scatter(x, y, marker="<" if lp < xlim[0] else "^", s=80, color=color, label=a["name"], clip_on=False)
            ax.annotate(f"{a['name']}: reward {r:.2g}, log p {lp:.2g}", (x, y), fontsize=7,
                        xytext=(8, -14 - 11 * off_chart), textcoords="offset points")
            off_chart += 1
    for ref in refs:
        ax.scatter(ref["teacher_logp"], ref["mean_reward"], marker="*", s=150, color="k")
        ax.annotate(ref["name"].split(" (")[0], (ref["teacher_logp"], ref["mean_reward"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("mean teacher log-density of the samples (higher: on the data manifold)")
    ax.set_ylabel("mean reward r = x_1")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_student_steps(rows, configs, path, eval_samples, eval_seed, max_points=2000):
    """The K steps' x0 outputs side by side (seed 0 of every configuration whose method samples with dmd.py's K-step
    sampler: dmd, dmdr, gdmd), one row per configuration, with each step's energy distance to the teacher."""
    import importlib

    import eval as ev

    panels, names = [], []
    for c in configs:
        run = next((r for r in sorted(rows, key=lambda r: r["seed"]) if r["config"] == c and "failed" not in r), None)
        if run is None:
            continue
        loaded = ev.load_run(run["run_dir"], allow_new_options=True)
        module = importlib.import_module(loaded["method"])
        if "every_step" not in module.sample_student.__code__.co_varnames:
            continue
        world, args = loaded["world"], loaded["args"]
        gen = __import__("torch").Generator().manual_seed(eval_seed)
        cond = world.sample_cond(eval_samples, gen)
        outputs = module.sample_student(world, cond, module.student_sigmas(world, args.student_steps),
                                        world.noise(cond, gen), generator=gen, every_step=True)
        metrics = world.evaluate(outputs[-1], cond, steps=outputs)
        panels.append([(f"{c}: step {k} (ED {metrics[f'energy_distance_step{k}']:.3g})", x[:max_points])
                       for k, x in enumerate(outputs)])
        names.append(c)
    if panels:
        flat = [p for row in panels for p in row]
        ev.plot_panels(flat, world, path, None, "every student step's x0 output (seed 0; the last is the sample)")
    return names


def run_jobs(args, configs, out_dir):
    """Train and evaluate every (configuration, seed) in worker processes; each row is appended to bench_rows.jsonl
    as it finishes. Returns rows, {(config, seed): samples}, wall seconds, CPU seconds of the workers."""
    jobs = [(c, s) for s in args.seeds for c in configs]
    start, cpu0 = time.time(), os.times()
    rows, samples = [], {}
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool, \
            open(out_dir / "bench_rows.jsonl", "a") as log:  # every finished run is on disk at once
        futures = [pool.submit(train_and_eval, c, args.steps, s, args.beta, str(out_dir), args.eval_samples,
                               args.eval_seed) for c, s in jobs]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="bench", disable=not args.progress):
            row, x = fut.result()
            rows.append(row)
            samples[(row["config"], row["seed"])] = x
            log.write(json.dumps(row, default=str) + "\n")
            log.flush()
    t = os.times()
    cpu = (t.children_user + t.children_system) - (cpu0.children_user + cpu0.children_system)
    return rows, samples, time.time() - start, cpu


def load_report(out_dir, eval_samples, eval_seed):
    """Rows of an earlier benchmark (bench_rows.jsonl) and its student samples, re-drawn from the checkpoints.
    The training seed is taken from the run directory's name (<config>__<seed>)."""
    import eval as ev

    rows = [json.loads(line) for line in (out_dir / "bench_rows.jsonl").read_text().splitlines() if line.strip()]
    samples = {}
    for r in rows:
        r["seed"] = int(Path(r["run_dir"]).name.rsplit("__", 1)[1]) if "run_dir" in r else r["seed"]
        if "failed" not in r:
            run = ev.load_run(r["run_dir"], allow_new_options=True)
            samples[(r["config"], r["seed"])] = ev.sample_run(run, eval_samples, eval_seed)[0]
    old = json.loads((out_dir / "bench.json").read_text()) if (out_dir / "bench.json").exists() else {}
    return rows, samples, old.get("wall_seconds", float("nan")), old.get("cpu_seconds", float("nan")), old.get("steps")


def validate(args):
    """Every check that can fail before any work starts (the command line prints its error on one line)."""
    for c in args.only:
        if c not in BENCH_CONFIGS:
            raise ValueError(f"unknown benchmark configuration {c!r}; valid: {', '.join(BENCH_CONFIGS)}")
    if args.steps < 2 or not args.seeds or args.workers < 1:
        raise ValueError(f"need steps >= 2, at least one seed and workers >= 1; got steps {args.steps}, seeds "
                         f"{list(args.seeds)}, workers {args.workers}")
    if args.eval_samples < 2:
        raise ValueError(f"eval_samples must be >= 2, got {args.eval_samples}")
    if not args.beta >= 0:
        raise ValueError(f"beta must be >= 0, got {args.beta}")
    if args.report is not None:
        if not (Path(args.report) / "bench_rows.jsonl").is_file():
            raise FileNotFoundError(f"--report {args.report}: no bench_rows.jsonl there (not a benchmark directory)")
    elif args.out_dir is not None and Path(args.out_dir).exists():
        raise FileExistsError(f"--out-dir {args.out_dir} exists; a benchmark directory is never overwritten")


def main(args):
    import torch

    import eval as ev

    torch.set_num_threads(1)
    validate(args)
    configs = list(args.only) or list(BENCH_CONFIGS)
    if args.report is not None:
        out_dir = Path(args.report)
        rows, samples, wall, cpu, steps = load_report(out_dir, min(args.eval_samples, 2000), args.eval_seed)
        args.steps = steps or args.steps  # the budget the runs were trained with
        configs = [c for c in configs if any(r["config"] == c for r in rows)]
        seeds = sorted({r["seed"] for r in rows})
    else:
        out_dir = Path(args.out_dir or f"runs/bench__{time.strftime('%Y%m%d-%H%M%S')}")
        out_dir.mkdir(parents=True, exist_ok=False)
        rows, samples, wall, cpu = run_jobs(args, configs, out_dir)
        seeds = list(args.seeds)

    # references: exact teacher and tilted-teacher samples, measured like the students (the world of the first run)
    first = next(r for r in rows if "failed" not in r)
    world = ev.load_run(first["run_dir"], allow_new_options=True)["world"]  # the method files may have moved on
    refs, ref_sets = ev.reference_results(world, args.eval_samples, args.beta)
    agg = aggregate(rows, configs)

    cmd = "python bench.py" + ("" if args.steps == 600 else f" --steps {args.steps}") + \
        ("" if tuple(seeds) == (0, 1, 2) else " --seeds " + " ".join(map(str, seeds))) + \
        ("" if not args.only else " --only " + " ".join(args.only))
    table = ev.markdown_table(refs + agg, first=("name", "configuration"), columns=BENCH_COLUMNS,
                              extra=(("seeds", "seeds", "{}"),))
    failed = [f"- {r['config']} seed {r['seed']}: diverged ({r['failed']})" for r in rows if "failed" in r]
    text = (f"# Toy benchmark\n\n`{cmd}`  ({len(rows)} runs, {args.steps} generator updates each, seeds "
            f"{', '.join(map(str, seeds))}; wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min in {args.workers} "
            f"worker processes)\n\nmean ± std over seeds; evaluation: {args.eval_samples} samples from the shared noise "
            f"seed {args.eval_seed}; tilted teacher p exp(beta r) / Z with beta = {args.beta:g}, linear reward r = x_1.\n\n"
            f"{table}\n\n" + "\n".join(failed) + "\n")
    (out_dir / "bench.md").write_text(text)
    (out_dir / "bench.json").write_text(json.dumps({"command": cmd, "wall_seconds": wall, "cpu_seconds": cpu,
                                                    "steps": args.steps, "runs": rows, "references": refs,
                                                    "aggregate": agg}, indent=2, default=str))

    # figure: the lowest seed of each configuration, beside the teacher and the tilted teacher
    panels = list(ref_sets)
    for c in configs:
        run = next((r for r in sorted(rows, key=lambda r: r["seed"]) if r["config"] == c and "failed" not in r), None)
        if run is not None:
            panels.append((f"{c} (seed {run['seed']})", samples[(c, run["seed"])][:2000]))
    ev.plot_panels(panels, world, out_dir / "bench_samples.png", args.beta,
                   f"toy benchmark, {args.steps} generator updates (tilted teacher dashed)")
    plot_reward_vs_logp(agg, refs, out_dir / "bench_reward_vs_logp.png")
    with __import__("torch").no_grad():
        plot_student_steps(rows, configs, out_dir / "bench_steps.png", min(args.eval_samples, 2000), args.eval_seed)
    print(text)
    print(f"bench: wrote bench.md, bench.json, bench_samples.png, bench_reward_vs_logp.png, bench_steps.png to {out_dir}")
    return {"out_dir": out_dir, "rows": rows, "aggregate": agg, "references": refs, "wall_seconds": wall}


if __name__ == "__main__":
    import eval as ev

    ev.cli_main(main, Args, validate)
