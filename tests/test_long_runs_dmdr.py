"""Long runs of dmdr.py, on the toy (dmd.py and gdmd.py: tests/test_long_runs.py):
  * exact resume across the stage switch: a run stopped inside stage 1, at the switch (a cold start extended into stage
    2 with --stage2-steps) or inside stage 2 and resumed equals the uninterrupted run, adapters, EMA'd and raw
    checkpoints and every metrics record identical, with DynaDG and DynaRS annealing across the switch, stage 2's own
    learning rates and DPO, whose frozen reference is taken at the switch and restored from the checkpoint;
  * a run killed mid-way (in stage 1, in stage 2) and resumed with its own arguments is the uninterrupted run, and
    metrics.jsonl has no duplicated record;
  * the generator EMA across both stages equals its closed form, and evaluation and checkpoint/generator.pt use it;
  * micro-batching: stage1_step (sde and ode, RT-DM on) and stage2_step (ReFL, DPO, GRPO, each joint with DMD) in
    chunks equal the whole-batch step (the batch's randomness is drawn before it is split), on the toy in float64 and on
    a tiny SD3 in float32;
  * metrics.jsonl records lr, gradient norm and the DynaDG scale; config.json the provenance;
  * command-line errors: one line, exit 2, no traceback, before any work."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dmd
import dmdr
import toy2d
from run_records import records, same_weights, strip_time, weights

REPO = Path(__file__).resolve().parents[1]
# 20 + 20 updates: DynaDG and DynaRS anneal over 30 (across the switch), stage 2 is joint DMD + DPO at its own rates
BASE = dict(batch_size=32, stage2_batch_size=16, rl="dpo", group_size=4, lambda_rl=0.5, student_steps=2,
            dynamic_steps=30, fake_updates_per_step=2, stage2_lr_generator=5e-4, stage2_lr_fake=2e-4, eval_samples=300,
            eval_every=10, log_every=5, ema_decay=0.9, progress=False, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same_checkpoints(a, b):
    for name in ("checkpoint/generator.pt", "checkpoint/raw/generator.pt", "checkpoint/fake.pt"):
        x, y = torch.load(Path(a) / name), torch.load(Path(b) / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run: 20 + 20 updates."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("full")
    return dmdr.main(dmdr.Args(**BASE, stage1_steps=20, stage2_steps=20, output_dir=str(out), run_name="full"))


# ---------------------------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first, extend", [
    ((10, 0), dict(stage1_steps=20, stage2_steps=20)),  # stopped inside stage 1: both stages extended
    ((20, 0), dict(stage2_steps=20)),  # a cold start, then continued into stage 2 at the switch
    ((20, 10), dict(stage2_steps=20)),  # stopped inside stage 2: DPO's reference comes from the checkpoint
])
def test_a_stopped_run_extended_with_resume_equals_the_uninterrupted_run(full, first, extend, tmp_path):
    """A shorter run, then --resume RUN_DIR with larger stage lengths: the adapters, the EMA'd generator and the raw
    one in checkpoint/, and every metrics record (losses, lr, gradient norm, DynaDG scale, evaluations) equal the
    uninterrupted 20 + 20 run's exactly; the run continues in its own directory and its config says the new lengths."""
    part = dmdr.main(dmdr.Args(**BASE, stage1_steps=first[0], stage2_steps=first[1], output_dir=str(tmp_path),
                               run_name="part"))
    assert part["final"]["step"] == sum(first)
    resumed = dmdr.main(dmdr.Args(resume=str(tmp_path / "part"), progress=False, **extend))
    assert resumed["run_dir"] == tmp_path / "part"
    assert same_weights(weights(full["world"]), weights(resumed["world"]))
    same_checkpoints(full["run_dir"], tmp_path / "part")
    assert strip_time(records(full["run_dir"])) == strip_time(records(tmp_path / "part"))  # no duplicates either
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert (config["stage1_steps"], config["stage2_steps"]) == (20, 20)


@pytest.mark.parametrize("killed_at", [17, 37])
def test_a_killed_run_resumed_with_its_own_arguments_is_the_uninterrupted_run(full, killed_at, tmp_path, monkeypatch):
    """Killed at update 17 (stage 1, after the checkpoint at 10) or 37 (stage 2, after the one at 30), then resumed with
    its own arguments: the records written after the checkpoint are rewritten, not duplicated, and everything equals
    the run that was never killed."""
    real = {"stage1_step": dmdr.stage1_step, "stage2_step": dmdr.stage2_step}

    def dying(name):
        def step_fn(world, args, sigmas, step, *rest):
            if step + 1 == killed_at:  # step is 0-based
                raise KeyboardInterrupt
            return real[name](world, args, sigmas, step, *rest)
        return step_fn

    for name in real:
        monkeypatch.setattr(dmdr, name, dying(name))
    with pytest.raises(KeyboardInterrupt):
        dmdr.main(dmdr.Args(**BASE, stage1_steps=20, stage2_steps=20, output_dir=str(tmp_path), run_name="killed"))
    assert max(r["step"] for r in records(tmp_path / "killed")) == killed_at - 2  # a record past the checkpoint
    for name, fn in real.items():
        monkeypatch.setattr(dmdr, name, fn)
    resumed = dmdr.main(dmdr.Args(resume=str(tmp_path / "killed"), progress=False))
    assert same_weights(weights(full["world"]), weights(resumed["world"]))
    same_checkpoints(full["run_dir"], tmp_path / "killed")
    assert strip_time(records(full["run_dir"])) == strip_time(records(tmp_path / "killed"))


def test_resume_refuses_what_it_cannot_continue(full, tmp_path):
    with pytest.raises(ValueError, match="below the run's 20: a run is only extended"):
        dmdr.main(dmdr.Args(resume=str(full["run_dir"]), stage2_steps=10))
    with pytest.raises(ValueError, match="the run is in stage 2 .step 40.; its stage 1 ended at 20"):
        dmdr.main(dmdr.Args(resume=str(full["run_dir"]), stage1_steps=30))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dmdr.main(dmdr.Args(resume=str(tmp_path / "nothing")))
    other = dmd.main(dmd.Args(num_steps=2, eval_every=2, batch_size=32, eval_samples=100, progress=False,
                              output_dir=str(tmp_path), run_name="dmd"))
    with pytest.raises(ValueError, match="not a dmdr run"):
        dmdr.main(dmdr.Args(resume=str(other["run_dir"])))


def test_records_carry_lr_gradient_norm_and_the_dynadg_scale_and_the_config_its_provenance(full):
    """metrics.jsonl's loss records: the learning rate the update used (stage 2's own from update 21), the generator's
    gradient norm before clipping, and DynaDG's lora_scale_r = 0.5 * 0.5 (1 + cos(pi (step - 1) / 30)) (0 from 31 on);
    config.json: git commit, package versions and the resolved device (not "auto")."""
    losses = [r for r in records(full["run_dir"]) if "dmd_loss" in r]
    assert [r["step"] for r in losses] == list(range(5, 41, 5))
    for r in losses:
        assert r["lr"] == (1e-3 if r["step"] <= 20 else 5e-4)
        assert r["lora_scale_r"] == pytest.approx(dmdr.lora_scale_r(r["step"] - 1, 0.5, 30), abs=1e-15)
        assert r["grad_norm"] > 0 and math.isfinite(r["grad_norm"])
    assert losses[0]["lora_scale_r"] > 0.45 and losses[-1]["lora_scale_r"] == 0.0
    provenance = json.loads((full["run_dir"] / "config.json").read_text())["provenance"]
    assert provenance["device"] == "cpu" and provenance["versions"]["torch"] == torch.__version__
    assert set(provenance) == {"git_commit", "versions", "device"}


# ---------------------------------------------------------------------------------------------------------------
# generator EMA
# ---------------------------------------------------------------------------------------------------------------


def test_generator_ema_across_both_stages_is_its_closed_form_and_is_what_evaluation_and_the_checkpoint_use(
        tmp_path, monkeypatch):
    """3 + 3 updates, ema_every 2, decay d: after updates w_1 .. w_6 the EMA is d^3 w_0 + (1 - d) (d^2 w_2 + d w_4 + w_6)
    (float32 round-off: a few ulps of weights of size <= 1, hence 1e-6); the last evaluation samples it,
    checkpoint/generator.pt holds it and checkpoint/raw/generator.pt the trained weights, which are restored after
    every evaluation. DPO's reference is the raw generator at the switch, not its EMA."""
    seen, refs = [], []
    real = {"stage1_step": dmdr.stage1_step, "stage2_step": dmdr.stage2_step}

    def recording(name):
        def step_fn(world, args, sigmas, step, opt_g, opt_f, *ref):
            out = real[name](world, args, sigmas, step, opt_g, opt_f, *ref)
            seen.append([p.detach().clone() for p in world.params("generator")])
            refs.extend(ref)
            return out
        return step_fn

    for name in real:
        monkeypatch.setattr(dmdr, name, recording(name))
    evaluated = []
    real_eval = dmdr.evaluate_student
    monkeypatch.setattr(dmdr, "evaluate_student", lambda w, *a: evaluated.append(
        [p.detach().clone() for p in w.params("generator")]) or real_eval(w, *a))
    d = 0.7
    world = toy2d.ToyWorld(seed=0)
    w0 = [p.detach().clone() for p in world.params("generator")]
    kw = {**BASE, "ema_decay": d, "ema_every": 2, "eval_every": 6}
    out = dmdr.main(dmdr.Args(**kw, stage1_steps=3, stage2_steps=3, output_dir=str(tmp_path), run_name="ema"), world=world)
    expected = [d**3 * a + (1 - d) * (d**2 * b + d * c + e) for a, b, c, e in zip(w0, seen[1], seen[3], seen[5])]
    for got, want in zip(evaluated[-1], expected):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert all(torch.equal(r, s) for r, s in zip(refs[0], seen[2]))  # the reference: raw weights after update 3
    saved = torch.load(out["run_dir"] / "checkpoint" / "generator.pt")
    raw = torch.load(out["run_dir"] / "checkpoint" / "raw" / "generator.pt")
    params = list(dict(world.adapters["generator"].named_parameters()))
    for i, name in enumerate(params):
        assert torch.allclose(saved[name], expected[i], rtol=0, atol=1e-6)
        assert torch.equal(raw[name], seen[-1][i])
    assert all(torch.equal(p, q) for p, q in zip(world.params("generator"), seen[-1]))


# ---------------------------------------------------------------------------------------------------------------
# micro-batching
# ---------------------------------------------------------------------------------------------------------------


def float64_world():
    """The toy world in float64 (adapters and noise; the teacher follows its inputs' dtype)."""
    world = toy2d.ToyWorld(seed=0)
    for adapter in world.adapters.values():
        adapter.double()
    world.noise = lambda cond, generator=None: torch.randn(cond.shape[0], 2, generator=generator, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero init, so every parameter gets a gradient
        for role in world.adapter_roles:
            for p in world.params(role):
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return world


@pytest.mark.parametrize("stage, kw", [
    (1, dict(student_steps=2, sampler="sde")),  # RT-DM weights from the whole batch's rewards, the sde rollout completed
    (1, dict(student_steps=4, sampler="ode")),
    (2, dict(student_steps=2, sampler="sde", rl="refl")),
    (2, dict(student_steps=3, sampler="ode", rl="dpo", group_size=4)),  # 8 pairs in chunks of 3 (7 // 2)
    (2, dict(student_steps=3, sampler="sde", rl="grpo", group_size=4)),
], ids=["stage1-sde", "stage1-ode", "stage2-refl", "stage2-dpo", "stage2-grpo"])
def test_micro_batched_step_equals_the_whole_batch(stage, kw):
    """One stage1_step / stage2_step (fake updates, then the generator's DMD term with RT-DM weights, or DMD + the RL
    term) with micro-batches of 7 out of 30 / 32 gives the adapters and the logged losses of the whole-batch step, in
    float64. The two differ only in the order of float64 sums over at most 32 samples: a relative error below
    32 eps64 = 7e-15 of each gradient, so after an SGD step of lr 1e-2 on clipped gradients (|g| <= 1) the weights
    (|w| <= ~1) differ by an ulp or two, ~1e-16; 1e-12 leaves four orders of margin, while a chunk weighted wrongly
    (1 instead of its share 7 / 32) changes the gradient by O(1) of itself, and the update moves weights by > 1e-4."""
    results = []
    for chunk in (None, 7):
        args = dmdr.resolve_stage2(dmdr.resolve_defaults(dmdr.Args(
            batch_size=30 if stage == 1 else 32, fake_updates_per_step=2, dynamic_steps=10, lambda_rl=0.5,
            micro_batch_size=chunk, **kw)))
        world = float64_world()
        sigmas = dmdr.student_sigmas(world, args.student_steps)
        opt_g = torch.optim.SGD(world.params("generator"), lr=1e-2)
        opt_f = torch.optim.SGD(world.params("fake"), lr=1e-2)
        ref = [0.5 * p.detach().clone() for p in world.params("generator")]  # DPO's reference differs from the policy
        before = weights(world)
        torch.manual_seed(5)
        if stage == 1:
            out = dmdr.stage1_step(world, args, sigmas, 3, opt_g, opt_f)
        else:
            out = dmdr.stage2_step(world, args, sigmas, 3, opt_g, opt_f, ref)
        results.append((weights(world), out, torch.rand(1)))
    (whole, out_whole, rng_whole), (chunked, out_chunked, rng_chunked) = results
    assert torch.equal(rng_whole, rng_chunked)  # the same draws, in the same number
    for role in whole:
        moved = max(float((a - b).abs().max()) for a, b in zip(whole[role], before[role]))
        assert moved > 1e-4, role
        for a, b in zip(whole[role], chunked[role]):
            assert torch.allclose(a, b, rtol=0, atol=1e-12), role
    assert out_whole.keys() == out_chunked.keys()
    for key in out_whole:
        assert out_chunked[key] == pytest.approx(out_whole[key], rel=1e-12, abs=1e-14), key


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3 world (t2i.tiny's random MMDiT, 8 px: 4 x 4 latents of 4 channels) with the tiny CLIP reward through
    the VAE decode, both adapters off their zero init."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from t2i import T2IWorld
    from t2i.tiny import build_tiny_clip, build_tiny_sd3

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_sd3(root / "sd3")
    build_tiny_clip(root / "clip")
    world = T2IWorld("sd3-medium", model_path=str(root / "sd3"), resolution=8, reward="clip",
                     reward_checkpoints={"clip": str(root / "clip")}, lora_rank=2, lora_alpha=4, fake_lora_rank=2,
                     fake_lora_alpha=4, seed=0, device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for role in ("generator", "fake"):
            for p in world.params(role):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return world


@pytest.mark.parametrize("stage, rl", [(1, "refl"), (2, "refl"), (2, "dpo")])
def test_tiny_sd3_micro_batched_step_equals_the_whole_batch(tiny_sd3, stage, rl):
    """On image latents (per-sample ode levels, prompt conditions, the reward decoded through the VAE), one stage-1 step
    (ode, K = 2, RT-DM) and one stage-2 step (DMD + ReFL, DMD + DPO in 2 pairs) in chunks of 1 against the batch of 4: the
    generator's and the fake's gradients (SGD at lr 0, so the weights stay and the two runs see the same world) agree
    within float32 round-off accumulated through the forward and backward (1e-4 relative, as tests/test_rtdmd_chunks.py
    bounds it: ~1e3 float32 ulps; measured 0.9e-6 to 1.9e-6), the losses likewise."""
    world = tiny_sd3
    out = {}
    for chunk in (None, 1):
        args = dmdr.resolve_stage2(dmdr.resolve_defaults(dmdr.Args(
            model="sd3-medium", t2i_reward="clip", student_steps=2, sampler="ode", batch_size=4, fake_updates_per_step=1,
            rl=rl, group_size=2, dynamic_steps=10, grad_clip=0.0, micro_batch_size=chunk)))
        sigmas = dmdr.student_sigmas(world, 2)
        opt_g = torch.optim.SGD(world.params("generator"), lr=0.0)
        opt_f = torch.optim.SGD(world.params("fake"), lr=0.0)
        ref = [0.5 * p.detach().clone() for p in world.params("generator")]
        torch.manual_seed(7)
        if stage == 1:
            logs = dmdr.stage1_step(world, args, sigmas, 3, opt_g, opt_f)
        else:
            logs = dmdr.stage2_step(world, args, sigmas, 3, opt_g, opt_f, ref)
        out[chunk] = (logs, {role: torch.cat([p.grad.flatten() for p in world.params(role)]) for role in ("generator", "fake")})
    (logs_a, grads_a), (logs_b, grads_b) = out[None], out[1]
    for role in grads_a:
        a, b = grads_a[role], grads_b[role]
        assert float(a.norm()) > 0, role
        assert float((a - b).norm()) <= 1e-4 * float(a.norm()), (role, float((a - b).norm() / a.norm()))
    for key in logs_a:
        assert logs_b[key] == pytest.approx(logs_a[key], rel=1e-4, abs=1e-7), key


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--weight-decay-generator", "-1"], "weight_decay_generator"),
    (["--device", "cuda"], "--device cuda"),
    (["--resolution", "512"], "text-to-image option"),
    (["--hps-prefix", "Realistic photo"], "text-to-image option"),
    (["--guidance-scale", "3"], "unconditional toy"),
    (["--guidance-jitter", "0.5"], "unconditional toy"),
    (["--rl", "dpo", "--group-size", "7"], "group_size"),
    (["--micro-batch-size", "0"], "micro_batch_size"),
    (["--resume", "/nonexistent/run"], "no config.json"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(flags, message, tmp_path):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = subprocess.run([sys.executable, "dmdr.py", *flags, "--output-dir", str(tmp_path / "runs")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-made


def test_an_unwritable_output_dir_and_an_existing_run_fail_before_the_world(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(dmdr, "make_world", lambda *a, **k: built.append(1))
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="never overwritten"):
        dmdr.main(dmdr.Args(output_dir=str(tmp_path / "runs"), run_name="taken"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="not writable"):
            dmdr.main(dmdr.Args(output_dir=str(locked / "runs")))
    assert not built


def test_help_groups_dmdrs_options_by_the_sections_of_args():
    """--help (dmd.py's sectioned_args, a marked copy) shows one group per `# ---- title ----` comment of dmdr's Args,
    in order, every field in the group it is written under; parsing through the groups gives the flat Args back."""
    import dataclasses
    import inspect
    import re
    import textwrap

    source = textwrap.dedent(inspect.getsource(dmdr.Args))
    expected = []
    for line in source.splitlines():  # an independent reading of the source: section comments and annotated fields
        if line.strip().startswith("# ----"):
            expected.append((line.strip().strip("#- ").strip(), []))
        elif re.match(r"    [a-z][a-z_0-9]*: [A-Za-z].* = ", line):
            expected[-1][1].append(line.strip().split(":")[0])
    groups = dataclasses.fields(dmdr.sectioned_args(dmdr.Args))
    got = [(g.type.__origin__.__name__, [f.name for f in dataclasses.fields(g.type.__origin__)]) for g in groups]
    assert [("_".join(t.replace(":", " ").replace(",", " ").split()), n) for t, n in expected] == got
    assert [t for t, _ in expected] == ["world", "student and DMD", "stage 1: reward tilt, DynaDG, DynaRS",
                                        "stage 2: joint DMD and RL", "run"]
    argv = ["--stage2-steps", "7", "--rl", "dpo", "--no-rt-dm", "--sampler", "ode", "--toy-reward-target", "1", "-2",
            "--resume", "runs/x", "--ema-decay", "0.5"]
    assert dmdr.parse_args(dmdr.Args, argv) == dmdr.Args(stage2_steps=7, rl="dpo", rt_dm=False, sampler="ode",
                                                         toy_reward_target=(1.0, -2.0), resume="runs/x", ema_decay=0.5)
    assert dmdr.parse_args(dmdr.Args, []) == dmdr.Args()
