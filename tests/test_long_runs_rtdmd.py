"""Long runs of rtdmd.py, on the toy (dmd.py's plumbing, as tests/test_long_runs.py checks it for dmd and gdmd):
  * exact resume across the cold-start -> RL switch: a run stopped at the switch (a cold-start-only run) or in its RL
    stage, then `--resume RUN_DIR --num-steps 40`, equals the 40-update run that never stopped: adapters, both stages'
    EMA, the EMA'd and raw generator checkpoints, every metrics record (no duplicates), bit for bit. The RL stage's
    switch-on (fresh optimisers, the generator set to the cold start's EMA), its EMA ramp (a function of the update
    count) and the RNG streams all continue as if uninterrupted;
  * a run killed mid-way (in stage 1, and in stage 2) and resumed with its own arguments is the uninterrupted run, and
    the records written after its last checkpoint are rewritten, not duplicated;
  * the micro-batched cold start (fake updates and the AC-DMD generator update) equals the unchunked one, for the toy's
    settings and the authors' text-to-image ones (dmd2 scale, clamped weighting, CPS consistency kernel);
  * command-line errors: one line `error: ...`, exit 2, no traceback, before any work (nothing is created)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rtdmd
import toy2d
from run_records import records, same_weights, strip_time, weights

REPO = Path(__file__).resolve().parents[1]
# 20 cold-start + 20 RL updates; the stage 2 EMA fires every 4th update, so it fires across every stop point
SMALL = dict(batch_size=32, groups=4, group_size=4, fake_updates_per_step=2, eval_samples=300, log_every=5, eval_every=10,
             ema_every_rl=4, progress=False)
COLD, RL = 20, 20


def same_checkpoints(a, b):
    for name in ("generator.pt", "raw/generator.pt", "fake.pt"):
        x, y = torch.load(Path(a) / "checkpoint" / name), torch.load(Path(b) / "checkpoint" / name)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 40-update run that is never stopped."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("full")
    out = rtdmd.main(rtdmd.Args(**SMALL, cold_steps=COLD, rl_steps=RL, output_dir=str(root), run_name="full"))
    return out, root / "full", weights(out["world"]), [e.clone() for e in out["ema"]]


# ---------------------------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rl_before", [0, 10], ids=["stopped-at-the-switch", "stopped-in-stage-2"])
def test_stop_and_resume_with_more_steps_equals_the_uninterrupted_run(uninterrupted, tmp_path, rl_before, capsys):
    """A run of 20 cold-start updates and rl_before RL updates, then --resume RUN_DIR --num-steps 40 (the RL stage
    lengthened to 20), equals the uninterrupted 40-update run exactly. At the switch (rl_before 0) the checkpoint holds
    stage 1's optimisers and EMA, and the resumed run performs the switch itself; in stage 2 (rl_before 10) it holds
    stage 2's, with the EMA ramp mid-way."""
    full, full_dir, full_weights, full_ema = uninterrupted
    part = rtdmd.main(rtdmd.Args(**SMALL, cold_steps=COLD, rl_steps=rl_before, output_dir=str(tmp_path), run_name="part"))
    assert part["final"]["step"] == COLD + rl_before
    assert f"rtdmd: run {tmp_path / 'part'}" in capsys.readouterr().err  # the run directory, printed at the start
    resumed = rtdmd.main(rtdmd.Args(resume=str(tmp_path / "part"), num_steps=COLD + RL, progress=False))
    assert f"rtdmd: resuming {tmp_path / 'part'} (from step {COLD + rl_before + 1})" in capsys.readouterr().err
    assert resumed["run_dir"] == tmp_path / "part"
    assert same_weights(full_weights, weights(resumed["world"]))
    assert all(torch.equal(a, b) for a, b in zip(full_ema, resumed["ema"], strict=True))  # the stage 2 EMA
    assert same_checkpoints(full_dir, tmp_path / "part")
    assert strip_time(records(full_dir)) == strip_time(records(tmp_path / "part"))  # no duplicates either
    assert resumed["final"]["energy_distance"] == full["final"]["energy_distance"]
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert (config["num_steps"], config["cold_steps"], config["rl_steps"]) == (COLD + RL, COLD, RL)
    assert config["provenance"]["device"] == "cpu" and "torch" in config["provenance"]["versions"]
    losses = [r for r in records(full_dir) if "dm_loss" in r]
    assert {r["stage"] for r in losses} == {1, 2}
    assert all(r["lr"] == (1e-3 if r["stage"] == 1 else 2e-5) and r["grad_norm"] > 0 for r in losses)


@pytest.mark.parametrize("kill_at", [17, 37], ids=["killed-in-stage-1", "killed-in-stage-2"])
def test_a_killed_run_resumed_with_its_own_arguments_is_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch,
                                                                              kill_at):
    """Kill the 40-update run at update kill_at (after its checkpoint at 10 or 30), resume it with its own arguments:
    from 10 the resumed run crosses the switch itself; the records written after the checkpoint are rewritten, not
    duplicated, and everything equals the run that was never killed."""
    _, full_dir, full_weights, full_ema = uninterrupted
    real, calls = rtdmd.train_step, [0]

    def dies(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rtdmd, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        rtdmd.main(rtdmd.Args(**SMALL, cold_steps=COLD, rl_steps=RL, output_dir=str(tmp_path), run_name="killed"))
    checkpoint = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"]
    assert checkpoint == 10 * ((kill_at - 1) // 10)
    assert max(r["step"] for r in records(tmp_path / "killed")) == kill_at - 2  # records past the checkpoint
    monkeypatch.setattr(rtdmd, "train_step", real)
    resumed = rtdmd.main(rtdmd.Args(resume=str(tmp_path / "killed"), progress=False))
    assert same_weights(full_weights, weights(resumed["world"]))
    assert all(torch.equal(a, b) for a, b in zip(full_ema, resumed["ema"], strict=True))
    assert same_checkpoints(full_dir, tmp_path / "killed")
    assert strip_time(records(full_dir)) == strip_time(records(tmp_path / "killed"))


# ---------------------------------------------------------------------------------------------------------------
# micro-batching of the cold start
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("settings", [dict(), dict(dm_scale="dmd2", fake_weighting="clamped", consistency_kernel="cps")],
                         ids=["toy", "authors-t2i"])
def test_micro_batched_cold_start_equals_the_whole_batch(float64, settings):
    """Two stage 1 iterations (3 fake updates each on fresh states at random stop indices, the AC-DMD generator update,
    the EMA after every fake update) in micro-batches of 7 of 30 rows give the adapters, the EMA and the recorded
    losses and gradient norm of the whole-batch iterations: every draw is made for the whole batch before it is split.
    In float64 with SGD (linear in the gradient), the only difference is summation order: <= 30 rows x 1.1e-16 per sum,
    amplified by at most ~1e4 through the MLP, is < 1e-10, so 1e-9 relative; a mis-weighted chunk moves the result by
    ~7/30 of an update, which the first assertion shows is >> 1e-9."""
    base = toy2d.ToyWorld(seed=0)
    for adapter in base.adapters.values():
        adapter.double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero-initialised last layers, so every parameter gets a gradient
        for role in ("generator", "fake"):
            for p in base.params(role):
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    schedule = rtdmd.student_schedule(base, 4)
    results = []
    for micro in (None, 7):
        world = copy.deepcopy(base)
        args = rtdmd.resolve_stage2(rtdmd.resolve_defaults(rtdmd.Args(batch_size=30, fake_updates_per_step=3,
                                                                      micro_batch_size=micro, **settings)))
        opt_g = torch.optim.SGD(world.params("generator"), lr=0.05)
        opt_f = torch.optim.SGD(world.params("fake"), lr=0.05)
        ema = [p.detach().clone() for p in world.params("generator")]
        torch.manual_seed(5)
        logs = [rtdmd.train_step(world, args, schedule, 1, opt_g, opt_f, ema) for _ in range(2)]
        results.append((torch.cat([p.flatten() for ps in weights(world).values() for p in ps] + [e.flatten() for e in ema]),
                        logs))
    (whole, logs_whole), (chunked, logs_chunked) = results
    before = torch.cat([p.flatten() for ps in weights(base).values() for p in ps]
                       + [p.detach().flatten() for p in base.params("generator")])  # the EMA starts at the generator
    assert float((whole - before).abs().max()) > 1e-3  # the updates did something
    assert torch.allclose(chunked, whole, rtol=1e-9, atol=1e-12), float((chunked - whole).abs().max())
    for a, b in zip(logs_whole, logs_chunked):
        assert a["student_step"] == b["student_step"]
        for key in ("dm_loss", "fake_loss", "consistency", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-15), key


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--weight-decay-generator", "-1"], "weight_decay_generator must be >= 0"),
    (["--device", "cuda"], "--device cuda"),
    (["--resolution", "512"], "text-to-image option"),
    (["--no-gradient-checkpointing"], "text-to-image option"),
    (["--guidance-scale", "3"], "unconditional toy"),
    (["--eta", "0"], "stage 2 has no stochastic policy"),
    (["--micro-batch-size", "0"], "micro_batch_size must be a positive integer"),
    (["--num-steps", "2000"], "is not cold_steps + rl_steps = 1000"),
    (["--resume", "/nonexistent/run"], "no config.json"),
    (["--run-name", "taken"], "never overwritten"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(flags, message, tmp_path, monkeypatch, capsys):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["rtdmd.py", *flags, "--output-dir", str(tmp_path / "runs")])
    ran = []
    with pytest.raises(SystemExit) as exit_:
        rtdmd.cli(lambda args: ran.append(args), rtdmd.Args)
    assert exit_.value.code == 2 and not ran
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["taken"]  # nothing half-made


def test_the_script_itself_refuses_eta_0_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "rtdmd.py", "--eta", "0", "--output-dir", str(tmp_path / "runs")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().startswith("error: eta = 0 is the deterministic") and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_two_student_steps_alone_and_eta_0_without_stage_2_are_accepted(tmp_path, monkeypatch):
    """`--student-steps 2` alone derives M = 1 (min(2, K - 1)); `--eta 0 --rl-steps 0` (the Euler sampler, stage 1 only)
    is valid; both pass the command line's checks and reach main."""
    for flags, check in ([["--student-steps", "2"], lambda a: a.subset_size == 1 and a.num_steps == 1000],
                         [["--eta", "0", "--rl-steps", "0"], lambda a: a.num_steps == 400]):
        monkeypatch.setattr(sys, "argv", ["rtdmd.py", *flags, "--output-dir", str(tmp_path / "runs")])
        ran = []
        rtdmd.cli(lambda args: ran.append(rtdmd.resolve_stage2(rtdmd.resolve_defaults(args))), rtdmd.Args)
        assert len(ran) == 1 and check(ran[0]), flags


def test_help_groups_the_options_by_the_sections_of_args():
    """--help (dmd.py's sectioned_args, a marked copy) shows rtdmd's options in one group per section comment of Args,
    in order, every field once; parsing through the groups gives the flat Args back (choices and bools included)."""
    import dataclasses

    groups = dataclasses.fields(rtdmd.sectioned_args(rtdmd.Args))
    assert [g.name for g in groups] == ["world", "student_sampler_and_training", "stage_1_AC_DMD_cold_start",
                                        "stage_2_the_reward_tilted_KL", "run"]
    assert [f.name for g in groups for f in dataclasses.fields(g.type.__origin__)] == [
        f.name for f in dataclasses.fields(rtdmd.Args)]
    argv = ["--stage2-recipe", "natural", "--rl-dm", "random-stop", "--no-reward-backprop", "--toy-reward-target", "1",
            "-2", "--micro-batch-size", "4", "--resume", "runs/x", "--num-steps", "9"]
    assert rtdmd.parse_args(rtdmd.Args, argv) == rtdmd.Args(
        stage2_recipe="natural", rl_dm="random-stop", reward_backprop=False, toy_reward_target=(1.0, -2.0),
        micro_batch_size=4, resume="runs/x", num_steps=9)
    assert rtdmd.parse_args(rtdmd.Args, []) == rtdmd.Args()
