"""dmd.py end to end: the distillation actually distils, bad input fails before any work, failures lose nothing."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dmd
import dmdr
import gdmd
import rtdmd

REPO = Path(__file__).resolve().parents[1]


def test_one_step_student_distils_the_ring(tmp_path):
    """The default run, `python dmd.py`: a 1-step student on the 8-mode ring. At step 0 the generator IS the teacher's denoiser at sigma = 1, whose
    x0-prediction is the mixture mean for every input: all samples collapse to one point (energy distance ~1.46).
    After 1500 DMD updates it must cover all 8 modes with every mode's mass within 25% of its share 1/8 and reach an
    energy distance below 1/50 of its step-0 value (the issue's bounds, not widened).
    A mode's mass is the share of samples nearest to it; the samples on the bridges between modes are bounded
    separately: at most 15% of the samples farther than 3 mode-stds from every mode (exact teacher samples: 1.1%).
    Measured, seeds 0 / 1 / 2 (batch 512, cosine lr): energy distance 0.0085 / 0.0062 / 0.0066 from 1.44 (1/170,
    1/230, 1/220; the noise floor D (1/n + 1/m) of 4000 vs 4000 samples is 0.0013), worst mode-mass error 0.15 / 0.08 /
    0.11, off the manifold 9.1% / 9.1% / 7.4%. (Before --fake-tracks the same run drew one more random number per
    round and measured 0.0057 / 0.0088 / 0.0056: the same distribution of outcomes.) Counting only samples within 3 stds
    as a mode's mass (so the 9% on the bridges are missing from every mode), the worst error was 0.24 / 0.30 / 0.17."""
    out = dmd.main(dmd.Args(output_dir=str(tmp_path), progress=False, seed=0))  # `python dmd.py`: the toy defaults
    first, final = out["history"][0], out["final"]
    assert first["energy_distance"] > 1.0  # the collapsed step-0 student: a real distillation problem
    assert first["modes_covered"] <= 1
    assert final["modes_covered"] == 8, final
    assert final["max_mode_mass_error"] <= 0.25, final
    assert final["off_manifold"] <= 0.15, final
    assert final["energy_distance"] < first["energy_distance"] / 50, final

    run_dir = out["run_dir"]
    assert {"config.json", "metrics.jsonl", "checkpoint", "samples.png", "curves.png"} <= {p.name for p in run_dir.iterdir()}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "dmd" and config["student_steps"] == 1 and config["lr_schedule"] == "cosine"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["energy_distance"] == final["energy_distance"]
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"] == 1500


@pytest.mark.parametrize("field,value,message", [
    ("model", "sd9", "valid models: toy2d"),
    ("toy_mixture", "ring7", "valid mixtures: ring8"),
    ("toy_path", "ve", "valid paths"),
    ("student_steps", 0, "student_steps"),
    ("student_steps", 9, "student_steps"),
    ("num_steps", 0, "num_steps"),
    ("batch_size", -1, "batch_size"),
    ("fake_updates_per_step", 0, "fake_updates_per_step"),
    ("lr_generator", 0.0, "lr_generator"),
    ("lr_fake", -1e-3, "lr_fake"),
    ("lr_schedule", "linear", "valid schedules"),
    ("guidance_scale", -1.0, "guidance_scale"),
    ("renoise_min", 0.99, "renoise_min"),
    ("fake_ema", 1.0, "fake_ema"),
])
def test_bad_input_fails_before_any_work(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        dmd.main(dmd.Args(output_dir=str(tmp_path), progress=False, **{field: value}))
    assert not any(tmp_path.iterdir())  # no run directory was made


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = dmd.train_step
    calls = {"n": 0}

    def failing_train_step(world, args, sigmas, opt_generator, opt_fake):
        calls["n"] += 1
        if calls["n"] == 7:  # the generator adapter is poisoned, so the next loss is NaN
            with torch.no_grad():
                for p in world.params("generator"):
                    p.fill_(float("nan"))
        return real_step(world, args, sigmas, opt_generator, opt_fake)

    monkeypatch.setattr(dmd, "train_step", failing_train_step)
    args = dmd.Args(output_dir=str(tmp_path), run_name="nan", progress=False, num_steps=20, batch_size=32,
                    eval_every=5, eval_samples=200)
    with pytest.raises(FloatingPointError, match=r"at step 7.*checkpoint"):
        dmd.main(args)
    checkpoint = tmp_path / "nan" / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 5
    saved = [torch.load(p) for p in sorted(checkpoint.glob("generator*"))]
    assert saved, list(checkpoint.iterdir())
    for state in saved:
        tensors = state.values() if isinstance(state, dict) else [state]
        assert all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t))


def test_existing_run_dir_is_never_overwritten(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="never overwritten"):
        dmd.main(dmd.Args(output_dir=str(tmp_path), run_name="taken", progress=False, num_steps=2))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"


def test_cli(tmp_path):
    """`python dmd.py --help` documents every option; a tiny CLI run writes its run directory."""
    help_text = subprocess.run([sys.executable, "dmd.py", "--help"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout
    for option in ("--student-steps", "--fake-ema", "--renoise-min", "--lr-schedule", "--model"):
        assert option in help_text
    subprocess.run([sys.executable, "dmd.py", "--num-steps", "4", "--batch-size", "16", "--eval-every", "2",
                    "--eval-samples", "100", "--output-dir", str(tmp_path), "--run-name", "cli", "--no-progress"],
                   cwd=REPO, check=True, capture_output=True)
    assert (tmp_path / "cli" / "samples.png").exists()


@pytest.mark.parametrize("module", [dmd, dmdr, rtdmd, gdmd], ids=lambda m: m.__name__)
def test_help_groups_the_options_by_the_sections_of_args(module):
    """--help shows one group per `# ---- title ----` comment of Args, in order, every field in the group of the
    section it is written under, with its docstring; parsing through the groups gives the flat Args back."""
    import dataclasses
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(module.Args))
    expected, title = [], None
    for line in source.splitlines():  # an independent reading of the source: section comments and annotated fields
        stripped = line.strip()
        if stripped.startswith("# ----"):
            title = stripped.strip("#- ").strip()
            expected.append((title, []))
        elif re.match(r"    [a-z][a-z_0-9]*: [A-Za-z].* = ", line):  # `    name: Type = default`
            expected[-1][1].append(stripped.split(":")[0])
    groups = dataclasses.fields(module.sectioned_args(module.Args))
    got = [(g.type.__origin__.__name__, [f.name for f in dataclasses.fields(g.type.__origin__)]) for g in groups]
    assert [(re.sub(r"[^0-9A-Za-z]+", "_", t).strip("_"), n) for t, n in expected] == got
    assert [n for _, names in got for n in names] == [f.name for f in dataclasses.fields(module.Args)]
    argv = ["--seed", "7", "--toy-reward-target", "1", "-2", "--no-gradient-checkpointing", "--toy-mixture", "grid25",
            "--micro-batch-size", "4"]
    assert module.parse_args(module.Args, argv) == module.Args(seed=7, toy_reward_target=(1.0, -2.0),
                                                              gradient_checkpointing=False, toy_mixture="grid25",
                                                              micro_batch_size=4)
    assert module.parse_args(module.Args, []) == module.Args()
    help_text = subprocess.run([sys.executable, f"{module.__name__}.py", "--help"], cwd=REPO, capture_output=True,
                               text=True, check=True, env={**os.environ, "COLUMNS": "100"}).stdout  # one column of groups
    positions = [help_text.index(f"─ {t.replace('_', '-')} options") for t, _ in got]
    assert positions == sorted(positions)
    run_at = positions[[t for t, _ in got].index("run")]
    assert positions[0] < help_text.index("--student-steps ") < run_at < help_text.index("--seed ")
