"""Long runs, on the toy, for dmd.py and gdmd.py (dmdr.py and rtdmd.py: tests/test_long_runs_dmdr.py, _rtdmd.py;
under torchrun: tests/test_distributed.py):
  * exact resume: 30 updates, a stop and `--resume RUN_DIR --num-steps 60` equal 60 uninterrupted updates (constant lr),
    weights and metrics identical; a run killed mid-way and resumed with its own arguments equals the uninterrupted run
    under a cosine schedule; metrics.jsonl has no duplicated record;
  * every crash window of save_checkpoint leaves a complete checkpoint that find_checkpoint (and eval.py) finds;
  * the generator EMA equals its closed form, and evaluation and checkpoint/generator/ use it;
  * micro-batching: the chunked update equals the unchunked one (the batch's randomness is drawn before it is split),
    for the fake updates of every --fake-tracks, the DMD generator update, and GDMD's (targets and naive fusion);
  * command-line errors: one line, exit 2, no traceback, before any work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dmd
import gdmd
import toy2d
from run_records import records, same_weights, strip_time, weights

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(batch_size=32, eval_samples=300, log_every=5, progress=False, lr_schedule="constant")


# ---------------------------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------------------------

CASES = {
    "dmd": (dmd, dict(**SMALL, student_steps=2, fake_tracks="per-step", ema_decay=0.9)),
    "gdmd": (gdmd, dict(**{k: v for k, v in SMALL.items() if k != "lr_schedule"}, cold_start_steps=20,
                        group_source="snapshots", snapshot_every=5, fake_tracks="final", ema_decay=0.9)),
}


@pytest.mark.parametrize("name", CASES)
def test_stop_and_resume_with_more_steps_equals_the_uninterrupted_run(name, tmp_path):
    """30 updates then --resume --num-steps 60 == 60 updates: adapters (every fake), the EMA'd generator checkpoint and
    every metrics record (gdmd: across its stage switch at 20, with its fake snapshots restored)."""
    module, kw = CASES[name]
    full = module.main(module.Args(**kw, num_steps=60, eval_every=30, output_dir=str(tmp_path), run_name="full"))
    first = module.main(module.Args(**kw, num_steps=30, eval_every=30, output_dir=str(tmp_path), run_name="part"))
    resumed = module.main(module.Args(resume=str(tmp_path / "part"), num_steps=60, progress=False))
    assert resumed["run_dir"] == tmp_path / "part"
    assert same_weights(weights(full["world"]), weights(resumed["world"]))
    assert strip_time(records(tmp_path / "full")) == strip_time(records(tmp_path / "part"))  # no duplicates either
    assert resumed["final"]["energy_distance"] == full["final"]["energy_distance"]
    for ckpt in ("checkpoint/generator.pt", "checkpoint/raw/generator.pt"):
        assert torch.equal(torch.load(tmp_path / "full" / ckpt)["out.weight"], torch.load(tmp_path / "part" / ckpt)["out.weight"])
    assert json.loads((tmp_path / "part" / "config.json").read_text())["num_steps"] == 60
    assert first["final"]["step"] == 30


def test_a_killed_cosine_run_resumed_with_its_own_arguments_is_the_uninterrupted_run(tmp_path, monkeypatch):
    """Kill a cosine-lr run at update 37 (after its checkpoint at 30), resume it with its own arguments: the metrics
    written after 30 are rewritten, not duplicated, and everything equals the run that was never killed."""
    kw = dict(SMALL, lr_schedule="cosine", num_steps=50, eval_every=10, student_steps=2, fake_tracks="final")
    full = dmd.main(dmd.Args(**kw, output_dir=str(tmp_path), run_name="full"))
    real = dmd.train_step

    def dies_at_37(world, args, sigmas, opt_g, opt_f):
        if opt_g.state and next(iter(opt_g.state.values()))["step"] == 36:  # the 37th update
            raise KeyboardInterrupt
        return real(world, args, sigmas, opt_g, opt_f)

    monkeypatch.setattr(dmd, "train_step", dies_at_37)
    with pytest.raises(KeyboardInterrupt):
        dmd.main(dmd.Args(**kw, output_dir=str(tmp_path), run_name="killed"))
    assert max(r["step"] for r in records(tmp_path / "killed")) == 35  # records past the checkpoint at 30
    monkeypatch.setattr(dmd, "train_step", real)
    resumed = dmd.main(dmd.Args(resume=str(tmp_path / "killed"), progress=False))
    assert same_weights(weights(full["world"]), weights(resumed["world"]))
    assert strip_time(records(tmp_path / "full")) == strip_time(records(tmp_path / "killed"))


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    dmd.main(dmd.Args(**dict(SMALL, lr_schedule="cosine"), num_steps=10, eval_every=10, output_dir=str(tmp_path), run_name="c"))
    with pytest.raises(ValueError, match="cosine lr schedule is fixed"):
        dmd.main(dmd.Args(resume=str(tmp_path / "c"), num_steps=20))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dmd.main(dmd.Args(resume=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="not a gdmd run"):
        gdmd.main(gdmd.Args(resume=str(tmp_path / "c")))


def test_every_crash_window_of_save_checkpoint_leaves_a_complete_checkpoint(tmp_path):
    """save_checkpoint writes checkpoint.tmp/ (state.json last), renames checkpoint/ -> checkpoint.old/, renames
    checkpoint.tmp/ -> checkpoint/, deletes checkpoint.old/. Stopped after each stage, the last complete checkpoint is
    found, and it is the newest complete one."""
    world = toy2d.ToyWorld(seed=0)
    run = tmp_path / "run"
    run.mkdir()
    dmd.save_checkpoint(world, run, 10)
    step_of = lambda ckpt: json.loads((ckpt / "state.json").read_text())["step"]  # noqa: E731
    # window 1: the new checkpoint is half written (no state.json yet)
    (run / "checkpoint.tmp").mkdir()
    world.save("generator", run / "checkpoint.tmp")
    assert dmd.find_checkpoint(run) == run / "checkpoint" and step_of(dmd.find_checkpoint(run)) == 10
    # window 2: between the two renames: only checkpoint.old/ (step 10) and a complete checkpoint.tmp/ (step 20)
    shutil.rmtree(run / "checkpoint.tmp")
    shutil.copytree(run / "checkpoint", tmp_path / "step10")
    dmd.save_checkpoint(world, run, 20)  # the new one, complete ...
    os.replace(run / "checkpoint", run / "checkpoint.tmp")  # ... and not yet renamed,
    shutil.copytree(tmp_path / "step10", run / "checkpoint.old")  # the previous one moved aside
    assert not (run / "checkpoint").exists() and step_of(run / "checkpoint.old") == 10
    assert step_of(dmd.find_checkpoint(run)) == 20 and dmd.find_checkpoint(run).name == "checkpoint.tmp"
    # the evaluation side sees the same checkpoint
    sys.path.insert(0, str(REPO))
    import eval as evaluation

    (run / "config.json").write_text(json.dumps({"method": "dmd", **dmd.asdict(dmd.Args(output_dir=str(tmp_path)))}))
    assert evaluation.check_run(run)["checkpoint"] == run / "checkpoint.tmp"
    # window 3: after the second rename, before checkpoint.old/ is deleted
    os.replace(run / "checkpoint.tmp", run / "checkpoint")
    assert step_of(dmd.find_checkpoint(run)) == 20 and dmd.find_checkpoint(run).name == "checkpoint"


# ---------------------------------------------------------------------------------------------------------------
# generator EMA
# ---------------------------------------------------------------------------------------------------------------


def test_generator_ema_is_its_closed_form_and_is_what_evaluation_and_the_checkpoint_use(tmp_path, monkeypatch):
    """With ema_every 2 and decay d, after updates w_1 .. w_6 the EMA is d^3 w_0 + (1 - d) (d^2 w_2 + d w_4 + w_6)
    (recorded weights, float32 round-off only); evaluation samples the EMA weights, checkpoint/generator.pt holds
    them, checkpoint/raw/generator.pt the trained ones."""
    seen = []
    real = dmd.train_step

    def recording(world, args, sigmas, opt_g, opt_f):
        out = real(world, args, sigmas, opt_g, opt_f)
        seen.append([p.detach().clone() for p in world.params("generator")])
        return out

    monkeypatch.setattr(dmd, "train_step", recording)
    d = 0.7
    world = toy2d.ToyWorld(seed=0)
    w0 = [p.detach().clone() for p in world.params("generator")]
    evaluated = []
    real_eval = dmd.evaluate
    monkeypatch.setattr(dmd, "evaluate", lambda w, *a: evaluated.append([p.detach().clone() for p in w.params("generator")])
                        or real_eval(w, *a))
    out = dmd.main(dmd.Args(**SMALL, num_steps=6, eval_every=6, ema_decay=d, ema_every=2, output_dir=str(tmp_path),
                            run_name="ema"), world=world)
    expected = [d**3 * a + (1 - d) * (d**2 * b + d * c + e) for a, b, c, e in zip(w0, seen[1], seen[3], seen[5])]
    for got, want in zip(evaluated[-1], expected):
        assert torch.allclose(got, want, atol=1e-6)
    saved = torch.load(out["run_dir"] / "checkpoint" / "generator.pt")
    raw = torch.load(out["run_dir"] / "checkpoint" / "raw" / "generator.pt")
    names = list(world.adapters["generator"].state_dict())
    params = dict(world.adapters["generator"].named_parameters())
    for name in names:
        if name in params:
            i = list(params).index(name)
            assert torch.allclose(saved[name], expected[i], atol=1e-6)
            assert torch.equal(raw[name], seen[-1][i])
    assert all(torch.equal(p, q) for p, q in zip(world.params("generator"), seen[-1]))  # training weights restored


# ---------------------------------------------------------------------------------------------------------------
# micro-batching
# ---------------------------------------------------------------------------------------------------------------


def _one_update(module, world, args, chunk, step_fn):
    args.micro_batch_size = chunk
    torch.manual_seed(11)
    step_fn(world, args)
    return weights(world)


@pytest.mark.parametrize("fake_tracks", dmd.FAKE_TRACKS)
def test_micro_batched_dmd_update_equals_the_whole_batch(fake_tracks):
    """One train_step (fake updates + generator update) with micro-batches of 7 out of 30 gives the adapters of the
    whole-batch step: the same draws, gradients summed from chunk means weighted by chunk / n. float32 summation order
    is the only difference (1e-6 of the weights' scale; Adam's first step is sign-like, so a loose tolerance would hide
    nothing: any mis-weighted chunk moves a weight by ~lr = 1e-3)."""
    results = []
    for chunk in (None, 7):
        args = dmd.resolve_defaults(dmd.Args(student_steps=3, batch_size=30, fake_tracks=fake_tracks, fake_updates_per_step=2))
        world = toy2d.ToyWorld(n_fakes=len(dmd.fake_roles(fake_tracks, 3)), seed=0)
        torch.manual_seed(3)
        with torch.no_grad():
            for role in world.adapter_roles:  # off the zero init, so every parameter gets a gradient
                for p in world.params(role):
                    p.add_(0.05 * torch.randn_like(p))
        sigmas = dmd.student_sigmas(world, 3)
        opt_g = torch.optim.SGD(world.params("generator"), lr=1e-2)
        opts = {r: torch.optim.SGD(world.params(r), lr=1e-2) for r in dmd.fake_roles(fake_tracks, 3)}
        before = weights(world)
        results.append(_one_update(dmd, world, args, chunk, lambda w, a: dmd.train_step(w, a, sigmas, opt_g, opts)))
    whole, chunked = results
    for role in whole:
        moved = max(float((a - b).abs().max()) for a, b in zip(whole[role], before[role]))
        assert moved > 1e-5, role  # the update did something
        for a, b in zip(whole[role], chunked[role]):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), role


@pytest.mark.parametrize("naive", [False, True])
def test_micro_batched_gdmd_update_equals_the_whole_batch(naive):
    """GDMD's generator update (target groups, or naive fusion whose advantages are normalised over the whole batch)
    in micro-batches of 7 of 30 equals the whole-batch update, and so does its rl_dmd_cosine."""
    outs = []
    for chunk in (None, 7):
        args = gdmd.resolve_defaults(gdmd.Args(batch_size=30, fake_updates_per_step=1, naive_fusion=naive,
                                               micro_batch_size=chunk, fake_tracks="final"))
        world = toy2d.ToyWorld(seed=0)
        torch.manual_seed(3)
        with torch.no_grad():
            for role in world.adapter_roles:
                for p in world.params(role):
                    p.add_(0.05 * torch.randn_like(p))
        sigmas = gdmd.student_sigmas(world, args.student_steps)
        opt_g = torch.optim.SGD(world.params("generator"), lr=1e-2)
        opts = {"fake": torch.optim.SGD(world.params("fake"), lr=1e-2)}
        torch.manual_seed(5)
        stats = gdmd.train_step(world, args, sigmas, opt_g, opts, gdmd.FakeSnapshots(0), gdmd_on=True)
        outs.append((weights(world), stats))
    (whole, s_whole), (chunked, s_chunked) = outs
    for role in whole:
        for a, b in zip(whole[role], chunked[role]):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), role
    assert s_whole["rl_dmd_cosine"] == pytest.approx(s_chunked["rl_dmd_cosine"], abs=1e-5)
    assert s_whole["adv_abs"] == pytest.approx(s_chunked["adv_abs"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script,flags,message", [
    ("dmd.py", ["--weight-decay-generator", "-1"], "weight_decay_generator"),
    ("dmd.py", ["--device", "cuda"], "--device cuda"),
    ("dmd.py", ["--resolution", "512"], "text-to-image option"),
    ("dmd.py", ["--guidance-scale", "3"], "unconditional toy"),
    ("gdmd.py", ["--micro-batch-size", "0"], "micro_batch_size"),
    ("gdmd.py", ["--resume", "/nonexistent/run"], "no config.json"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(script, flags, message, tmp_path):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = subprocess.run([sys.executable, script, *flags, "--output-dir", str(tmp_path / "runs")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-made


def test_an_unwritable_output_dir_and_an_existing_run_fail_before_the_world(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(dmd, "make_world", lambda *a, **k: built.append(1))
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="never overwritten"):
        dmd.main(dmd.Args(output_dir=str(tmp_path / "runs"), run_name="taken"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="not writable"):
            dmd.main(dmd.Args(output_dir=str(locked / "runs")))
    assert not built
    names = {dmd.run_dir_path(dmd.resolve_defaults(dmd.Args(output_dir=str(tmp_path))), "dmd").name for _ in range(20)}
    assert len(names) == 20  # unique default names within the same second
