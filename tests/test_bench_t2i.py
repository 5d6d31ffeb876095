"""bench_t2i.py on the tiny offline SD3 pipeline (t2i.tiny), every method's iteration, in-process. What is asserted:
  * every row is finite: each method's iteration ran (status ok), its times, FLOPs, memory and ratios are finite and
    positive (the "other" time, iteration - passes, finite), and so are the sampling and option rows;
  * every timed iteration makes exactly the recorded iteration's passes (the benchmark reseeds before each: the methods
    draw their student step at random, and a replay of one draw against iterations of another compares unlike work);
  * the recorder sees what the method does: dmd's iteration (K = 4, --fake-tracks final, one fake update) makes
    exactly the world passes its algorithm implies (below), with a backward through the two that are trained;
  * the parts sum to no more than the whole, twice:
      FLOPs (exact, no noise): the replayed passes' matrix FLOPs equal the recorded iteration's. Every matrix
      product of these iterations is inside a world pass (the losses, optimisers and advantages are elementwise), so
      equality is the statement that the replay covers the iteration's work, and "no more than" its exact half;
      time: the iterations and the replays are interleaved (iteration i, then replay i), and the paired differences
      d_i = replay_i - iteration_i, i = 1..R, are tested one-sided: mean(d) <= t(0.999, R - 1) sd(d) / sqrt(R),
      Student's t bound at R = 3 pairs (t = 22.33): if the parts' true time were at most the whole's, a failure would
      have probability <= 0.1% per method under independent normal noise; no wall-clock threshold;
    and the breakdown's kinds sum to the passes' total (every pass has a kind);
  * the option rows: dmd's micro-batch row acted (its largest forward with grad is the micro-batch), its
    gradient-checkpointing row flipped the world's flag.
About 30 s of CPU.
"""

import math
import statistics

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

T_999 = {2: 22.327, 3: 10.215, 4: 7.173}  # one-sided 0.999 quantiles of Student's t, by degrees of freedom


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import bench_t2i
    from t2i.tiny import build_tiny_sd3

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench_t2i")
    build_tiny_sd3(root / "sd3")
    args = bench_t2i.Args(
        model_path=str(root / "sd3"), resolution=32, device="cpu", batch_size=2, reward_models="tiny",
        set=("fake_updates_per_step=1", "rtdmd.groups=1", "rtdmd.group_size=2"), warmup=1, iterations=3, pass_repeats=3,
        sample_batch=1, sample_repeats=1, options=("micro-batch", "gradient-checkpointing"), option_methods=("dmd",),
        work_dir=str(root / "work"), docs=str(root / "performance.md"), seed=0)
    out = bench_t2i.main(args)
    out["docs"] = (root / "performance.md").read_text()
    return out


def finite(*values):
    return all(v is not None and math.isfinite(v) for v in values)


def test_every_row_is_finite(result):
    import bench_t2i

    assert [r["method"] for r in result["rows"]] == list(bench_t2i.METHODS)
    for r in result["rows"]:
        assert r["status"] == "ok", (r["method"], r["status"])
        assert finite(r["iteration_s"], r["passes_s"], r["other_s"], r["fake_phase_s"], r["backward_s"])
        assert r["iteration_s"] > 0 and r["passes_s"] > 0 and r["passes"] > 0
        assert r["same_passes"]  # each timed iteration made exactly the recorded (and replayed) iteration's passes
        assert all(finite(v) and v >= 0 for v in r["breakdown"].values())
        assert r["flops_iteration"] > 0 and r["peak"] > 0 and r["floor"] > 0 and r["fb"] > 0
        assert r["peak"] >= r["floor"] or r["peak"] > 0.9 * r["floor"]  # RSS: the peak of the timed iterations
        assert r["applied"] == {"batch_size": 2, "fake_updates_per_step": 1,
                                **({"groups": 1, "group_size": 2} if r["module"] == "rtdmd" else {}),
                                **({"stage2_batch_size": 2} if r["module"] == "dmdr" else {})}
        assert r["batch_size"] == 2  # every iteration's batch, dmdr's stage 2 and RTDMD's RL rollout (1 x 2) too
    s = result["sampling"]
    assert finite(s["student_s"], s["teacher_s"], s["decode_s"], s["speedup"]) and s["speedup"] > 1
    assert s["nfe_teacher"] == 56 and s["nfe_student"] == 4 and s["nfe_ratio"] == 14  # 28 steps x CFG; K = 4
    for o in result["options"]:
        assert o["applies"] and o["status"] == "ok" and finite(o["iteration_s"], o["peak"], o["fb"])
    assert "#### Cost per iteration" in result["docs"] and "| dmd | 2 |" in result["docs"]


def test_the_recorder_sees_the_passes_of_dmd(result):
    """dmd, K = 4, final fake, one fake update: the fake round's rollout is 3 student steps + the last step's output
    (4 generator forwards, no grad), then 1 fake forward with its backward; the generator update's backward
    simulation is 3 steps without grad, the last with grad (backward), then the real score (teacher, CFG) and the fake
    score at the renoised sample (no grad). 11 passes."""
    dmd = next(r for r in result["rows"] if r["method"] == "dmd")
    assert dmd["pass_counts"] == {"rollout": 7, "teacher": 1, "fake": 2, "generator": 1, "decode": 0, "reward": 0}
    assert dmd["passes"] == 11 and dmd["backward_passes"] == 2
    assert dmd["largest_grad_batch"] == 2  # the fake's and the generator's forwards with grad, batch 2, no CFG


def test_the_parts_sum_to_no_more_than_the_whole(result):
    for r in result["rows"]:
        assert r["flops_passes"] == r["flops_iteration"], r["method"]
        assert math.isclose(sum(r["breakdown"].values()), r["passes_s"], rel_tol=1e-9)
        d = [p - w for p, w in zip(r["pass_totals"], r["iteration_samples"], strict=True)]
        bound = T_999[len(d) - 1] * statistics.stdev(d) / math.sqrt(len(d))
        assert statistics.mean(d) <= bound, (r["method"], d)


def test_option_rows_say_what_acted(result):
    rows = {o["option"]: o for o in result["options"]}
    assert rows["micro-batch"]["acted"] and rows["micro-batch"]["setting"] == "micro_batch_size=1"
    assert rows["micro-batch"]["largest_grad_batch"] == 1
    gc = rows["gradient-checkpointing"]
    assert gc["acted"] and gc["setting"] == "gradient_checkpointing=False"  # dmd's default is True on every device


def test_the_cuda_defaults_are_the_real_sd3_medium():
    """The GPU command (`python bench_t2i.py` on CUDA) builds SD3-Medium's own transformer: 24 blocks of 24 heads x 64,
    2.03e9 parameters (counted on the meta device, no memory), at 512 px with each method's own batch (8 for SD3) and
    its recipe (no overrides); the CPU default keeps the width and cuts the depth."""
    import bench_t2i
    from diffusers import SD3Transformer2DModel

    gpu = bench_t2i.resolve(bench_t2i.Args(device="cuda"), check_device=False)
    assert (gpu.heads, gpu.layers, gpu.resolution, gpu.batch_size, gpu.set) == (24, 24, 512, None, ())
    assert gpu.reward_models == "real" and gpu.vae == "real"
    with torch.device("meta"):
        net = SD3Transformer2DModel(**bench_t2i.transformer_config("sd3-medium", gpu.heads, gpu.layers))
    assert round(sum(p.numel() for p in net.parameters()) / 1e7) == 203
    cpu = bench_t2i.resolve(bench_t2i.Args(device="cpu"))
    assert (cpu.heads, cpu.layers, cpu.resolution, cpu.batch_size) == (24, 1, 128, 2)
