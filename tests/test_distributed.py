"""Data parallel under torchrun, on 2 CPU processes (gloo): the methods' own setup_distributed and sync_and_clip.

1. One data-parallel update (TTUR fake update, then a generator update, both through dmd.py's loss functions) on 2
   ranks, each with half of the global batch, gives exactly the adapters of ONE process that averages the gradients of
   the same two halves (the same global batch), and identical adapters on both ranks, gradient clipping included.
2. `torchrun --nproc_per_node 2 dmd.py` runs end to end and rank 0 alone writes the run directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import dmd
import toy2d

REPO = Path(__file__).resolve().parents[1]
HALF = 64

WORKER = r'''
import sys, torch
sys.path.insert(0, {repo!r})
import dmd, toy2d
from test_distributed import one_update
args = dmd.resolve_defaults(dmd.Args(device="cpu"))
rank, world_size, device = dmd.setup_distributed(args)
assert world_size == 2 and device == "cpu"
world = toy2d.ToyWorld(seed=0)
one_update(world, [rank], grad_clip=0.05)
torch.save([p.detach() for p in world.params("generator") + world.params("fake")], sys.argv[1] + f"/rank{{rank}}.pt")
torch.distributed.destroy_process_group()
'''


def one_update(world, halves, grad_clip):
    """A fake-score update and a generator update on the given halves of a fixed global batch (half r: its own seeded
    conditions, noise, levels); the loss of each half is divided by the number of halves, so that in one process the
    accumulated gradient is the global-batch mean, as sync_and_clip's average is across ranks."""
    sigmas = dmd.student_sigmas(world, 1)
    opts = {role: torch.optim.AdamW(world.params(role), 1e-2, weight_decay=0.01) for role in ("fake", "generator")}
    for role in ("fake", "generator"):
        opts[role].zero_grad(set_to_none=True)
        for r in halves:
            torch.manual_seed(1000 + r)
            cond = world.sample_cond(HALF)
            noise = world.noise(cond)
            if role == "fake":
                with torch.no_grad():
                    x0, _ = dmd.generator_sample(world, cond, sigmas, noise)
                loss = dmd.fake_score_loss(world, x0, cond, torch.rand(HALF).clamp(min=1e-3))
            else:
                x0, _ = dmd.generator_sample(world, cond, sigmas, noise)
                loss = dmd.dmd_generator_loss(world, x0, cond, 0.02 + 0.96 * torch.rand(HALF), 1.0)
            (loss / len(halves)).backward()
        dmd.sync_and_clip(world.params(role), grad_clip)
        opts[role].step()


def torchrun(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_data_parallel_update_equals_one_process_with_the_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    out = torchrun(str(script), str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    world = toy2d.ToyWorld(seed=0)
    start = [p.detach().clone() for p in world.params("generator") + world.params("fake")]
    one_update(world, [0, 1], grad_clip=0.05)  # one process, the same global batch (both halves)
    reference = [p.detach() for p in world.params("generator") + world.params("fake")]
    moved = sum(float((a - b).abs().sum()) for a, b in zip(reference, start))
    assert moved > 0
    for a, b, ref in zip(rank0, rank1, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the ranks stay identical
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)

    # ... and not a trivial agreement: one half alone is a different update
    alone = toy2d.ToyWorld(seed=0)
    one_update(alone, [0], grad_clip=0.05)
    assert max(float((a.detach() - b).abs().max()) for a, b in zip(alone.params("generator"), reference)) > 1e-4


def test_torchrun_dmd_end_to_end(tmp_path):
    """`torchrun --nproc_per_node 2 dmd.py`: the run finishes, rank 0 alone writes the one run directory (metrics,
    checkpoint, figures) and the generator adapter leaves its zero initialisation. (The equality with one process is test 1:
    a whole run cannot be compared sample for sample, since each rank draws its own noise.)"""
    out = torchrun(str(REPO / "dmd.py"), "--batch-size", "64", "--num-steps", "60", "--eval-every", "60",
                   "--eval-samples", "500", "--no-progress", "--output-dir", str(tmp_path), "--run-name", "ddp")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    run = tmp_path / "ddp"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "energy_distance" in r] == [0, 60]
    assert (run / "checkpoint" / "generator.pt").exists() and (run / "samples.png").exists()
    trained = torch.load(run / "checkpoint" / "generator.pt")
    assert trained["out.weight"].abs().sum() > 0  # zero at initialisation: the generator adapter was trained
    assert out.stdout.count("dmd: done") == 1  # one report, from rank 0



def test_a_torchrun_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path):
    """2 ranks, 20 updates uninterrupted against 10, a stop and `--resume --num-steps 20`: the same generator weights
    bit for bit. Each rank draws its own noise, so the checkpoint must keep every rank's random state (with rank 0's
    alone, rank 1 replays rank 0's noise after the resume and the weights differ). Resuming with another number of
    processes is refused in one line: rank 1's stream would be lost."""
    common = ["--batch-size", "32", "--eval-every", "10", "--eval-samples", "200", "--lr-schedule", "constant",
              "--no-progress", "--output-dir", str(tmp_path)]
    for name, steps in (("full", "20"), ("part", "10")):
        out = torchrun(str(REPO / "dmd.py"), *common, "--num-steps", steps, "--run-name", name)
        assert out.returncode == 0, out.stderr[-3000:]
    alone = subprocess.run([sys.executable, "dmd.py", "--resume", str(tmp_path / "part"), "--num-steps", "20"],
                           cwd=REPO, capture_output=True, text=True)
    assert alone.returncode != 0 and "saved by 2 process(es), and this run has 1" in alone.stderr, alone.stderr[-2000:]
    out = torchrun(str(REPO / "dmd.py"), "--resume", str(tmp_path / "part"), "--num-steps", "20", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    full, part = (torch.load(tmp_path / name / "checkpoint" / "generator.pt") for name in ("full", "part"))
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)


NAN_WORKER = r'''
import os, sys, torch
sys.path.insert(0, {repo!r})
import dmd
real = dmd.dmd_generator_loss
calls = []

def nan_on_rank_1(*args, **kwargs):
    loss = real(*args, **kwargs)
    calls.append(1)
    return loss * float("nan") if os.environ["RANK"] == "1" and len(calls) == 3 else loss

dmd.dmd_generator_loss = nan_on_rank_1
dmd.main(dmd.Args(batch_size=32, num_steps=20, eval_every=20, eval_samples=200, progress=False,
                  output_dir=sys.argv[1], run_name="nan"))
'''


def test_a_nan_on_one_rank_stops_every_rank_with_the_message(tmp_path):
    """Rank 1's DMD loss turns NaN at its third update: both ranks stop with FloatingPointError naming the loss and the
    step (rank 0: "on another rank"), instead of rank 0 waiting in the gradient all-reduce until the backend's timeout.
    (The subprocess timeout only turns a hang into a failure; the run itself takes seconds.)"""
    script = tmp_path / "nan_worker.py"
    script.write_text(NAN_WORKER.format(repo=str(REPO)))
    env = {**os.environ, "PYTHONPATH": f"{REPO}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "runs")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode != 0
    assert "FloatingPointError: dmd_loss is nan on rank 1 at step 3" in out.stderr, out.stderr[-3000:]
    assert "FloatingPointError: dmd_loss is non-finite on another rank at step 3" in out.stderr, out.stderr[-3000:]
