"""bench_speed.py: how long the toy runs take, measured here so that no test has to assert a time.

    python bench_speed.py                          # each method's toy default run (`python dmd.py`, ...), in turn
    python bench_speed.py --fraction 0.2           # the first 20% of each default run's updates: a quick measurement
    python bench_speed.py --methods dmd --notebooks   # one method, and each classroom notebook executed (nbclient)

Each run is the method file's own main() on its toy defaults (resolve_defaults), in this process, one after another,
with one torch thread (the method files set it for the toy). --fraction f < 1 scales every step count of the run
(dmd and gdmd: num_steps and gdmd's cold_start_steps; dmdr: both stages and the DynaDG / DynaRS ramp; rtdmd: both
stages) and keeps the evaluation cadence, so the run is the default run's beginning, not a smaller problem. Each row
gives the milliseconds per generator update (from the training loop's own clock, periodic evaluations included), the
fixed cost (imports, the world, the step-0 and final evaluations, the figures) and, for f < 1, the full run's
estimated wall time, fixed + rate x its updates, and CPU time, at the measured run's CPU share of its wall time
(checked once: dmd.py at f = 0.2 estimated 118 s wall / 58 s CPU for the full run, which then took 126 / 62 s). A wall time on a shared machine is not the code's alone: the 1-minute load average before and after each
measurement is printed and written beside it, with the CPU seconds of this process (user + system), which the load
changes much less. Writes <out_dir>/speed.json (default runs/speed__<time>/; with --notebooks also the executed
notebooks) and prints a markdown table.
"""

import json
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, get_args

Method = Literal["dmd", "dmdr", "rtdmd", "gdmd"]
METHODS = get_args(Method)
STEP_FIELDS = {  # the step counts of each method's toy run, scaled by --fraction; the first ones sum to its updates
    "dmd": (("num_steps",), ()),
    "dmdr": (("stage1_steps", "stage2_steps"), ("dynamic_steps",)),
    "rtdmd": (("cold_steps", "rl_steps"), ()),
    "gdmd": (("num_steps",), ("cold_start_steps",)),
}


@dataclass
class Args:
    methods: tuple[Method, ...] = METHODS
    """the method files whose toy default run is timed"""
    fraction: float = 1.0
    """share of each default run's generator updates to run (1: the whole run; the full-run time is then estimated)"""
    notebooks: bool = False
    """also execute each notebook in notebooks/ (a fresh kernel each, as tests/test_notebooks.py does), time it, and
    write the executed copy with its figures to <out_dir>/notebooks/"""
    seed: int = 0
    """training seed of every run"""
    out_dir: Optional[str] = None
    """where speed.json goes (default runs/speed__<time>); the runs themselves go to a temporary directory"""


def cpu_seconds():
    """User + system CPU seconds of this process and its finished children (a notebook's kernel is a child)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):
    """(fn(), {wall_s, cpu_s, load_before, load_after}): wall and CPU seconds, and the 1-minute load average."""
    load0, wall0, cpu0 = os.getloadavg()[0], time.perf_counter(), cpu_seconds()
    out = fn()
    return out, {"wall_s": time.perf_counter() - wall0, "cpu_s": cpu_seconds() - cpu0, "load_before": load0,
                 "load_after": os.getloadavg()[0]}


def toy_args(method, fraction, seed, output_dir):
    """The method's Args at its toy defaults with every step count scaled by fraction, and its generator updates."""
    import importlib

    module = importlib.import_module(method)
    args = module.resolve_defaults(module.Args(seed=seed, output_dir=output_dir, run_name=f"{method}__speed",
                                               progress=False))
    updates, others = STEP_FIELDS[method]
    for name in updates + others:
        if getattr(args, name) is not None:  # None: derived by the method (gdmd's cold start: half of num_steps)
            setattr(args, name, max(1, round(getattr(args, name) * fraction)))
    module.validate(args)
    return module, args, sum(getattr(args, name) for name in updates)


def time_method(method, fraction, seed):
    """One toy run of the method: its timing, its generator updates and its evaluations."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        module, args, updates = toy_args(method, fraction, seed, tmp)
        full_updates = toy_args(method, 1.0, seed, tmp)[2]
        out, t = timed(lambda: module.main(args))
    history = out["history"]
    row = {"name": f"{method}.py", "updates": updates, "evaluations": sum("energy_distance" in r for r in history),
           "eval_samples": args.eval_samples, "student_steps": args.student_steps, "batch_size": args.batch_size, **t}
    losses = [r for r in history if "time" in r and "energy_distance" not in r]  # training records: seconds since start
    if losses:
        # wall = fixed (imports, world, step-0 and final evaluations, figures) + rate x updates, the rate measured from
        # the training loop's own clock at its last loss record (periodic evaluations before it included)
        rate = losses[-1]["time"] / losses[-1]["step"]
        row["ms_per_update"] = 1000 * rate
        row["fixed_s"] = t["wall_s"] - rate * updates
        if fraction < 1:
            row["full_run_wall_s_estimate"] = row["fixed_s"] + rate * full_updates
            row["full_run_cpu_s_estimate"] = row["full_run_wall_s_estimate"] * t["cpu_s"] / t["wall_s"]  # same CPU share
    return row


def time_notebook(path, out_dir):
    """Execute one notebook top to bottom in a fresh kernel (no cell time limit), time it, and write the executed
    copy (with its outputs and figures) to out_dir."""
    import nbclient
    import nbformat

    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=None, startup_timeout=600, iopub_timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    _, t = timed(client.execute)
    nbformat.write(book, out_dir / path.name)
    return {"name": f"notebooks/{path.name}", **t}


def markdown(rows):
    """The measurements as a markdown table ("-": not measured for that row)."""
    def cell(r, key, fmt):
        return fmt.format(r[key]) if key in r else "-"

    lines = ["| run | generator updates | wall s | CPU s | ms per update (evaluations included) | fixed s | "
             "full run, estimated wall / CPU s | load before / after |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        estimate = (f"{r['full_run_wall_s_estimate']:.0f} / {r['full_run_cpu_s_estimate']:.0f}"
                    if "full_run_wall_s_estimate" in r else "-")
        lines.append(f"| {r['name']} | {cell(r, 'updates', '{}')} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{cell(r, 'ms_per_update', '{:.1f}')} | {cell(r, 'fixed_s', '{:.1f}')} | {estimate} | "
                     f"{r['load_before']:.2f} / {r['load_after']:.2f} |")
    return "\n".join(lines)


def validate(args):
    """Every check that can fail before any work starts."""
    if not 0 < args.fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {args.fraction}")
    for m in args.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    if args.out_dir is not None and Path(args.out_dir).exists():
        raise FileExistsError(f"--out-dir {args.out_dir} exists; it is never overwritten")


def main(args):
    validate(args)
    out_dir = Path(args.out_dir or f"runs/speed__{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True)
    rows = [time_method(m, args.fraction, args.seed) for m in args.methods]
    if args.notebooks:
        (out_dir / "notebooks").mkdir()
        rows += [time_notebook(p, out_dir / "notebooks")
                 for p in sorted((Path(__file__).resolve().parent / "notebooks").glob("*.ipynb"))]
    info = {"fraction": args.fraction, "seed": args.seed, "cpu_count": os.cpu_count(), "rows": rows}
    (out_dir / "speed.json").write_text(json.dumps(info, indent=2))
    print(f"toy run times (fraction {args.fraction:g} of each default run, {os.cpu_count()} CPUs, one torch thread)\n")
    print(markdown(rows))
    print(f"\nbench_speed: wrote {out_dir / 'speed.json'}")
    return info


if __name__ == "__main__":
    import eval as ev

    ev.cli_main(main, Args, validate)
