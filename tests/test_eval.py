"""eval.py: its toy metrics on cases with known answers, the end-to-end evaluation of real (tiny) run directories of
every method, and clear errors for bad run directories.

Tolerances: a metric's Monte-Carlo mean over R independent repeats is compared with its exact expectation within
4 standard errors (SE = sample std / sqrt(R)); a false failure then has probability < 1e-4 per check (t-distribution,
R >= 20 repeats: P(|t| > 4) < 1e-3 at R = 20, < 2e-4 at R = 30). Exact identities (a set against itself, the
reproduction of a run's own last evaluation) are checked to rounding.
"""

import json
import math

import pytest
import torch

import eval as ev
import toy2d
from toy2d.mixture import GaussianMixture

Z = 4.0  # standard errors


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is as fast as two and does not fight the other processes on a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def within(values, expected, z=Z):
    """|mean(values) - expected| <= z SE of the mean; returns (ok, mean, se) for the assertion message."""
    v = torch.tensor(values, dtype=torch.float64)
    mean, se = float(v.mean()), float(v.std() / math.sqrt(len(values)))
    return abs(mean - expected) <= z * se, mean, se


def gaussian_world(std=1.0):
    """A toy world whose teacher is one isotropic 2-D Gaussian N(0, std^2 I): energy distances in closed form."""
    world = toy2d.ToyWorld("ring8")
    world.mixture = GaussianMixture([[0.0, 0.0]], [1.0], std)
    return world


def rice_mean(delta, var):
    """E|X - Y| for X - Y ~ N(delta e_1, var I) in 2-D (the Rice distribution's mean):
    s sqrt(pi/2) L_{1/2}(-delta^2 / (2 s^2)), L_{1/2}(-x) = e^{-x/2} [(1 + x) I0(x/2) + x I1(x/2)], s^2 = var."""
    x = torch.tensor(delta**2 / (2 * var), dtype=torch.float64)
    laguerre = torch.exp(-x / 2) * ((1 + x) * torch.special.i0(x / 2) + x * torch.special.i1(x / 2))
    return float(math.sqrt(var) * math.sqrt(math.pi / 2) * laguerre)


# ---- metrics on known cases ----


def test_a_set_against_itself_is_exactly_zero():
    """The V-statistic 2 E|x - y| - E|x - x'| - E|y - y'| of a set with itself is 0 to rounding."""
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    assert abs(toy2d.energy_distance(x, x)) < 1e-12


def test_exact_teacher_samples_sit_at_the_noise_floor():
    """A perfect student (exact teacher samples, independent of the reference set) evaluated by eval.toy_metrics: over
    30 repeats the mean of (distance - floor) is 0 within 4 SE (E[distance] = D (1/n + 1/m) exactly, the floor is
    its unbiased estimate), so the mean ratio is ~1; all 8 modes covered; off-manifold ~ the Gaussian tail beyond
    3 stds (1.1%); the same holds against the tilted teacher for exact tilted-teacher samples."""
    world = toy2d.ToyWorld("ring8", reward="linear")
    tilted = world.reward_fn.tilt(world.mixture, 1.0)
    n, reps = 400, 30
    diff, diff_t, ratio = [], [], []
    for rep in range(reps):
        gen = torch.Generator().manual_seed(100 + rep)
        cond = world.sample_cond(n, gen)
        m = ev.toy_metrics(world, world.mixture.sample(n, gen, cond), cond, beta=1.0, reference_size=n, seed=rep)
        diff.append(m["energy_distance"] - m["energy_floor"])
        ratio.append(m["energy_ratio"])
        assert m["modes_covered"] == 8
        mt = ev.toy_metrics(world, tilted.sample(n, gen, cond), cond, beta=1.0, reference_size=n, seed=1000 + rep)
        diff_t.append(mt["energy_distance_tilted"] - mt["energy_floor_tilted"])
    for values in (diff, diff_t):
        ok, mean, se = within(values, 0.0)
        assert ok, (mean, se)
    assert 0.7 < sum(ratio) / reps < 1.3, ratio


def test_shifted_gaussian_has_the_closed_form_distance_and_the_same_diversity():
    """Teacher N(0, I) in 2-D, student N(delta e_1, I). E[V-statistic] = 2 E|X - Y| - 2 D + D (1/n + 1/m), with
    E|X - Y| the Rice mean at var 2 and D = E|X - X'| = sqrt(pi). Over 25 repeats the mean energy distance must equal
    it within 4 SE; diversity (mean pairwise distance, diagonal excluded: unbiased) must equal sqrt(pi) within 4 SE,
    and a shift leaves it exactly unchanged (translation invariance)."""
    world = gaussian_world()
    n, m, reps = 500, 500, 25
    d_same = math.sqrt(math.pi)
    for delta in (0.5, 1.5):
        expected = 2 * rice_mean(delta, 2.0) - 2 * d_same + d_same * (1 / n + 1 / m)
        dist, div = [], []
        for rep in range(reps):
            gen = torch.Generator().manual_seed(10 * rep + 1)
            x = torch.randn(n, 2, generator=gen)
            cond = world.sample_cond(n)
            shifted = x + torch.tensor([delta, 0.0])
            metrics = ev.toy_metrics(world, shifted, cond, reference_size=m, seed=7 + rep)
            dist.append(metrics["energy_distance"])
            div.append(metrics["diversity"])
            assert abs(ev.mean_pairwise_distance(x) - metrics["diversity"]) < 1e-5
        ok, mean, se = within(dist, expected)
        assert ok, (delta, mean, expected, se)
        ok, mean, se = within(div, d_same)
        assert ok, (mean, d_same, se)


def test_collapsed_and_off_manifold_sets():
    """All samples on one mode's centre: 1 mode covered, diversity 0. All samples far outside the ring: no mode,
    off-manifold fraction 1 and a teacher log-density far below the teacher's own (about -2.1 on ring8)."""
    world = toy2d.ToyWorld("ring8")
    cond = world.sample_cond(200)
    centre = world.mixture.means[0].float().expand(200, 2).clone()
    m = ev.toy_metrics(world, centre, cond, reference_size=500)
    assert m["modes_covered"] == 1 and m["diversity"] == 0.0
    far = 10.0 * torch.nn.functional.normalize(torch.randn(200, 2, generator=torch.Generator().manual_seed(1)), dim=1)
    m = ev.toy_metrics(world, far, cond, reference_size=500)
    assert m["modes_covered"] == 0 and m["teacher_logp"] < -100
    if "off_manifold" in m:
        assert m["off_manifold"] == 1.0


def test_radius_reward_has_no_tilted_distance_and_says_why():
    world = toy2d.ToyWorld("ring8", reward="radius")
    cond = world.sample_cond(100)
    m = ev.toy_metrics(world, world.mixture.sample(100, cond=cond), cond, beta=1.0, reference_size=200)
    assert "energy_distance_tilted" not in m and "radius" in m["tilted_skipped"]


# ---- end to end on tiny real runs of every method ----


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One tiny run of each method (a few updates, 300 evaluation samples): a real run directory to evaluate."""
    import dmd
    import dmdr
    import gdmd
    import rtdmd

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    common = dict(output_dir=str(out), progress=False, eval_samples=300, student_steps=4, batch_size=32, seed=3)
    runs = {
        "dmd": dmd.main(dmd.Args(run_name="dmd", num_steps=4, eval_every=4, **common)),
        "dmdr": dmdr.main(dmdr.Args(run_name="dmdr", stage1_steps=2, stage2_steps=2, dynamic_steps=2, eval_every=4,
                                    **common)),
        "rtdmd": rtdmd.main(rtdmd.Args(run_name="rtdmd", cold_steps=2, rl_steps=2, groups=2, group_size=4, eval_every=4,
                                       **common)),
        "gdmd": gdmd.main(gdmd.Args(run_name="gdmd", num_steps=4, cold_start_steps=2, eval_every=4, **common)),
    }
    return {name: r["run_dir"] for name, r in runs.items()}


@pytest.mark.parametrize("method", ["dmd", "dmdr", "rtdmd", "gdmd"])
def test_eval_reproduces_the_runs_own_last_evaluation(tiny_runs, method):
    """With the run's own noise seed and sample count, eval.py's loader + the method's own sampler must regenerate the
    run's final samples exactly, so every metric equals the last evaluation in metrics.jsonl (to float rounding).
    rtdmd's samples come from its CPS sampler, the others' from the DMD2 sampler: a wrong sampler, eta, step count or
    adapter would change the samples and fail this."""
    run_dir = tiny_runs[method]
    result, x, _, _ = ev.evaluate_run(run_dir)
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["method"] == method and result["step"] == 4 and x.shape == (300, 2)
    assert result["sampler"] == ("cps" if method == "rtdmd" else "dmd2")  # the tiny dmdr run's sampler is sde
    for key in ("energy_distance", "energy_floor", "modes_covered", "mean_reward", "teacher_logp",
                "energy_distance_tilted"):
        if key in last:
            assert result[key] == pytest.approx(last[key], rel=1e-9, abs=1e-12), key
    assert result["beta"] == 1.0 and result["beta_source"] == ("run config" if method == "rtdmd" else "eval default")


def test_eval_main_writes_json_table_and_figure(tiny_runs, tmp_path):
    """Several runs side by side: eval.json lists every run and the two reference rows, eval.md has one table row per
    run and reference, eval_samples.png exists. The exact-teacher reference row sits near its floor."""
    out = ev.main(ev.Args(run_dirs=tuple(str(tiny_runs[m]) for m in ("dmd", "rtdmd")), out_dir=str(tmp_path / "e"),
                          samples=300, seed=5, progress=False))
    data = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["dmd", "rtdmd"]
    assert [r["seed"] for r in data["runs"]] == [5, 5]
    assert len(data["references"]) == 2 and data["references"][0]["energy_ratio"] < 4
    table = (tmp_path / "e" / "eval.md").read_text()
    assert table.count("\n| ") == 1 + 2 + 2  # header, 2 references, 2 runs
    assert (tmp_path / "e" / "eval_samples.png").stat().st_size > 10_000
    assert out["results"][0]["samples"] == 300


# ---- bad input ----


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_run_without_checkpoint_is_a_clear_error(tiny_runs, tmp_path):
    import shutil

    run = copy_run(tiny_runs["dmd"], tmp_path / "run")
    shutil.rmtree(run / "checkpoint")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ev.main(ev.Args(run_dirs=(str(run),), progress=False))
    assert not (run / "eval.json").exists()  # nothing written


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(method="rtdmd"), "does not match rtdmd.py"),  # a dmd config relabelled: another method
    (lambda c: c.pop("fake_updates_per_step"), "lacks: \\['fake_updates_per_step'\\]"),  # an older version
    (lambda c: c.update(new_option=1), "does not have: \\['new_option'\\]"),  # a newer version
    (lambda c: c.update(method="dmd3"), "unknown method 'dmd3'"),
    (lambda c: c.pop("method"), "unknown method None"),
])
def test_config_from_another_method_or_version_is_a_clear_error(tiny_runs, tmp_path, edit, match):
    run = copy_run(tiny_runs["dmd"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        ev.load_run(run)


def test_allow_new_options_fills_only_missing_fields(tiny_runs, tmp_path):
    """A run older than an option (the key is absent) is refused by default and evaluated with the option's default
    under --allow-new-options, which reports the defaulted field; an unknown key is refused either way."""
    run = copy_run(tiny_runs["dmd"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config.pop("grad_clip")
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--allow-new-options"):
        ev.load_run(run)
    loaded = ev.load_run(run, allow_new_options=True)
    assert loaded["args"].grad_clip == 1.0 and loaded["options_defaulted"] == ["grad_clip"]
    (run / "config.json").write_text(json.dumps({**config, "new_option": 1}))
    with pytest.raises(ValueError, match="new_option"):
        ev.load_run(run, allow_new_options=True)


def test_version_key_must_match_the_method_files_version(tiny_runs, tmp_path, monkeypatch):
    import dmd

    run = copy_run(tiny_runs["dmd"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "version": 1}))
    monkeypatch.setattr(dmd, "VERSION", 2, raising=False)
    with pytest.raises(ValueError, match="version 1.*this is version 2"):
        ev.load_run(run)
    monkeypatch.setattr(dmd, "VERSION", 1, raising=False)
    assert ev.load_run(run)["method"] == "dmd"


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ev.load_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ev.load_run(tmp_path)


# ---- text-to-image ----


@pytest.mark.parametrize("path", ["flow", "vp"])
def test_teacher_sampler_converges_to_the_teacher(path):
    """eval.sample_teacher (DDIM with the world's own alpha, sigma; Euler on a flow path) on the exact toy teacher:
    200 steps must be indistinguishable from exact samples, energy distance below 5 x its floor (over 300 repeats of
    two exact 1000-sample sets the ratio never exceeded 4.4; mean 1.05, std 0.66), while 1 step is the collapsed
    x0(noise) = mixture mean, hundreds of floors away."""
    world = toy2d.ToyWorld("ring8", path=path)
    gen = torch.Generator().manual_seed(0)
    cond = world.sample_cond(2000, gen)
    noise = world.noise(cond, gen)
    ref = world.mixture.sample(2000, torch.Generator().manual_seed(5))
    floor = toy2d.energy_floor(ref, 2000, 2000)
    assert toy2d.energy_distance(ev.sample_teacher(world, cond, noise, 200, 1.0), ref) < 5 * floor
    assert toy2d.energy_distance(ev.sample_teacher(world, cond, noise, 1, 1.0), ref) > 100 * floor


@pytest.fixture(scope="module")
def tiny_t2i_run(tmp_path_factory):
    """A tiny SD3 pipeline and a tiny CLIP (t2i/tiny.py, offline), one dmd.py update on them: a real t2i run directory."""
    import dmd

    if "sd3-medium" not in dmd.MODELS:
        pytest.skip("dmd.py is not wired to the text-to-image world yet")
    from t2i.tiny import build_tiny_clip, build_tiny_sd3

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("t2i")
    build_tiny_sd3(root / "sd3")
    build_tiny_clip(root / "clip", head_path=root / "head.pth")
    out = dmd.main(dmd.Args(model="sd3-medium", model_path=str(root / "sd3"), resolution=32, num_steps=1, batch_size=2,
                            eval_samples=4, eval_every=1, t2i_reward="clip", reward_checkpoints=f"clip={root / 'clip'}",
                            output_dir=str(root / "runs"), run_name="t2i", progress=False, device="cpu"))
    return root, out["run_dir"]


def test_t2i_run_is_evaluated_end_to_end_and_missing_rewards_are_skipped(tiny_t2i_run, tmp_path):
    """The t2i path offline: the student's CLIP score on the run's own evaluation noise must equal the run's last
    evaluation (reward_clip in metrics.jsonl: same prompts, noise, sampler and scorer); the aesthetic score loads from
    local weights; PickScore (weights absent), HPSv2.1 and ImageReward (optional packages absent here) are skipped with
    their reasons in the table, not a crash; NFE is K for the student and steps x 2 (CFG) for the teacher."""
    root, run_dir = tiny_t2i_run
    out = ev.main(ev.Args(run_dirs=(str(run_dir),), out_dir=str(tmp_path / "e"), teacher_steps=3, progress=False,
                          device="cpu", reward_checkpoints=f"aesthetic={root / 'head.pth'},aesthetic-clip={root / 'clip'},"
                                                           f"pickscore={root / 'no_pickscore'}"))
    row = out["results"][0]
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["clip_student"] == pytest.approx(last["reward_clip"], abs=1e-5)
    assert math.isfinite(row["aesthetic_student"]) and math.isfinite(row["aesthetic_teacher"])
    assert row["nfe_student"] == 4 and row["nfe_teacher"] == 3 * 2 and row["teacher_cfg"] == 7.0
    assert row["diversity_student"] > 0 and row["seconds_per_image_teacher"] > 0
    importable = {name for name, module in (("hpsv2", "hpsv2"), ("imagereward", "ImageReward"))
                  if __import__("importlib").util.find_spec(module) is not None}
    assert {"pickscore", "hpsv2", "imagereward"} - importable <= set(row["skipped"])
    assert "no_pickscore" in row["skipped"]["pickscore"]
    table = (tmp_path / "e" / "eval.md").read_text()
    assert "pickscore skipped" in table and "clip student / teacher" in table
    assert (tmp_path / "e" / f"eval_grid_{run_dir.name}.png").exists()


def test_t2i_vp_world_sdxl_is_evaluated_end_to_end(tiny_t2i_run, tmp_path):
    """The VP path (tiny SDXL): the student's CLIP score reproduces the run's last evaluation, the teacher's DDIM with
    CFG costs 2 NFE per step, and a metric without local weights (aesthetic: its CLIP is not given) is skipped."""
    import dmd
    from t2i.tiny import build_tiny_sdxl

    root, _ = tiny_t2i_run
    build_tiny_sdxl(tmp_path / "sdxl")
    out = dmd.main(dmd.Args(model="sdxl", model_path=str(tmp_path / "sdxl"), resolution=32, num_steps=1, batch_size=2,
                            eval_samples=4, eval_every=1, t2i_reward="clip", reward_checkpoints=f"clip={root / 'clip'}",
                            output_dir=str(tmp_path / "runs"), run_name="sdxl", progress=False, device="cpu"))
    result = ev.main(ev.Args(run_dirs=(str(out["run_dir"]),), out_dir=str(tmp_path / "e"), teacher_steps=2,
                             metrics=("clip", "aesthetic"), progress=False, device="cpu",
                             reward_checkpoints=f"aesthetic-clip={tmp_path / 'no_clip'}"))["results"][0]
    assert result["clip_student"] == pytest.approx(out["final"]["reward_clip"], abs=1e-5)
    assert result["nfe_teacher"] == 2 * 2 and "aesthetic" in result["skipped"]


# ---- command lines ----


def test_eval_command_line(tiny_runs, tmp_path):
    """`python eval.py RUN --out-dir DIR` (tyro, positional run directories) writes the table with the command."""
    import subprocess
    import sys

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "eval.py", str(tiny_runs["gdmd"]), "--out-dir", str(tmp_path / "cli"),
                           "--samples", "200", "--no-reference"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "cli" / "eval.md").read_text()
    assert "--samples 200" in text and "| gdmd |" in text


def test_every_benchmark_configuration_is_valid_for_its_method_file(tmp_path):
    """bench.py is not run by the suite (15 minutes), but each of its configurations must still be accepted by its
    method file's Args and validate(), so that the benchmark does not rot when a method file changes."""
    import importlib

    import bench

    for config in bench.BENCH_CONFIGS:
        method, kwargs = bench.method_args(config, 600, 0, 1.0, tmp_path)
        module = importlib.import_module(method)
        args = module.resolve_defaults(module.Args(**kwargs))
        module.validate(args)
        assert args.student_steps == 4 and args.batch_size == 256


# ---- runs of several worlds ----


def test_runs_of_two_worlds_are_grouped_each_with_its_own_references_and_figure(tiny_runs, tmp_path):
    """A ring8 run beside a grid25 run: the table has a world column and lists each world's reference rows with its
    runs; each world's exact-teacher reference is measured in that world (ED / floor < 4: a reference drawn from the
    other world's teacher would sit hundreds of floors away), each world has its own figure, and eval.md says which
    runs each figure leaves out."""
    import dmd

    grid = dmd.main(dmd.Args(run_name="grid", toy_mixture="grid25", num_steps=2, eval_every=2, eval_samples=300,
                             batch_size=32, output_dir=str(tmp_path / "runs"), progress=False))["run_dir"]
    out = ev.main(ev.Args(run_dirs=(str(tiny_runs["dmd"]), str(grid)), out_dir=str(tmp_path / "e"), samples=300,
                          progress=False))
    ring_world, grid_world = out["results"][0]["world"], out["results"][1]["world"]
    assert ring_world.startswith("ring8") and grid_world.startswith("grid25")
    assert [r["world"] for r in out["references"]] == [ring_world, ring_world, grid_world, grid_world]
    assert out["references"][2]["n_modes"] == 25 and out["references"][2]["energy_ratio"] < 4
    text = (tmp_path / "e" / "eval.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[1].split(",")[0] for row in rows] == ["ring8 std 0.25"] * 3 + ["grid25 std 0.15"] * 3
    assert rows[2].startswith("| dmd |") and rows[5].startswith("| grid |")
    assert "eval_samples.png: world ring8" in text and "leaves out the runs of other worlds: grid (eval_samples_world2.png)" in text
    assert "leaves out the runs of other worlds: dmd (eval_samples.png)" in text
    assert (tmp_path / "e" / "eval_samples.png").exists() and (tmp_path / "e" / "eval_samples_world2.png").exists()


def test_t2i_table_is_grouped_by_world():
    rows = [{"name": n, "model": m, "step": 1, "nfe_student": 4} for n, m in (("a", "sd3-medium"), ("b", "sdxl"),
                                                                            ("c", "sd3-medium"))]
    lines = ev.t2i_table(rows).splitlines()
    assert lines[0].startswith("| run | world |")
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| a", "sd3-medium"], ["| c", "sd3-medium"], ["| b", "sdxl"]]


def test_eval_runs_the_methods_validate_on_the_config(tiny_runs, tmp_path):
    """A config whose keys match but whose values the method refuses (a hand-edited config) fails in check_run with
    the method's own message, before any world is built."""
    run = copy_run(tiny_runs["dmd"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "student_steps": 0}))
    with pytest.raises(ValueError, match="dmd.py's validate refuses this config: student_steps must be in 1..8"):
        ev.check_run(run)


def test_a_dmdr_run_is_sampled_with_its_own_sampler_on_its_configured_world(tmp_path):
    """A dmdr run trained with the authors' ode sampler at --shift 2: eval.py rebuilds the world through
    dmdr.configure_world (the shift moves the student's levels) and samples with dmdr.rollout at the run's sampler, so it
    reproduces the run's last evaluation exactly. DMD2's sde sampler on the same checkpoint, or the unshifted levels,
    give other samples (checked, so that the reproduction is not an accident of this tiny run)."""
    import dmdr

    out = dmdr.main(dmdr.Args(run_name="ode", student_steps=2, sampler="ode", shift=2.0, stage1_steps=3, stage2_steps=0,
                              dynamic_steps=3, batch_size=32, fake_updates_per_step=1, eval_every=3, eval_samples=300,
                              seed=3, output_dir=str(tmp_path), progress=False))
    result, x, cond, run = ev.evaluate_run(out["run_dir"])
    last = out["history"][-1]
    assert result["sampler"] == "ode" and run["world"].shift == 2.0
    for key in ("energy_distance", "mean_reward", "teacher_logp"):
        assert result[key] == pytest.approx(last[key], rel=1e-9, abs=1e-12), key
    gen = torch.Generator().manual_seed(4)
    c = run["world"].sample_cond(300, gen)
    noise = run["world"].noise(c, gen)
    sde = run["module"].sample_student(run["world"], c, dmdr.student_sigmas(run["world"], 2), noise, generator=gen)
    unshifted = dmdr.rollout(run["world"], c, [1.0, 0.5], noise, sampler="ode")[0]
    assert not torch.allclose(sde, x, atol=1e-3) and not torch.allclose(unshifted, x, atol=1e-3)
    # a hand-edited dmdr config is refused by dmdr.py's own validate
    run_dir = copy_run(out["run_dir"], tmp_path / "edited")
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "shift": 0.0}))
    with pytest.raises(ValueError, match="dmdr.py's validate refuses this config: shift must be > 0"):
        ev.check_run(run_dir)


def test_toy_checkpoints_load_tensors_only(tmp_path):
    """world.load reads weights only: a checkpoint that holds anything but tensors and containers (here a function,
    which unpickling would look up and could call) is refused instead of run."""
    import pickle

    world = toy2d.ToyWorld("ring8")
    state = world.adapters["generator"].state_dict()
    torch.save({**state, "hook": math.sqrt}, tmp_path / "generator.pt")
    with pytest.raises(pickle.UnpicklingError):
        world.load("generator", tmp_path)
    torch.save(state, tmp_path / "generator.pt")
    world.load("generator", tmp_path)  # the same tensors alone load


# ---- figures ----


def draw(samples, tilted=True, limit=3.0):
    import matplotlib.pyplot as plt

    from toy2d.plots import draw_samples

    world = toy2d.ToyWorld("ring8")
    fig, ax = plt.subplots()
    handles = draw_samples(ax, samples, world.mixture, limit, tilted=world.reward_fn.tilt(world.mixture, 1.0) if tilted
                           else None)
    plt.close(fig)
    return ax, handles


def test_teacher_contours_are_solid_and_the_tilted_teachers_dashed():
    """Log-density levels are negative, which matplotlib dashes by default for one-colour contours: the styles must
    be set, so that solid (teacher) and dashed (tilted teacher) tell the two apart. The legend names both."""
    from matplotlib.contour import ContourSet

    ax, handles = draw(torch.zeros(10, 2))
    teacher, tilted = [c for c in ax.collections if isinstance(c, ContourSet)]
    assert all(dashes is None for _, dashes in teacher.get_linestyle())
    assert all(dashes for _, dashes in tilted.get_linestyle())
    assert {"teacher log p (peak -1, -3, -6)", "tilted teacher", "samples"} <= {h.get_label() for h in handles}
    assert ax.get_xlabel() == "$x_1$" and ax.get_ylabel() == "$x_2$"


def test_a_panel_says_how_many_samples_fall_outside_its_axes():
    """100 samples inside the axes and 100 reward-hacked ones at 1e9 (one of them NaN): the panel says 50% (100 of
    200) are outside and draws the 99 finite ones as crosses on the border in their direction; a panel whose samples
    are all inside says nothing."""
    far = torch.full((100, 2), 1e9)
    far[0] = float("nan")
    ax, handles = draw(torch.cat([torch.zeros(100, 2), far]))
    (note,) = [t.get_text() for t in ax.texts]
    assert note == "50% outside the axes (100 of 200)\nmax |x| 1e+09; x: where they left"
    crosses = ax.collections[-1].get_offsets()
    assert crosses.shape == (99, 2) and (crosses == 3.0).all()
    assert "samples outside the axes" in {h.get_label() for h in handles}
    ax, _ = draw(torch.zeros(100, 2), tilted=False)
    assert not ax.texts


def test_curves_are_a_grid_of_three_a_row_with_floors_and_stage_boundaries():
    """8 keys (one repeated, as the text-to-image world adds mean_reward to a list that has it): 8 panels in rows of
    at most 3; the energy distance panels carry their noise floor (energy_floor / energy_floor_tilted of the same
    records); the stage boundary, read from the records' "stage" (dmdr's step-0 record is stage 0), is marked in
    every panel; an explicit stage_boundaries replaces it."""
    from toy2d.plots import curves_figure, stage_boundaries_of

    history = [{"step": 0, "stage": 0, "energy_distance": 1.0, "energy_floor": 0.01, "energy_distance_tilted": 2.0,
                "energy_floor_tilted": 0.02, "mean_reward": 0.0}]
    history += [{"step": s, "stage": 1 if s <= 150 else 2, "a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}
                for s in range(25, 301, 25)]
    history += [{"step": s, "stage": 1 if s <= 150 else 2, "energy_distance": 0.5, "energy_floor": 0.011,
                 "energy_distance_tilted": 0.4, "energy_floor_tilted": 0.021, "mean_reward": 1.0} for s in (150, 300)]
    assert stage_boundaries_of(history) == [150]
    assert stage_boundaries_of([r for r in history if r.get("stage") != 1]) == []  # no stage 1 (dmdr, RL only)
    keys = ["a", "b", "c", "d", "e", "energy_distance", "energy_distance_tilted", "mean_reward", "mean_reward"]
    fig = curves_figure(history, keys)
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == [*keys[:-2], "mean reward (evaluation)"]  # repeated once; a title says
    # where a reward comes from
    assert len({round(ax.get_position().x0, 3) for ax in panels}) == 3
    assert len({round(ax.get_position().y0, 3) for ax in panels}) == 3
    for ax in panels:
        assert any(list(line.get_xdata()) == [150, 150] for line in ax.get_lines()), ax.get_title()
    for ax, floors in ((panels[5], [0.01, 0.011, 0.011]), (panels[6], [0.02, 0.021, 0.021])):
        assert any(list(line.get_ydata()) == floors for line in ax.get_lines()) and ax.get_yscale() == "log"
    fig = curves_figure(history, ["a"], stage_boundaries=[100, 200])
    assert sorted(line.get_xdata()[0] for line in fig.axes[0].get_lines()[1:]) == [100, 200]
    assert curves_figure(history, ["not_recorded"]) is None


# ---- the command lines: one-line errors ----


def run_cli(*argv):
    import subprocess
    import sys

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, *argv], cwd=repo, capture_output=True, text=True)


def test_a_bad_input_is_one_line_and_exit_status_2(tmp_path):
    """eval.py and bench.py: a validation error prints `error: <message>` on one line to stderr and exits 2, with no
    traceback and no output written."""
    cases = [(("eval.py", str(tmp_path / "nope")), "is not a directory"),
             (("bench.py", "--steps", "1", "--out-dir", str(tmp_path / "b")), "need steps >= 2"),
             (("bench.py", "--report", str(tmp_path)), "no bench_rows.jsonl")]
    if not torch.cuda.is_available():
        cases.append((("eval.py", str(tmp_path), "--device", "cuda"), "no CUDA device"))
    for argv, message in cases:
        proc = run_cli(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_cli_main_keeps_the_traceback_of_a_crash(monkeypatch, capsys):
    """cli_main turns only check()'s errors into one line; the same exception type raised by the work itself (a
    crash) propagates with its traceback."""
    from dataclasses import dataclass

    @dataclass
    class Tiny:
        n: int = 1
        """a number"""

    def check(args):
        if args.n < 0:
            raise ValueError("n must be >= 0\n(a second line)")

    def crash(args):
        raise ValueError("inside the work")

    monkeypatch.setattr("sys.argv", ["prog", "--n", "-1"])
    with pytest.raises(SystemExit) as stop:
        ev.cli_main(crash, Tiny, check)
    assert stop.value.code == 2 and capsys.readouterr().err == "error: n must be >= 0 (a second line)\n"
    monkeypatch.setattr("sys.argv", ["prog", "--n", "1"])
    with pytest.raises(ValueError, match="inside the work"):
        ev.cli_main(crash, Tiny, check)
    assert ev.cli_main(lambda args: args.n * 10, Tiny, check) == 10


def test_bench_help_lists_its_configurations():
    import bench

    proc = run_cli("bench.py", "--help")
    assert proc.returncode == 0
    for config in bench.BENCH_CONFIGS:
        assert config in proc.stdout, config
    assert run_cli("bench.py", "--only", "dmd-4").returncode == 2  # not a configuration: refused by the parser


def test_speed_benchmark_runs_the_beginning_of_each_default_run(tmp_path):
    """bench_speed.py --fraction f: every step count of a method's toy run scaled by f (the generator updates are f
    of the default's, to rounding), every other option the method's toy default, and the result valid for it."""
    import dataclasses
    import importlib

    import bench_speed

    for method in bench_speed.METHODS:
        module = importlib.import_module(method)
        _, full, full_updates = bench_speed.toy_args(method, 1.0, 0, str(tmp_path))
        _, part, updates = bench_speed.toy_args(method, 0.1, 0, str(tmp_path))
        assert abs(updates - 0.1 * full_updates) <= 1, (method, updates, full_updates)
        scaled = set(sum(bench_speed.STEP_FIELDS[method], ()))
        default = module.resolve_defaults(module.Args(output_dir=str(tmp_path), run_name=f"{method}__speed",
                                                      progress=False))
        for f in dataclasses.fields(module.Args):
            if f.name not in scaled:
                assert getattr(part, f.name) == getattr(default, f.name), (method, f.name)
