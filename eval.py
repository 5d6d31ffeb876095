"""eval.py: metrics, a markdown table and figures for one or several run directories (any method, toy or text-to-image).

    python eval.py runs/dmd__toy2d__0__<time>                 # -> that run dir: eval.json, eval.md, eval_samples.png
    python eval.py runs/dmd__toy2d__0__* runs/rtdmd__toy2d__0__* --out-dir evals/dmd_vs_rtdmd   # side by side
    python eval.py runs/gdmd__toy2d__0__<time> --beta 0.5 --samples 8000 --seed 7            # held-out noise
    python bench.py                                           # the side-by-side benchmark (trains, then uses this file)

What it does, for every run directory:
    1. reads config.json and checks it against the `Args` of the method file named by its "method" key (dmd.py,
       dmdr.py, rtdmd.py, gdmd.py): a key the method does not know, or a key it lacks, means the config comes from
       another method or another version of the file, and is a clear error rather than a silently different world
       (--allow-new-options: options the file gained after the run take their defaults, and the table says so); then
       the method's own validate() checks the values;
    2. builds a fresh world with that method file's own make_world and loads the trained generator from checkpoint/
       (world.load; a run without one is a clear error);
    3. samples the K-step student with that method file's own sampler (dmd, gdmd: the DMD2 multi-step sampler
       `sample_student(world, cond, sigmas, noise)`; dmdr: its rollout with the run's --sampler, sde = DMD2's or the
       authors' deterministic ode, on the world as dmdr.configure_world sets it (--shift); rtdmd: its CPS sampler at the
       run's eta), so eval measures the student the method trained, not a re-implementation of it;
    4. measures it (toy): energy distance to the teacher and to the exact reward-tilted teacher p exp(beta r) / Z, each
       with its noise floor (the value a perfect student reaches on average at this sample size, so distance / floor
       ~ 1 means "indistinguishable"), modes covered, worst mode-mass error, off-manifold fraction, mean reward, mean
       teacher log-density (low: samples off the data manifold, e.g. reward hacking), and diversity (mean pairwise
       distance, beside the teacher's own), plus a figure of the samples over the teacher's contours (tilted: dashed).
With the default seed (None: the run's own evaluation noise, config seed + 1) and sample count (the run's
eval_samples), eval.json reproduces the run's last evaluation in metrics.jsonl exactly: same noise, same reference.

Runs of different toy worlds (e.g. ring8 beside grid25) are grouped by world: the table has a world column, each
world has its own reference rows and its own figure (eval_samples.png, eval_samples_world2.png, ...), and eval.md says
which runs each figure leaves out. Bad input (a missing run directory, a config its method refuses, --device cuda
without CUDA) is one line, `error: <message>`, exit status 2, before any work.

beta: the reward-tilted teacher needs a temperature. rtdmd has one (--beta, the tilt it trains toward); dmd, dmdr and
gdmd do not (dmdr's rt_dm_beta scales r / ||r||, not r), so they are compared with the tilt at --beta (default 1.0).

Text-to-image runs (t2i/, --model sd3-medium / sdxl / ...): the same loader (the run's --model-path supplies the
base weights, checkpoint/generator/ the LoRA), on the held-out prompts with fixed noise: CLIP score, PickScore,
HPSv2.1, aesthetic score, ImageReward of the student and of the teacher (each only when its weights and package are
present; the table lists the skipped ones and why), diversity as the mean pairwise distance of CLIP image embeddings
between samples of a prompt, NFE and seconds per image of the K-step student against the teacher (its pipeline's
default steps with the run's CFG), and eval_grid_<run>.png, student and teacher side by side from the same noise.

    python eval.py runs/dmd__sd3-medium__0__<time> --samples 64 --reward-checkpoints pickscore=/models/PickScore_v1

Config versions: a config.json may carry a "version" key; when the method file defines VERSION, the two must agree.
Without it, the check is the key check of step 1.
"""

import dataclasses
import gc
import importlib
import json
import math
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

import dmd  # find_checkpoint: the checkpoint layout every method shares
import tyro
from tqdm import tqdm

METHODS = ("dmd", "dmdr", "rtdmd", "gdmd")  # method files eval can load (method files never import each other; eval may)
T2IMetric = Literal["clip", "pickscore", "hpsv2", "aesthetic", "imagereward"]  # the papers' suite (t2i/rewards.py)
T2I_METRICS = typing.get_args(T2IMetric)
CONFIG_META_KEYS = ("method", "version", "provenance")  # config.json keys that are not Args fields (provenance: git
# commit, package versions and the resolved device of the run)
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
    metrics: tuple[T2IMetric, ...] = T2I_METRICS
    """text-to-image: the metric suite (each is skipped, with its reason in the table, when its weights or package are
    missing): clip, pickscore, hpsv2, aesthetic, imagereward"""
    reward_checkpoints: Optional[str] = None
    """text-to-image: local metric weights name=PATH,... (added to the run's --reward-checkpoints)"""
    teacher_steps: Optional[int] = None
    """text-to-image: teacher sampling steps (default: the pipeline's, SD3 28, SDXL 50)"""
    teacher_cfg: Optional[float] = None
    """text-to-image: teacher guidance scale (default: the run's guidance_scale)"""
    teacher: bool = True
    """text-to-image: also sample and score the teacher (speed and metric baselines, side-by-side grid)"""
    device: str = "auto"
    """cpu, cuda (cuda:N), or auto (cuda when available)"""
    progress: bool = True
    """show a tqdm progress bar over runs"""


# =====================================================================================================
#                                   the command line
# =====================================================================================================


def cli_main(main, args_type, check, **main_kwargs):
    """The command line: parse args_type with tyro, then check(args), then main(args, **main_kwargs). check holds the
    validation, which runs before any work: its ValueError, FileNotFoundError or FileExistsError is the user's input,
    printed as `error: <message>` on one line with exit status 2 (as tyro does for a bad flag), no traceback. The
    same exceptions raised later, inside main, are crashes and keep their tracebacks."""
    args = tyro.cli(args_type)
    try:
        check(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        raise SystemExit(2) from None
    return main(args, **main_kwargs)


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
    args = module.resolve_defaults(args) if hasattr(module, "resolve_defaults") else args
    if hasattr(module, "validate"):
        # the method's own checks, so a config edited by hand fails here and not inside the world; where the run ran
        # (its device, its run name, now taken) is not what eval uses, so those two are not re-checked
        where_it_ran = {k: v for k, v in (("device", "auto"), ("run_name", None)) if k in fields}
        try:
            module.validate(dataclasses.replace(args, **where_it_ran))
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"{where}: {module.__name__}.py's validate refuses this config: {err}") from None
    return args


def check_run(run_dir, allow_new_options=False):
    """Everything about a run directory that can be checked without building its world: config.json, the method,
    the config against the method's Args, and a generator checkpoint (toy: checkpoint/generator.pt; text-to-image:
    checkpoint/generator/, a diffusers LoRA). Returns the config, module and Args."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    module = method_module(config["method"])
    args = config_to_args(config, module, run_dir / "config.json", allow_new_options)
    ckpt = dmd.find_checkpoint(run_dir) or run_dir / "checkpoint"  # the last complete one, in every crash window (every
    # method writes it with dmd.py's save_checkpoint, a marked copy)
    if not ((ckpt / "generator.pt").exists() or (ckpt / "generator").is_dir()):
        raise FileNotFoundError(f"{run_dir} has no checkpoint (no {ckpt / 'generator.pt'} or {ckpt / 'generator'}/): the "
                                "run stopped before its first checkpoint, or this is not a finished run directory")
    defaulted = sorted({f.name for f in dataclasses.fields(module.Args)} - set(config))
    return {"run_dir": run_dir, "config": config, "method": config["method"], "module": module, "args": args,
            "options_defaulted": defaulted, "checkpoint": ckpt}


def resolve_device(device):
    """auto -> cuda when available, else cpu; a CUDA device on a torch without one is a clear error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) has no CUDA device; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return device


def check_args(args):
    """Everything eval can check before any work: the options, and every run directory (check_run). Returns the
    checked runs."""
    if not args.run_dirs:
        raise ValueError("give at least one run directory")
    resolve_device(args.device)
    if args.samples is not None and args.samples < 2:
        raise ValueError(f"--samples must be >= 2, got {args.samples}")
    if args.beta is not None and not args.beta >= 0:
        raise ValueError(f"--beta must be >= 0, got {args.beta}")
    if args.teacher_steps is not None and args.teacher_steps < 1:
        raise ValueError(f"--teacher-steps must be >= 1, got {args.teacher_steps}")
    return [check_run(run_dir, args.allow_new_options) for run_dir in args.run_dirs]


def load_run(run_dir, device="cpu", allow_new_options=False):
    """check_run, then a fresh world built by the method file's own make_world (and configured by its configure_world,
    where it has one: dmdr's --shift and --hps-prefix) with the trained generator loaded (world.load) and the
    checkpoint's step. Text-to-image worlds load their weights from the run's --model-path."""
    run = check_run(run_dir, allow_new_options)
    ckpt = run["checkpoint"]
    world = run["module"].make_world(run["args"], device)
    if hasattr(run["module"], "configure_world"):
        world = run["module"].configure_world(world, run["args"])
    world.load("generator", ckpt)
    state = ckpt / "state.json"
    run["step"] = json.loads(state.read_text())["step"] if state.exists() else None
    run["world"] = world
    return run


# =====================================================================================================
#                                 sampling with the method's own sampler
# =====================================================================================================


@torch.no_grad()
def sample_run(run, n, seed):
    """n student samples and their conditions, drawn exactly as the method's own evaluate() draws them:
    cond, then noise, then the sampler, all from one generator seeded with `seed`."""
    world = run["world"]
    gen = torch.Generator().manual_seed(seed)
    cond = world.sample_cond(n, gen)
    noise = world.noise(cond, gen)
    return sample_run_from(run, cond, noise, gen), cond


@torch.no_grad()
def sample_run_from(run, cond, noise, gen):
    """The method's own K-step student sampler from given conditions and noise: rtdmd's CPS sampler at the run's eta
    on the levels [t_0, ..., t_K = 0]; dmdr: its rollout with the run's sampler (sde draws from gen as DMD2's
    sampler does, ode is deterministic), as its evaluate_student samples; dmd, gdmd: DMD2's multi-step sampler."""
    world, args, module = run["world"], run["args"], run["module"]
    if run["method"] == "rtdmd":
        schedule = module.student_schedule(world, args.student_steps)
        return module.sample_student(world, cond, schedule, args.eta, noise, generator=gen)
    if run["method"] == "dmdr":
        sigmas = module.student_sigmas(world, args.student_steps)
        return module.rollout(world, cond, sigmas, noise, sampler=args.sampler, generator=gen)[0]
    return module.sample_student(world, cond, module.student_sigmas(world, args.student_steps), noise, generator=gen)


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


def sampler_name(run):
    """The student sampler eval.py uses for a run: cps (rtdmd), ode (a dmdr run trained with --sampler ode), or dmd2."""
    if run["method"] == "rtdmd":
        return "cps"
    return "ode" if run["method"] == "dmdr" and run["args"].sampler == "ode" else "dmd2"


def evaluate_run(run_dir, samples=None, seed=None, beta=None, device="cpu", allow_new_options=False, t2i_options=None):
    """Load a run directory, sample its student and measure it. Returns (result dict, samples, cond, run).
    Toy: toy_metrics. Text-to-image: t2i_metrics with t2i_options (a dict of its keyword arguments)."""
    run = load_run(run_dir, device, allow_new_options)
    args = run["args"]
    n = samples if samples is not None else args.eval_samples
    seed = seed if seed is not None else args.seed + 1  # the run's own evaluation noise (see the methods' evaluate)
    result = {
        "run_dir": str(run["run_dir"]), "name": run["run_dir"].name, "method": run["method"], "model": args.model,
        "step": run["step"], "student_steps": args.student_steps, "sampler": sampler_name(run),
        "samples": n, "seed": seed,
    }
    if run["options_defaulted"]:
        result["options_defaulted"] = run["options_defaulted"]
    if args.model != "toy2d":
        metrics, x, cond = t2i_metrics(run, n, seed, **(t2i_options or {}))
        return {**result, **metrics}, x, cond, run
    beta, beta_source = run_beta(run, beta)
    x, cond = sample_run(run, n, seed)
    return {**result, "beta": beta, "beta_source": beta_source, **toy_metrics(run["world"], x, cond, beta)}, x, cond, run


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
#                                      text-to-image metrics
# =====================================================================================================

TEACHER_STEPS = {"sd3": 28, "sdxl": 50}  # the diffusers pipelines' default num_inference_steps


def teacher_sigmas(world, steps):
    """The noise levels (highest first) at which the stock pipeline evaluates the teacher for `steps` inference steps:
    its own scheduler (the class named in the model's scheduler config) after set_timesteps(steps), as the pipeline
    calls it. SD3 (FlowMatchEulerDiscreteScheduler): its sigmas without the final 0, 1 ... ~0.009 for 28 steps with
    shift 3 (the shift is applied to a grid that already ends at the shifted sigma_min); with dynamic shifting, mu as
    the pipeline computes it from the latent size. SDXL (EulerDiscreteScheduler, "leading" spacing): the timesteps
    981, 961, ..., 1 for 50 steps, as VP levels sqrt(1 - alphas_cumprod[t]). A world without a pipeline scheduler
    (the toy): the pre-shift levels 1, 1 - 1/steps, ..., 1/steps."""
    if getattr(world, "scheduler_config", None) is None:
        return [float(world.sigma(torch.tensor(1.0 - k / steps))) for k in range(steps)]
    import diffusers

    config = dict(world.scheduler_config)
    sched = getattr(diffusers, config["_class_name"]).from_config(config)
    kwargs = {}
    if world.is_flow and config.get("use_dynamic_shifting"):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = getattr(world.net.config, "patch_size", 1) or 1
        seq = (world.data_shape[1] // patch) * (world.data_shape[2] // patch)
        kwargs["mu"] = calculate_shift(seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                       config.get("base_shift", 0.5), config.get("max_shift", 1.16))
    sched.set_timesteps(steps, **kwargs)
    if world.is_flow:
        return [float(s) for s in sched.sigmas[:-1]]
    return [float(world.sigma((t + 1) / world.num_train_timesteps)) for t in sched.timesteps.double()]  # tau = 1000 t - 1


@torch.no_grad()
def sample_teacher(world, cond, noise, steps, cfg):
    """The teacher as a stock pipeline samples it: `steps` deterministic steps at the pipeline scheduler's own levels
    (teacher_sigmas), with classifier-free guidance. Each step predicts x0 and moves to the next level along the
    predicted noise, x' = alpha' x0 + sigma' (x - alpha x0) / sigma (DDIM; the flow Euler step, and the
    EulerDiscreteScheduler step written in VP coordinates); the last step returns the x0 prediction (the schedulers'
    step to sigma 0)."""
    levels = teacher_sigmas(world, steps)
    x = noise
    for k, sigma in enumerate(levels):
        x0 = world.x0("teacher", x, sigma, cond, cfg=cfg)
        if k + 1 < len(levels):
            eps = (x - world.alpha(torch.tensor(sigma)) * x0) / sigma
            x = world.alpha(torch.tensor(levels[k + 1])) * x0 + levels[k + 1] * eps
    return x0


def load_scorers(world, names, checkpoints, device):
    """The reward models of the metric suite that load, and for the others the reason (weights or package missing):
    a missing reward is a row note, never a crash."""
    from t2i.rewards import REWARDS, make_reward

    scorers, skipped = {}, {}
    for name in names:
        if name not in REWARDS:
            skipped[name] = f"unknown metric (valid: {', '.join(REWARDS)})"
            continue
        try:
            scorers[name] = make_reward(name, world.prompts, device, checkpoints)
        except Exception as err:  # noqa: BLE001 (missing weights, gated hub, optional package absent: all skip)
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return scorers, skipped


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


@torch.no_grad()
def t2i_metrics(run, n, seed, metrics=T2I_METRICS, reward_checkpoints=None, teacher_steps=None, teacher_cfg=None,
                teacher=True, batch_size=4, grid_path=None):
    """Text-to-image evaluation on the held-out prompts (world.sample_cond with a generator cycles through them) with
    fixed noise: each loadable metric of `metrics` on the student's and the teacher's decoded images (mean), diversity
    as the mean pairwise distance of CLIP image embeddings between samples of the same prompt (all samples when every
    prompt has one), NFE and seconds per image of sampling (latents; the VAE decode, the same for both, excluded).
    The teacher samples the same noise with its default steps and CFG (NFE = steps, x2 with CFG). Returns (metrics,
    student latents, cond); grid_path: a figure of student and teacher side by side per prompt."""
    from t2i.rewards import parse_checkpoints

    world, args = run["world"], run["args"]
    checkpoints = {**parse_checkpoints(getattr(args, "reward_checkpoints", None)), **parse_checkpoints(reward_checkpoints)}
    gen = torch.Generator().manual_seed(seed)
    cond = world.sample_cond(n, gen)
    noise = world.noise(cond, gen)
    student, seconds = _timed(lambda: sample_run_from(run, cond, noise, gen))
    out = {"nfe_student": args.student_steps, "seconds_per_image_student": seconds / n}
    sets = {"student": student}
    if teacher:
        steps = teacher_steps or TEACHER_STEPS[world.family]
        cfg = teacher_cfg if teacher_cfg is not None else args.guidance_scale
        sets["teacher"], seconds = _timed(lambda: sample_teacher(world, cond, noise, steps, cfg))
        out.update(teacher_steps=steps, teacher_cfg=cfg, nfe_teacher=steps * (2 if cfg != 1.0 else 1),
                   seconds_per_image_teacher=seconds / n)
    scorers, skipped = load_scorers(world, metrics, checkpoints, world.device)
    images = {who: torch.cat([world.decode(x[i : i + batch_size]) for i in range(0, n, batch_size)]) for who, x in sets.items()}
    for who, imgs in images.items():
        for name, scorer in scorers.items():
            out[f"{name}_{who}"] = float(torch.cat([scorer(imgs[i : i + batch_size], cond[i : i + batch_size]).float()
                                                    for i in range(0, n, batch_size)]).mean())
        if "clip" in scorers:
            emb = torch.cat([scorers["clip"].image_embedding(imgs[i : i + batch_size]) for i in range(0, n, batch_size)])
            out[f"diversity_{who}"] = prompt_diversity(emb, cond)
    if "clip" not in scorers:
        out["diversity_skipped"] = "needs the clip metric"
    out["skipped"] = skipped
    if grid_path is not None:
        plot_grid(images, cond, world.prompts, grid_path)
    return out, student, cond


def prompt_diversity(embeddings, cond):
    """Mean pairwise distance of embeddings (n, D) within each prompt's samples, averaged over prompts with >= 2
    samples; over all samples when no prompt has two (diversity across prompts then, not across seeds)."""
    groups = [embeddings[cond == c] for c in cond.unique()]
    groups = [g for g in groups if g.shape[0] >= 2]
    if not groups:
        return mean_pairwise_distance(embeddings)
    return sum(mean_pairwise_distance(g) for g in groups) / len(groups)


def plot_grid(images, cond, prompts, path, max_rows=4):
    """Student and teacher images side by side (columns), one prompt per row, the same noise in each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    who = list(images)
    rows = min(max_rows, images[who[0]].shape[0])
    fig, axes = plt.subplots(rows, len(who), figsize=(3 * len(who), 3 * rows), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(who):
            ax = axes[r, c]
            ax.imshow(images[name][r].permute(1, 2, 0).float().cpu().numpy())
            ax.set_xticks([]); ax.set_yticks([])  # noqa: E702
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(prompts[int(cond[r])][:40], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def t2i_table(rows):
    """The text-to-image table, grouped by world (the --model preset): speed, then each metric as student / teacher,
    diversity, and what was skipped."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    rows = sorted(rows, key=lambda r: models.index(r["model"]))  # stable: run order within a world
    names = [m for m in T2I_METRICS if any(f"{m}_student" in r for r in rows)]
    header = ["run", "world", "step", "NFE student / teacher", "s / image student / teacher"] + \
             [f"{m} student / teacher" for m in names] + ["diversity student / teacher", "skipped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pair(r, a, b, fmt="{:.4g}"):
        return " / ".join(fmt.format(r[k]) if k in r else "-" for k in (a, b))

    for r in rows:
        cells = [r["name"], r["model"], str(r.get("step")), pair(r, "nfe_student", "nfe_teacher", "{}"),
                 pair(r, "seconds_per_image_student", "seconds_per_image_teacher", "{:.3g}")]
        cells += [pair(r, f"{m}_student", f"{m}_teacher") for m in names]
        cells += [pair(r, "diversity_student", "diversity_teacher"), ", ".join(r.get("skipped", {})) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in rows:
        for name, why in r.get("skipped", {}).items():
            notes.append(f"- {r['name']}: {name} skipped: {why}")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


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
    """One panel per (title, samples) on the world's fixed axes over the teacher's contours (solid; the tilted
    teacher's dashed), one legend below the panels; a panel whose samples leave the axes says how many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toy2d import draw_samples
    from toy2d.plots import figure_legend

    tilted = world.reward_fn.tilt(world.mixture, beta) if beta is not None and world.reward_fn.name != "radius" else None
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    label = f"tilted teacher, beta={beta:g}" if tilted is not None else None
    handles = []
    for ax, (name, x) in zip(axes.flat, panels):
        handles += draw_samples(ax, x, world.mixture, world.plot_limit, name, tilted, legend=False, tilted_label=label)
    bottom = figure_legend(fig, handles)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def world_label(world):
    """A toy world's teacher and reward in a few words (mixture, mode std, path, shift, classes, reward and its
    parameters): runs with the same label share a teacher, a reward and so one figure's contours and reference rows."""
    parts = [f"{world.mixture_name} std {world.mixture.std:g}", world.path]
    if world.shift != 1.0:
        parts.append(f"shift {world.shift:g}")
    if world.mixture.n_classes:
        parts.append(f"{world.mixture.n_classes} classes")
    reward = world.reward_fn
    if reward.name == "linear":
        parts.append("linear reward d=(" + ", ".join(f"{float(v):.3g}" for v in reward.direction) + ")")
    elif reward.name == "quadratic":
        parts.append("quadratic reward c=(" + ", ".join(f"{float(v):.3g}" for v in reward.target) + ")")
    else:
        parts.append(f"{reward.name} reward")
    return ", ".join(parts)


# =====================================================================================================
#                                             main
# =====================================================================================================


def main(args, command=None):
    """Evaluate args.run_dirs; command: the command line to print in eval.md (default: a reconstruction).
    Toy runs are grouped by world (world_label): each world has its own reference rows and its own figure
    (eval_samples.png for the first, eval_samples_world<k>.png for the k-th), and eval.md says which runs each figure
    leaves out."""
    checked = check_args(args)  # every error before any work
    device = resolve_device(args.device)
    if args.out_dir is not None:
        out_dir = Path(args.out_dir)
    elif len(args.run_dirs) == 1:
        out_dir = Path(args.run_dirs[0])
    else:
        out_dir = Path("evals") / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)

    groups, t2i_rows = {}, []  # world label -> its world, results and figure panels, in the order of the runs
    for run_dir, c in tqdm(list(zip(args.run_dirs, checked)), desc="eval", disable=not args.progress or len(checked) == 1):
        options = None
        if c["args"].model != "toy2d":
            options = dict(metrics=args.metrics, reward_checkpoints=args.reward_checkpoints, teacher=args.teacher,
                           teacher_steps=args.teacher_steps, teacher_cfg=args.teacher_cfg,
                           grid_path=out_dir / f"eval_grid_{c['run_dir'].name}.png")
        result, x, _, run = evaluate_run(run_dir, args.samples, args.seed, args.beta, device, args.allow_new_options,
                                         options)
        if options is not None:
            t2i_rows.append(result)
            del run, x  # free this pipeline before the next run's is loaded
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        label = world_label(run["world"])
        group = groups.setdefault(label, {"world": run["world"], "results": [], "panels": []})
        group["results"].append({**result, "world": label})
        group["panels"].append((f"{result['name']}\n{result['method']}, step {result['step']}", x))

    toy, refs, rows, figures = [], [], [], []
    for k, (label, group) in enumerate(groups.items()):
        first, panels = group["results"][0], group["panels"]
        group_refs = []
        if args.reference:  # exact samples of this world's teacher and tilted teacher, at its first run's size and beta
            group_refs, ref_sets = reference_results(group["world"], first["samples"], first["beta"])
            group_refs = [{**r, "world": label} for r in group_refs]
            panels = ref_sets[:1] + panels
        name = "eval_samples.png" if k == 0 else f"eval_samples_world{k + 1}.png"
        plot_panels(panels, group["world"], out_dir / name, first["beta"],
                    f"world: {label}\nstudent samples over the teacher's contours (tilted teacher, beta="
                    f"{first['beta']:g}, dashed)")
        toy += group["results"]
        refs += group_refs
        rows += group_refs + group["results"]
        figures.append((name, label, group["results"]))

    sections, files = [], ["eval.json", "eval.md"]
    if toy:
        table = markdown_table(rows, extra=(("world", "world", "{}"), ("step", "step", "{}")))
        sections.append(f"## Toy runs\n\n{table}\n\n{table_notes(rows)}\n\n{figure_notes(figures)}")
        files += [f[0] for f in figures]
    if t2i_rows:
        sections.append(f"## Text-to-image runs\n\n{t2i_table(t2i_rows)}")
        files += [f"eval_grid_{r['name']}.png" for r in t2i_rows]
    (out_dir / "eval.json").write_text(json.dumps({"runs": toy + t2i_rows, "references": refs}, indent=2))
    cmd = command or "python eval.py " + " ".join(args.run_dirs)
    text = f"# Evaluation\n\n`{cmd}`\n\n" + "\n\n".join(sections) + "\n"
    (out_dir / "eval.md").write_text(text)
    print(text)
    print(f"eval: wrote {', '.join(files)} to {out_dir}")
    return {"out_dir": out_dir, "results": toy + t2i_rows, "references": refs}


def figure_notes(figures):
    """What each toy figure shows and leaves out: [(file, world label, its runs' results)] -> markdown lines. A figure
    shows one world's runs (its contours are that teacher's); its tilted contours are at its first run's beta."""
    lines = ["Figures (samples over the teacher's contours, one figure per world):"]
    for name, label, results in figures:
        shown = ", ".join(r["name"] for r in results)
        line = f"- {name}: world {label}: {shown}"
        others = [f"{r['name']} ({other})" for other, _, rs in figures if other != name for r in rs]
        if others:
            line += "; leaves out the runs of other worlds: " + ", ".join(others)
        beta = results[0]["beta"]
        off_beta = [f"{r['name']} (beta {r['beta']:g})" for r in results if r["beta"] != beta]
        if off_beta:
            line += f"; tilted contours at beta {beta:g}, not the beta of " + ", ".join(off_beta)
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    import shlex

    cli_main(main, Args, check_args, command="python eval.py " + shlex.join(sys.argv[1:]))
