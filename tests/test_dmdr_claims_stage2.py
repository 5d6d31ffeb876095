"""The DMDR paper's stage-2 claims on the toy (v1 table 5, v2 fig. 4 and table 5b), under the paper's protocol: every
arm starts from the SAME stage-1 checkpoint (the cold-started student, not the teacher-initialised one) and the arms
differ in one thing. Toy default student (1 step), ring8, seed 0, 600 stage-1 updates (RT-DM, DynaDG, DynaRS), then
300 stage-2 updates per arm (fresh optimisers). Metrics are means over the evaluations at updates 200 and 300 of
stage 2 (2000 samples each: mean-reward standard error 0.032, a difference of two such means 0.045).

Measured (seeds 0 / 1, mean reward / mean teacher log-density at update 300; teacher samples: 0 / -2.13; the stage-1
student: -0.09 / -4.26 and -0.25 / -3.19):
    DMD only            -0.07 / -3.23     -0.24 / -3.41
    DMD + ReFL (0.3)     1.03 / -4.71      0.78 / -3.70   8 modes, 15-28% of samples off the ring
    DMD + ReFL (0.5)     1.34 / -5.08                     33-41% off: the paper's lambda crosses the toy's boundary
    DMD + DPO (0.5)      0.41 / -4.21                     8 modes
    ReFL only           10.2 / -605                       every sample off the ring, at rest beyond the margin
    DPO only             4.33 / -71.0                     still climbing
GRPO (group-normalised REINFORCE) needs K >= 2 and is not tested here: at K = 4 joint DMD + GRPO at lambda 0.5 swings
(sde) or diverges (ode), and at 0.05 it does not raise the reward steadily (see dmdr.py's docstring).

The hacking boundary (the README's "joint DMD + ReFL stays on the data manifold", for which lambda and margin): for a
reward that can be raised on the manifold (linear: reweight toward the right-hand modes) and one that can be raised
only off it (radius r = |x|: every mode of the ring scores 2), measured at lambda 0.1 / 0.3 / 1 / 3 and margins
2 / 3 / none (seeds 0 / 1; tests below check one point on each side):
    linear: on the ring for lambda <= 0.3 at every margin; from lambda 1 the samples go to the margin: margin 2 (the
            best mode's reward) collapses onto the right-hand modes, on the ring; margin 3 puts every sample at x_1 = 3,
            off the ring; no margin diverges.
    radius: margin 2 (the ring itself) stays on the ring at every lambda; margin 3 or none: 9-23% off at lambda 0.1,
            28-47% at 0.3, and from lambda 1 every sample at radius 3 (margin 3) or diverging (none).
    The boundary sits where lambda |grad r| reaches the DMD term's restoring force, which the DMD2 normalisation
    bounds at ~1 per coordinate (force balance: lambda / n against grad / (2 n)): lambda* ~ 0.5 on the toy.
"""

import pytest
import torch

import dmdr

S1, S2 = 600, 300
_ARMS = {}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    run = dmdr.main(dmdr.Args(output_dir=str(out), progress=False, run_name="stage1", stage1_steps=S1, stage2_steps=0,
                              eval_every=S1, eval_samples=2000, seed=0))
    return {"checkpoint": run["run_dir"] / "checkpoint", "dir": out, "final": run["final"]}


def arm(stage1, name, **kw):
    """Stage 2 from the stage-1 checkpoint (cached per module: several tests compare the same arms)."""
    if name not in _ARMS:
        args = dmdr.resolve_stage2(dmdr.resolve_defaults(dmdr.Args(
            output_dir=str(stage1["dir"]), progress=False, run_name=name, stage1_steps=0, stage2_steps=S2, dynamic_steps=0,
            eval_every=100, eval_samples=2000, seed=0, **kw)))
        torch.manual_seed(0)
        world = dmdr.make_world(args, "cpu")
        world.load("generator", stage1["checkpoint"])
        world.load("fake", stage1["checkpoint"])
        out = dmdr.main(args, world=world)
        late = [h for h in out["history"] if "energy_distance" in h and h["step"] >= 200]
        _ARMS[name] = {k: sum(h[k] for h in late) / len(late) for k in ("mean_reward", "teacher_logp", "off_manifold",
                                                                        "modes_covered", "energy_distance")}
        print(name, {k: round(v, 3) for k, v in _ARMS[name].items()})
    return _ARMS[name]


def test_joint_dmd_refl_raises_the_reward_on_the_manifold_where_refl_alone_hacks(stage1):
    """Fig. 4 / table 5: from the same checkpoint, ReFL alone leaves the manifold (teacher log-density 10+ nats below
    DMD-only's: samples 4.5 mode std off) and joint DMD + ReFL (toy default: lambda 0.3, margin 3) raises the reward by
    more than 0.4 (ten standard errors) with the log-density within 2 nats of DMD-only's and at least 7 of 8 modes."""
    none = arm(stage1, "none", rl="none")
    joint = arm(stage1, "refl", rl="refl")
    alone = arm(stage1, "refl_only", rl="refl", dmd=False)
    assert joint["mean_reward"] > none["mean_reward"] + 0.4
    assert joint["teacher_logp"] > none["teacher_logp"] - 2.0 and joint["modes_covered"] >= 7
    assert alone["teacher_logp"] < none["teacher_logp"] - 10.0 and alone["off_manifold"] > 0.9
    assert alone["mean_reward"] > 3.0  # ... at rest beyond the hinge's margin (3)


def test_joint_dmd_dpo_raises_the_reward_on_the_manifold_where_dpo_alone_hacks(stage1):
    """Table 5b with DPO (lambda 0.5): joint DMD + DPO raises the reward by more than 0.2 (4.5 standard errors) within
    2 nats of DMD-only's log-density; DPO alone drifts off (10+ nats below)."""
    none = arm(stage1, "none", rl="none")
    joint = arm(stage1, "dpo", rl="dpo", lambda_rl=0.5)
    alone = arm(stage1, "dpo_only", rl="dpo", dmd=False)
    assert joint["mean_reward"] > none["mean_reward"] + 0.2
    assert joint["teacher_logp"] > none["teacher_logp"] - 2.0
    assert alone["teacher_logp"] < none["teacher_logp"] - 10.0


def test_the_hacking_boundary_depends_on_lambda_and_on_where_the_margin_can_be_met(stage1):
    """At lambda 1 (above the boundary), joint DMD + ReFL puts every sample at the margin: off the ring when the margin
    cannot be met on it (linear reward, margin 3: mean reward within 0.3 of 3; radius reward, margin 3), on the ring
    when it can (radius, margin 2 = the ring's radius: under 15% of samples off, within 1 nat of DMD-only). Below it
    (lambda 0.3, the first test) the linear reward is raised on the ring."""
    none = arm(stage1, "none", rl="none")
    linear_off = arm(stage1, "linear_m3_l1", rl="refl", lambda_rl=1.0)
    radius_on = arm(stage1, "radius_m2_l1", rl="refl", lambda_rl=1.0, refl_margin=2.0, toy_reward="radius")
    radius_off = arm(stage1, "radius_m3_l1", rl="refl", lambda_rl=1.0, toy_reward="radius")
    assert linear_off["off_manifold"] > 0.9 and abs(linear_off["mean_reward"] - 3.0) < 0.3
    assert radius_off["off_manifold"] > 0.9 and abs(radius_off["mean_reward"] - 3.0) < 0.3
    assert radius_on["off_manifold"] < 0.15 and radius_on["teacher_logp"] > none["teacher_logp"] - 1.0
