"""GDMD: DMD whose reward is scored on the DMD targets, not on the raw samples (a RECONSTRUCTION; no public code).

    python gdmd.py                                  # toy world: plain-DMD cold start, then GDMD (see the docstring's end)
    python gdmd.py --naive-fusion                   # the baseline: score the raw sample instead of the targets
    python gdmd.py --group-source snapshots         # target group from fake-score snapshots instead of renoise levels
    python gdmd.py --init-checkpoint runs/dmd__toy2d__0__<time>/checkpoint --cold-start-steps 0   # GDMD from a DMD run
    python gdmd.py --model sd3-medium --prompts my_prompts.txt  # text-to-image (GPU), PickScore on the targets
    python gdmd.py --help                           # every option, with its default

A run writes runs/gdmd__<model>__<seed>__<time>/: config.json, metrics.jsonl (losses, target rewards, advantages,
evaluation metrics), checkpoint/ (the latest good generator and fake adapters), samples.png and curves.png.

This file is a reconstruction. GDMD ("Guiding Distribution Matching Distillation with Gradient-Based Reinforcement
Learning", Dong et al., arXiv 2604.19009) has no public code, and we have only its abstract and a public machine review
(../shared/papers/gdmd_abstract_and_review.md), plus the GDMD and DiffusionNFT entries of
../shared/notes/reference-implementations.md and the team's issue 5. Every line below is ours.
What comes from the source, and what is ours:
  from the source   DMD's gradients read as implicit targets that a reward model scores instead of the raw samples;
                    "an adaptive weighting that synchronises the RL policy with the distillation objective"; the
                    diagnosis that raw-sample scoring conflicts with the distillation and is noisy early in training;
                    a figure (4a) of the divergence between the RL and the DMD updates; 4-step students; several rewards.
  NFT               the source's only evidence that the RL term is DiffusionNFT is in figure captions: figure 7 compares
                    "DMD + NFT", figure 8 "DMD + NFT (sample-based scoring with SDE sampling)" as a baseline.
  ours              the target GROUP and where its members differ (renoise levels, fake-score snapshots), the NFT
                    positive / negative policies in x0 form, the advantage normalisation and clip, the cold start, the
                    naive-fusion baseline below, the per-reward normalisation, and every default.
With one generator update per batch (x = x_old, as here) the NFT term is an ADVANTAGE-WEIGHTED DMD (eq. 5 below): it
reweights the group's own DMD steps by their targets' advantages, and nothing of NFT's forward-process training of an
SDE policy remains.

The algorithm as we reconstruct it (equation numbers are ours):
    DMD2 (see dmd.py): the generator output x = G_theta(x_k, sigma_k) at the backward-simulated step k regresses to the
    stop-gradient target x_hat = sg(x - g), g the DMD2-normalised distribution-matching step at a renoise level sigma:
        g = (p_real - p_fake) / mean|p_real|,   p = x - x0(x_sigma)                                          (1)
    GDMD scores these targets, not x:
    (2) target group: for every x, n targets x_hat_j = sg(x - g_j), the g_j from n renoise levels sigma_j
        ("levels"), from the live fake score and n - 1 recent snapshots of the fake adapter at one shared level
        ("snapshots"), or level j with snapshot j ("both").
    (3) rewards of the targets r_j = r(x_hat_j) (no grad) and group-normalised, clipped advantages over the n targets
        of the same x:  A_j = clip((r_j - mean_j r) / (std_j r + 1e-4), -A_max, A_max)   (0 when all r_j are equal)
    (4) the generator loss: the plain DMD loss over the group plus lambda_gdmd times a DiffusionNFT-style loss with
        the targets as the clean data, the generator's output x as the policy and the generator frozen at the start of
        the step as the old policy (x_old = the same output, detached):
            L = mean_j dmd_loss(x, g_j) + lambda_gdmd * L_nft                                                 (4a)
            rho_j = clip(A_j, -A_max, A_max) / (2 A_max) + 1/2                       (DiffusionNFT's r, in [0, 1])
            x+ = beta x + (1 - beta) x_old,   x- = (1 + beta) x_old - beta x         (x0 form of v+, v-: affine in v)
            L_nft = mean_{b,j} A_max / beta * [ rho_j |x+ - x_hat_j|^2 / (D w+_j) + (1 - rho_j) |x- - x_hat_j|^2 / (D w-_j) ]
            w+-_j = sg(mean |x+- - x_hat_j|) (DiffusionNFT's adaptive weight, floored at 1e-5), D = numel of one x  (4b)

The identity behind "adaptive weighting that synchronises the RL policy with the distillation objective".
At x = x_old (always true here: one generator update per batch, taken at theta_old) x+ = x- = x and
x+- - x_hat_j = x - (x - g_j) = g_j, so w+_j = w-_j = m_j := mean|g_j|, and with B samples in the batch
    d L_nft / d x_b = 1/(B n) sum_j A_max/beta [ rho 2 beta g_bj - (1 - rho) 2 beta g_bj ] / (D m_bj)
                    = sum_j c_bj A_bj g_bj,        c_bj = 2 / (B n D m_bj)     (2 rho - 1 = A / A_max; beta, A_max cancel)
while d mean_j dmd_loss(x, g_j) / d x_b = sum_j g_bj / (B n D). So the whole GDMD update of x_b is
    d L / d x_b = 1/(B n D) sum_j (1 + 2 lambda_gdmd A_bj / m_bj) g_bj                                         (5)
a reward-weighted sum of the group's own DMD steps: the RL term can only move x within the span of its DMD steps,
toward the targets the reward prefers and away from those it does not. A constant reward gives A = 0, so the update is
exactly the group-averaged DMD update (with n = 1 and "levels", exactly dmd.py's). Because of w, the RL term of (5)
moves x along unit-scale directions g/m: its size does not shrink as the DMD steps do.

The naive-fusion baseline (--naive-fusion, OUR baseline: not the paper's "DMD + NFT" of figure 8, which runs DiffusionNFT
on SDE rollouts beside DMD): everything identical, but the reward is that of the raw sample x_b,
normalised over the batch (the batch is the group; on t2i, a batch of one prompt repeated), A_bj = A_b for every j.
Then (5) reads 1/(BnD) sum_j (1 + 2 lambda A_b / m_bj) g_bj: the reward of the sample decides how hard x follows its
DMD steps (or, for a poor sample, runs against them), but not which direction is better.

Choices we had to make (the paper's text is not available to us):
  - The group is built at the backward-simulated step's x0 (DMD2's generator output), one student step per batch.
  - "levels": each target its own renoise time t ~ U[renoise_min, renoise_max] and own noise, live fake score.
    "snapshots": one shared time and noise, fake scores = live + the n - 1 most recent snapshots (cycled while the
    ring buffer fills), so the targets differ only through the fake score. "both": target j has its own time and
    snapshot j. Snapshots are clones of world.params("fake") taken every `snapshot_every` generator updates (also
    during the cold start), evaluated by copying their values into the live adapter under no_grad and back.
  - Advantages are normalised over the n targets of one sample (population std, + 1e-4 as in the usual GRPO /
    Flow-GRPO normalisation), set to exactly 0 when all rewards of a group are equal, clipped at A_max = 5 (the
    DiffusionNFT default). With population std, |A| <= sqrt(n - 1), so A_max = 5 clips nothing for n <= 26.
  - The NFT term uses DiffusionNFT's loss as in the notes, in x0 form (x0 = x_t - t v is affine in v, so mixing
    velocities equals mixing x0s; the same holds for eps on VP paths). Its beta (1.0) does not change the gradient at
    x = x_old and is not an option.
  - The old policy is the generator at the start of the step; with one update per batch x_old = x.detach() (no
    second forward pass). Several inner updates per batch (where x_old would matter) are left out.
  - The reward is scored on the targets without grad (the world decodes when it has a decoder; toy: identity). With
    several reward terms (text-to-image specs such as "pickscore,clip"), each term is normalised over the group before
    the weighted sum (combined_advantages), so that the reward with the widest spread does not decide alone.
  - The divergence diagnostic (fig. 4a): every GDMD step logs rl_dmd_cosine, the cosine between the RL term's and the
    DMD term's gradients w.r.t. the generator outputs (eq. 5's space; the parameter-space angle would cost two extra
    backward passes through the generator).
  - Cold start: plain DMD (dmd.py's generator loss) for `cold_start_steps`, then GDMD; the fake score keeps its TTUR
    updates throughout. The abstract's regime is the noisy early stage, so --cold-start-steps 0 (GDMD from the
    teacher-initialised student) is the ablation that speaks to it (bench.py's gdmd-no-cold-start row).
  - The DMD backbone is dmd.py's, with its choice of what the fake score tracks (--fake-tracks; K = 4 here). The DMD-only control of the tests is this file with lambda_gdmd = 0 (group DMD, same compute).
  - Naive fusion is the same loss with the raw sample's batch-normalised reward (above), not a separate DMD +
    DiffusionNFT-on-forward-noised-samples pipeline.

Conventions: sigma in [0, 1], sigma = 1 is pure noise. Flow worlds (toy flow, SD3): x = (1 - sigma) x0 + sigma eps.
VP worlds (toy vp, SDXL): x = alpha x0 + sigma eps. A pre-shift time t in [0, 1] maps to sigma = world.sigma(t).
The algorithm sees only x0-predictions, world.renoise and world.reward, so it is identical on every world.

Toy default (ring8, linear reward r = x_1): 750 plain-DMD cold-start updates, then 750 GDMD updates, n = 4 levels,
lambda_gdmd = 0.2, per-step fakes. Measured with tests/test_gdmd.py's protocol (a shared 400-step DMD checkpoint,
150 updates per arm, batch 128, the mean of the evaluations), seeds 0 / 1 / 2, by backbone (--fake-tracks):
    per-step  GDMD - DMD-only reward +0.20 / +0.24 / +0.10 at teacher log-density -0.01 / -0.01 / +0.02; naive fusion
              raises the reward MORE than GDMD (+0.02 / +0.10 / +0.16 over it) at log-density -0.04 / +0.02 / -0.04:
              "naive fusion leaves the manifold" is NOT reproduced on this backbone.
    mixture   (DMD2's estimator, measured before the fake tracked its step) GDMD - DMD-only reward +0.18 / +0.36 /
              +0.28 at log-density +0.16 / -0.02 / +0.13; naive fusion's log-density 0.20-0.26 below GDMD's on every
              seed. DMD itself sloshes mode mass on the ring there (reward swings of +-0.3 between evaluations).
    final     GDMD still raises the reward, at a log-density 0.08 below DMD-only's (-2.69 against -2.61); on seed 0
              naive fusion beats GDMD on both (reward 0.30 against 0.12, log-density -2.57 against -2.70).
So the toy supports "scoring the targets raises the reward without leaving the manifold" on every backbone, and the
advantage over scoring the raw sample only on the mixture estimator, whose own instability the raw-sample reward
seems to amplify. The per-step backbone sits closer to the teacher (log-density -2.27 against -2.61 on final).
The "snapshots" and "both" sources left the manifold on the toy (teacher log-density -3.3 / -7.8 against -3.0;
measured on the mixture backbone; with per-step fakes they are refused, since the snapshots are of one fake).
"""

import ast
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import secrets
import shutil
import sys
import textwrap
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

MODELS = ('toy2d', 'sd3-medium', 'sd3.5-medium', 'sd3.5-large', 'sdxl')  # toy2d/, and the presets of t2i/
GROUP_SOURCES = ("levels", "snapshots", "both")
FAKE_TRACKS = ("mixture", "final", "per-step")


@dataclass
class Args:
    # ---- world ----
    model: Literal["toy2d", "sd3-medium", "sd3.5-medium", "sd3.5-large", "sdxl"] = "toy2d"
    """world to distil: toy2d (2-D Gaussian mixture, CPU), or text-to-image sd3-medium, sd3.5-medium, sd3.5-large, sdxl"""
    model_path: Optional[str] = None
    """local copy of the model weights (text-to-image worlds; default: the preset's hub repository)"""
    prompts: Optional[str] = None
    """text-to-image: training prompts, one per line (default: t2i/prompts/train.txt, a small smoke-test set)"""
    eval_prompts: Optional[str] = None
    """text-to-image: held-out evaluation prompts (default: t2i/prompts/eval.txt)"""
    resolution: Optional[int] = None
    """text-to-image: image size in pixels (default: the preset's, sd3 512, sdxl 1024)"""
    t2i_reward: Optional[str] = None
    """text-to-image reward, name[:weight[:cap]],...: clip, pickscore, aesthetic, hpsv2, imagereward (gdmd: scored on the DMD targets)"""
    reward_checkpoints: Optional[str] = None
    """text-to-image: local reward weights, name=PATH,... (e.g. clip=/models/clip-vit-large-patch14)"""
    lora_rank: Optional[int] = None
    """text-to-image: generator LoRA rank"""
    lora_alpha: Optional[float] = None
    """text-to-image: generator LoRA alpha (scale alpha / rank)"""
    fake_lora_rank: Optional[int] = None
    """text-to-image: fake-score LoRA rank"""
    fake_lora_alpha: Optional[float] = None
    """text-to-image: fake-score LoRA alpha"""
    toy_mixture: Literal["ring8", "grid25", "line3"] = "ring8"
    """toy teacher: ring8 (8 equal modes), grid25 (5x5, unequal weights), line3"""
    toy_spread: Optional[float] = None
    """toy mode standard deviation (None: the mixture's default)"""
    toy_path: Literal["flow", "vp"] = "flow"
    """toy noising path: flow (SD3-like, velocity) or vp (SDXL-like, eps)"""
    toy_classes: int = 0
    """toy class labels (mode k has label k % toy_classes); 0: unconditional"""
    toy_reward: Literal["linear", "quadratic", "radius"] = "linear"
    """toy reward, optimised by GDMD: linear, quadratic, radius"""
    toy_reward_angle: float = 0.0
    """toy linear reward's direction in degrees from the x axis: r = cos(a) x_1 + sin(a) x_2"""
    toy_reward_target: tuple[float, float] = (2.0, 0.0)
    """toy quadratic reward's target point c: r = -|x - c|^2 / 2"""
    # ---- student and DMD ----
    student_steps: int = 4
    """K, the number of student sampling steps (pre-shift levels 1, 1 - 1/K, ..., 1/K)"""
    num_steps: Optional[int] = None
    """generator updates in all, cold start included (toy2d: 1500)"""
    cold_start_steps: Optional[int] = None
    """plain-DMD generator updates before GDMD starts (default: half of num_steps, 750 on the toy; 0 with --init-checkpoint)"""
    batch_size: Optional[int] = None
    """samples per generator update, per GPU under torchrun (toy2d: 256; SD3 presets: 8; sdxl: 4)"""
    lr_generator: Optional[float] = None
    """generator adapter learning rate (toy2d: 1e-3)"""
    lr_fake: Optional[float] = None
    """fake-score adapter learning rate (toy2d: 1e-3)"""
    weight_decay_generator: float = 0.01
    """AdamW weight decay of the generator adapter"""
    fake_updates_per_step: int = 5
    """TTUR: fake-score updates per generator update (DMD2: 5 for SDXL)"""
    fake_tracks: Optional[Literal["mixture", "final", "per-step"]] = None
    """what the fake score tracks (dmd.py --fake-tracks): per-step (K fakes, fake k on step k's outputs: dmd.py's
    measured best), mixture (DMD2: a random step's outputs; the gradient of the K steps' mixture KL), final (the last
    step's outputs; DMD and GDMD on the last step only) (toy2d: per-step; text-to-image: final, as dmd.py's presets)"""
    guidance_scale: Optional[float] = None
    """classifier-free guidance of the real score (toy2d: 1.0, it needs --toy-classes; sd3-medium: 7; sd3.5: 4.5; sdxl: 8)"""
    renoise_min: float = 0.02
    """lowest pre-shift time t of the DMD renoise, t ~ U[renoise_min, renoise_max]"""
    renoise_max: float = 0.98
    """highest pre-shift time t of the DMD renoise"""
    grad_clip: float = 1.0
    """gradient-norm clipping of both adapters (0: off)"""
    ema_decay: float = 0.0
    """generator EMA: ema <- decay * ema + (1 - decay) * weights every ema_every updates, used for evaluation and saved as
    checkpoint/generator/ (the trained weights in checkpoint/raw/); 0: off"""
    ema_every: int = 1
    """generator updates between EMA updates"""
    micro_batch_size: Optional[int] = None
    """split every forward / backward of a batch into chunks of this many samples whose gradients accumulate into one
    optimiser step (the same update as the whole batch); None: the whole batch at once"""
    gradient_checkpointing: bool = True
    """text-to-image: recompute the network's blocks (and the reward decode) in backward, to save memory;
    --no-gradient-checkpointing keeps the activations (~17% less time per step, measured on CPU)"""
    # ---- GDMD ----
    group_size: int = 4
    """n, the number of DMD targets x_hat_j = sg(x - g_j) scored per generator output"""
    group_source: Literal["levels", "snapshots", "both"] = "levels"
    """where the n targets differ: levels (renoise levels), snapshots (fake-score snapshots), both"""
    lambda_gdmd: Optional[float] = None
    """weight of the NFT-style reward loss (toy2d: 0.2); 0 gives group-averaged DMD"""
    adv_clip: float = 5.0
    """A_max: advantages are clipped to [-A_max, A_max] (DiffusionNFT: 5)"""
    snapshot_every: int = 10
    """generator updates between fake-adapter snapshots (group sources snapshots, both)"""
    naive_fusion: bool = False
    """baseline: score the raw sample x (normalised over the batch) instead of the targets"""
    init_checkpoint: Optional[str] = None
    """start from this checkpoint directory (the generator and every fake of a dmd.py / gdmd.py run's checkpoint/, run
    with the same --fake-tracks)"""
    # ---- run ----
    seed: int = 0
    """random seed (adapter init, noise, renoise levels)"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    output_dir: str = "runs"
    """parent directory of run directories"""
    run_name: Optional[str] = None
    """run directory name (default gdmd__<model>__<seed>__<time>); an existing directory is never overwritten"""
    log_every: int = 25
    """steps between metrics.jsonl loss records"""
    eval_every: int = 250
    """steps between evaluations (and checkpoints)"""
    eval_samples: Optional[int] = None
    """samples per evaluation (toy2d: 4000; text-to-image: 16, one per evaluation prompt)"""
    progress: bool = True
    """show a tqdm progress bar"""
    resume: Optional[str] = None
    """continue the run in this directory from its last complete checkpoint, with its own config (and --num-steps, if
    given, to extend it): adapters, optimisers, schedulers, EMA, step and RNG states are restored, so the result is the
    uninterrupted run's"""


MODEL_DEFAULTS = {
    "toy2d": dict(eval_samples=4000, 
        num_steps=1500, batch_size=256, fake_tracks="per-step", lr_generator=1e-3, lr_fake=1e-3, guidance_scale=1.0,
        lambda_gdmd=0.2,
    ),
    # text-to-image: GDMD has no public recipe. The DMD backbone uses DMDR's SD3-M numbers (lr 1e-6 / 5e-7, real CFG 7,
    # SD3.5: 4.5, LoRA r64 alpha128 / r32 alpha32) and DMD2's for SDXL (CFG 8, LoRA lr 5e-5); ours: the step counts,
    # lambda_gdmd (the toy's 0.2), PickScore as the reward scored on the targets, and fake_tracks final (dmd.py's
    # text-to-image choice: one fake LoRA; per-step is the toy's measured best at K x the fake cost).
    **{name: dict(num_steps=4000, batch_size=8, fake_tracks="final", lr_generator=1e-6, lr_fake=5e-7,
                  guidance_scale=7.0 if name == "sd3-medium" else 4.5, lambda_gdmd=0.2, eval_samples=16,
                  t2i_reward="pickscore", lora_rank=64, lora_alpha=128, fake_lora_rank=32, fake_lora_alpha=32)
       for name in ("sd3-medium", "sd3.5-medium", "sd3.5-large")},
    "sdxl": dict(num_steps=4000, batch_size=4, fake_tracks="final", lr_generator=5e-5, lr_fake=5e-5, guidance_scale=8.0,
                 lambda_gdmd=0.2, eval_samples=16, t2i_reward="pickscore", lora_rank=64, lora_alpha=64, fake_lora_rank=64,
                 fake_lora_alpha=64),
}


# =====================================================================================================
#                                          the algorithm
# =====================================================================================================


# Copied from dmd.py: student_sigmas
def student_sigmas(world, student_steps):
    """The student's K noise levels: pre-shift times 1, 1 - 1/K, ..., 1/K through the world's shift."""
    return [float(world.sigma(torch.tensor(1.0 - k / student_steps))) for k in range(student_steps)]


# Copied from dmd.py: sample_student
def sample_student(world, cond, sigmas, noise, generator=None, stop=None, every_step=False, noises=None):
    """K-step student sampling (DMD2's multi-step sampler): x0 = G(x, sigma_k), then renoise x0 to sigma_{k+1}
    with fresh noise (noises[k] when given: pre-drawn (n, ...) tensors, so that a micro-batched update draws exactly what
    the whole batch would). Returns the final x0; with stop=k, the state x at level sigma_k instead (backward
    simulation input); with every_step, the list of all K steps' x0 outputs (the last one is the final sample)."""
    x = noise
    outputs = []
    for k, sigma in enumerate(sigmas):
        if k == stop:
            return x
        x0 = world.x0("generator", x, sigma, cond)
        outputs.append(x0)
        if k + 1 < len(sigmas):
            if noises is not None:
                eps = noises[k]
            else:
                where = generator.device if generator is not None else x0.device  # a CPU generator with a CUDA world
                eps = torch.randn(x0.shape, generator=generator, device=where, dtype=x0.dtype).to(x0.device)
            x = world.renoise(x0, sigmas[k + 1], eps)
    return outputs if every_step else x0


# Copied from dmd.py: generator_sample
def generator_sample(world, cond, sigmas, noise, step=None, noises=None):
    """Backward simulation: at student step k (step=None: a random one, DMD2), run the steps before it without grad,
    and return the generator's x0 at step k WITH grad (the only step that is trained on this batch) and k."""
    k = int(torch.randint(len(sigmas), (1,))) if step is None else step
    with torch.no_grad():
        x_k = sample_student(world, cond, sigmas, noise, stop=k, noises=noises)
    return world.x0("generator", x_k, sigmas[k], cond), k


# Copied from dmd.py: micro_batches
def micro_batches(n, size):
    """Slices that split a batch of n into chunks of at most `size` (None: one chunk). A loss that is a mean over the
    batch becomes the sum over chunks of chunk mean * chunk / n, so accumulated gradients equal the whole batch's."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# Copied from dmd.py: fake_roles
def fake_roles(fake_tracks, student_steps):
    """The world roles of the fake scores: one ("fake") for mixture and final, or one per student step for per-step
    (step 0 uses "fake", step k >= 1 "fake{k}"; the world builds them with n_fakes = K)."""
    if fake_tracks == "per-step":
        return ["fake"] + [f"fake{k}" for k in range(1, student_steps)]
    return ["fake"]


# Copied from dmd.py: trained_step
def trained_step(fake_tracks, sigmas):
    """The student step a generator update trains: the last for final, else None (a random one, DMD2)."""
    return len(sigmas) - 1 if fake_tracks == "final" else None


# Copied from dmd.py: fake_role
def fake_role(fake_tracks, k):
    """The fake score that scores the outputs of student step k."""
    return ("fake" if k == 0 else f"fake{k}") if fake_tracks == "per-step" else "fake"


# Copied from dmd.py: dmd_grad
def dmd_grad(x, x0_real, x0_fake):
    """The DMD2-normalised distribution-matching step for generator outputs x (n, ...):
    (p_real - p_fake) / mean|p_real| per sample, p = x - x0. It is proportional, per sample, to the gradient of
    KL(p_student,sigma || p_teacher,sigma): s_fake - s_real = alpha (x0_fake - x0_real) / sigma^2."""
    p_real = x - x0_real
    p_fake = x - x0_fake
    norm = p_real.abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)  # (n, 1, ...) per-sample scale
    return (p_real - p_fake) / norm


# Copied from dmd.py: dmd_loss
def dmd_loss(x, grad):
    """0.5 * mse(x, sg(x - grad)): its gradient w.r.t. x is grad / numel, whatever produced grad."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())


# Copied from dmd.py: fake_score_loss
def fake_score_loss(world, x0, cond, t, adapter_scale=1.0, role="fake", eps=None):
    """The plain diffusion loss of the fake score on (detached) samples x0 at pre-shift times t (n,): renoise (with eps,
    or fresh noise), predict, weight the x0 error into the model's native loss (flow: velocity, 1/sigma^2; VP: eps,
    alpha^2/sigma^2)."""
    sigma = world.sigma(t)
    x_t = world.renoise(x0, sigma, torch.randn_like(x0) if eps is None else eps)
    x0_fake = world.x0(role, x_t, sigma, cond, adapter_scale=adapter_scale)
    per_sample = ((x0_fake - x0) ** 2).flatten(1).mean(1)
    return (world.loss_weight(sigma) * per_sample).mean()


# Copied from dmd.py: dmd_generator_loss
def dmd_generator_loss(world, x0, cond, t, guidance_scale, fake="fake", eps=None):
    """DMD loss of generator outputs x0 renoised at pre-shift times t (n,) (with eps, or fresh noise): real score with
    CFG, fake score (the role `fake`, the one that tracks x0's step) at scale 1."""
    with torch.no_grad():
        sigma = world.sigma(t)
        x_t = world.renoise(x0, sigma, torch.randn_like(x0) if eps is None else eps)
        x0_real = world.x0("teacher", x_t, sigma, cond, cfg=guidance_scale)
        x0_fake = world.x0(fake, x_t, sigma, cond)
        grad = dmd_grad(x0, x0_real, x0_fake)
    return dmd_loss(x0, grad)


class FakeSnapshots:
    """Ring buffer of recent fake-adapter states (clones of world.params("fake")), newest first, at most `size`.
    Snapshot 0 is always the live fake adapter; snapshot i >= 1 is the i-th most recent clone (cycled while filling)."""

    def __init__(self, size):
        self.size = size
        self.states = []  # newest first: list of lists of tensors, aligned with world.params("fake")

    @torch.no_grad()
    def push(self, world):
        if self.size > 0:
            self.states.insert(0, [p.detach().clone() for p in world.params("fake")])
            del self.states[self.size:]

    def swapped_in(self, world, i):
        """Within the block the live fake adapter holds snapshot i's values (i = 0: unchanged); restored afterwards."""
        if i == 0 or not self.states:
            return contextlib.nullcontext()
        return swapped_params(world.params("fake"), self.states[(i - 1) % len(self.states)])


def group_layout(source, n):
    """Which renoise level and which fake snapshot each of the n targets uses (eq. 2): (levels (n,), snapshots (n,))
    and the number of distinct levels. levels: n levels, live fake; snapshots: 1 level, n fakes; both: level j, fake j."""
    if source == "levels":
        return list(range(n)), [0] * n, n
    if source == "snapshots":
        return [0] * n, list(range(n)), 1
    if source == "both":
        return list(range(n)), list(range(n)), n
    raise ValueError(f"unknown group source {source!r}; valid sources: {', '.join(GROUP_SOURCES)}")


@torch.no_grad()
def dmd_target_group(world, x0, cond, t, guidance_scale, levels, fakes, snapshots=None, live_fake="fake", level_eps=None):
    """Eq. (2): the DMD steps g (B, n, ...) of generator outputs x0 (B, ...) for a target group. t (B, L) holds the
    pre-shift renoise times of the L distinct levels; target j renoises at level levels[j] (own noise per level,
    drawn in level order, as dmd_generator_loss draws it) and uses fake snapshot fakes[j] (0: the live fake, the role
    live_fake that tracks x0's student step; snapshots are of "fake", so they need --fake-tracks mixture or final).
    level_eps: the L levels' renoise noises (each like x0), pre-drawn by a micro-batched caller. The targets are
    x0 - g[:, j]."""
    n_levels = t.shape[1]
    noisy, real = [], []
    for l in range(n_levels):  # the teacher (the costly CFG call on t2i) once per distinct level
        sigma = world.sigma(t[:, l])
        x_t = world.renoise(x0, sigma, torch.randn_like(x0) if level_eps is None else level_eps[l])
        noisy.append((x_t, sigma))
        real.append(world.x0("teacher", x_t, sigma, cond, cfg=guidance_scale))
    steps = []
    for level, fake in zip(levels, fakes, strict=True):
        x_t, sigma = noisy[level]
        if fake == 0 or snapshots is None:
            x0_fake = world.x0(live_fake, x_t, sigma, cond)
        else:
            with snapshots.swapped_in(world, fake):
                x0_fake = world.x0("fake", x_t, sigma, cond)
        steps.append(dmd_grad(x0, real[level], x0_fake))
    return torch.stack(steps, 1)  # (B, n, ...)


def group_advantages(rewards, adv_clip, eps=1e-4):
    """Eq. (3): advantages over the last dim (the group): (r - mean) / (population std + eps), exactly 0 for a group
    whose rewards are all equal (no NaN, no rounding noise), clipped to [-adv_clip, adv_clip]."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False)
    equal = rewards.amax(-1, keepdim=True) == rewards.amin(-1, keepdim=True)
    adv = torch.where(equal, torch.zeros_like(centred), centred / (std + eps))
    return adv.clamp(-adv_clip, adv_clip)


def nft_loss(x, x_old, x_hat, advantages, adv_clip, beta=1.0):
    """Eq. (4b): DiffusionNFT's loss in x0 form. x (B, ...) the policy's output (with grad), x_old (B, ...) the old
    policy's (detached), x_hat (B, n, ...) the clean targets, advantages (B, n). Positive policy x+ = beta x +
    (1 - beta) x_old, implicit negative x- = (1 + beta) x_old - beta x; each squared error divided by its detached
    mean absolute error (DiffusionNFT's adaptive weight). At x = x_old its gradient is sum_j c A_j g_j, eq. (5)."""
    rho = (advantages.clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)  # (B, n) in [0, 1]
    x, x_old = x.unsqueeze(1), x_old.detach().unsqueeze(1)  # (B, 1, ...)
    dims = tuple(range(2, x_hat.dim()))
    x_pos = beta * x + (1 - beta) * x_old
    x_neg = (1 + beta) * x_old - beta * x
    w_pos = (x_pos - x_hat).abs().mean(dims).clamp(min=1e-5).detach()  # (B, n)
    w_neg = (x_neg - x_hat).abs().mean(dims).clamp(min=1e-5).detach()
    pos = ((x_pos - x_hat) ** 2).mean(dims) / w_pos
    neg = ((x_neg - x_hat) ** 2).mean(dims) / w_neg
    return ((rho * pos + (1 - rho) * neg) / beta * adv_clip).mean()


def combined_advantages(terms, adv_clip, groups):
    """Eq. (3) for several rewards: each reward term is normalised over its group first (so that the widest reward does
    not dominate the sum), the weighted sum is normalised again. terms: {name: (weight, rewards (B n,))}; groups: how
    the flat rewards fold into groups, (B, n) for GDMD's targets or (1, B) for naive fusion's batch. Returns (B, n)."""
    if len(terms) == 1:  # one reward: exactly group_advantages of it (weights and offsets cancel)
        (_, r), = terms.values()
        return group_advantages(r.view(groups), adv_clip)
    total = sum(w * group_advantages(r.view(groups), float("inf")) for w, r in terms.values())
    return group_advantages(total, adv_clip)


def gdmd_generator_loss(world, x0, cond, t, guidance_scale, lambda_gdmd, adv_clip, source="levels", group_size=4,
                        snapshots=None, naive_fusion=False, fake="fake", level_eps=None, sample_advantages=None):
    """Eq. (4a): plain DMD over the target group + lambda_gdmd * NFT loss with advantages from the targets' rewards
    (or, naive_fusion, from the raw samples' rewards normalised over the batch: sample_advantages (B,) when the caller
    computed them over a batch larger than x0's micro-batch). x0 (B, ...) generator outputs with grad, t (B, L) renoise
    times (L = group_size, or 1 for snapshots). Returns (loss, stats dict of floats); the stats hold rl_dmd_cosine, the
    cosine between the RL term's and the DMD term's gradients w.r.t. the generator outputs x0 (the divergence
    diagnostic of the paper's fig. 4a, measured on the outputs, where eq. (5) lives), and the sums it is made of."""
    levels, fakes, _ = group_layout(source, group_size)
    g = dmd_target_group(world, x0.detach(), cond, t, guidance_scale, levels, fakes, snapshots, fake, level_eps)  # (B, n, ...)
    x_hat = (x0.detach().unsqueeze(1) - g)  # (B, n, ...) the targets sg(x - g_j)
    with torch.no_grad():
        if naive_fusion:  # the raw sample's reward, the batch as the group, shared by the sample's n targets
            terms = world.reward_terms(x0.detach(), cond)  # {name: (weight, (B,))}
            if sample_advantages is None:
                sample_advantages = combined_advantages(terms, adv_clip, (1, -1))[0]
            adv = sample_advantages[:, None].expand(-1, group_size)
        else:
            flat = x_hat.flatten(0, 1)  # (B n, ...)
            terms = world.reward_terms(flat, cond.repeat_interleave(group_size, 0))
            adv = combined_advantages(terms, adv_clip, (-1, group_size))  # (B, n)
        r = sum(w * v for w, v in terms.values())  # the combined reward, for the log
    distill = sum(dmd_loss(x0, g[:, j]) for j in range(group_size)) / group_size
    rl = nft_loss(x0, x0.detach(), x_hat, adv, adv_clip)
    grad_dmd, = torch.autograd.grad(distill, x0, retain_graph=True)  # d / d x0 only: cheap, the generator is not entered
    grad_rl, = torch.autograd.grad(rl, x0, retain_graph=True)
    dot, sq_dmd, sq_rl = (grad_dmd * grad_rl).sum().item(), grad_dmd.square().sum().item(), grad_rl.square().sum().item()
    stats = {
        "dmd_loss": distill.item(), "nft_loss": rl.item(), "target_reward": r.mean().item(),
        "adv_abs": adv.abs().mean().item(), "step_size": g.abs().flatten(2).mean(2).mean().item(),
        "rl_dmd_cosine": dot / max(math.sqrt(sq_dmd * sq_rl), 1e-30), "grad_dot": dot, "grad_sq_dmd": sq_dmd,
        "grad_sq_rl": sq_rl,
    }
    return distill + lambda_gdmd * rl, stats


# Copied from dmd.py: fake_score_updates
def fake_score_updates(world, args, sigmas, opt_fakes):
    """TTUR: `fake_updates_per_step` rounds of fake-score updates on detached generator samples. What the fake score
    tracks (--fake-tracks): mixture (DMD2), the outputs of one random step per round; final, the last step's outputs;
    per-step, one chain per round whose step-k outputs update fake k. Each round's randomness is drawn for the whole
    batch first, then the batch runs in micro-batches whose gradients accumulate (the same update as one pass).
    Returns the mean loss (float)."""
    n = args.batch_size
    losses = []
    for _ in range(args.fake_updates_per_step):
        cond = world.sample_cond(n)
        noise = world.noise(cond)
        if args.fake_tracks == "per-step":  # one chain: step k's outputs train fake k
            steps = list(range(len(sigmas)))
            noises = [torch.randn_like(noise) for _ in steps[:-1]]
        else:  # one step's outputs: a random step's (mixture) or the last step's (final)
            k = trained_step(args.fake_tracks, sigmas)
            k = int(torch.randint(len(sigmas), (1,))) if k is None else k
            steps, noises = [k], [torch.randn_like(noise) for _ in range(k)]
        draws = [(torch.rand(n, device=noise.device).clamp(min=1e-3), torch.randn_like(noise)) for _ in steps]  # t ~ U(0, 1]
        roles = [fake_role(args.fake_tracks, k) for k in steps]
        for role in roles:
            opt_fakes[role].zero_grad(set_to_none=True)
        round_losses = [0.0] * len(steps)
        for c in micro_batches(n, args.micro_batch_size):
            with torch.no_grad():
                if len(steps) > 1:
                    outputs = sample_student(world, cond[c], sigmas, noise[c], every_step=True, noises=[e[c] for e in noises])
                else:
                    outputs = {steps[0]: generator_sample(world, cond[c], sigmas, noise[c], steps[0], [e[c] for e in noises])[0]}
            for i, (k, role, (t, eps)) in enumerate(zip(steps, roles, draws)):
                loss = fake_score_loss(world, outputs[k], cond[c], t[c], role=role, eps=eps[c]) * ((c.stop - c.start) / n)
                check_finite(loss, "fake_score_loss")
                loss.backward()
                round_losses[i] += loss.item()
        for role in roles:
            sync_and_clip(world.params(role), args.grad_clip)
            opt_fakes[role].step()
        losses += round_losses
    return sum(losses) / len(losses)


def train_step(world, args, sigmas, opt_generator, opt_fakes, snapshots, gdmd_on):
    """One iteration: TTUR fake-score updates, then one generator update at a backward-simulated step k (final: the
    last), plain DMD (cold start) or GDMD, scored with the fake that tracks step k. The batch's randomness is drawn
    first, then the update runs in micro-batches whose gradients accumulate (naive fusion first scores the whole batch's
    raw samples without grad: its advantages are normalised over the batch). Returns losses (floats); raises
    FloatingPointError on a non-finite loss before the generator is touched."""
    n = args.batch_size
    fake_loss = fake_score_updates(world, args, sigmas, opt_fakes)
    cond = world.sample_cond(n)
    noise = world.noise(cond)
    k = trained_step(args.fake_tracks, sigmas)
    k = int(torch.randint(len(sigmas), (1,))) if k is None else k
    noises = [torch.randn_like(noise) for _ in range(k)]  # the renoise draws of the steps before k
    fake = fake_role(args.fake_tracks, k)
    n_levels = group_layout(args.group_source, args.group_size)[2] if gdmd_on else 1
    t = args.renoise_min + (args.renoise_max - args.renoise_min) * torch.rand(n, n_levels, device=noise.device)
    level_eps = [torch.randn_like(noise) for _ in range(n_levels)]
    chunks = micro_batches(n, args.micro_batch_size)
    sample_advantages = None
    if gdmd_on and args.naive_fusion and len(chunks) > 1:
        with torch.no_grad():
            raw = torch.cat([generator_sample(world, cond[c], sigmas, noise[c], k, [e[c] for e in noises])[0] for c in chunks])
            sample_advantages = combined_advantages(world.reward_terms(raw, cond), args.adv_clip, (1, -1))[0]
    opt_generator.zero_grad(set_to_none=True)
    stats = {}
    for c in chunks:
        x0, _ = generator_sample(world, cond[c], sigmas, noise[c], k, [e[c] for e in noises])
        share = (c.stop - c.start) / n
        if gdmd_on:
            loss, chunk_stats = gdmd_generator_loss(
                world, x0, cond[c], t[c], args.guidance_scale, args.lambda_gdmd, args.adv_clip, args.group_source,
                args.group_size, snapshots, args.naive_fusion, fake, [e[c] for e in level_eps],
                None if sample_advantages is None else sample_advantages[c],
            )
        else:
            loss = dmd_generator_loss(world, x0, cond[c], t[c, 0], args.guidance_scale, fake, level_eps[0][c])
            chunk_stats = {"dmd_loss": loss.item()}
        check_finite(loss, "gdmd_loss" if gdmd_on else "dmd_loss")
        (loss * share).backward()
        for key, value in chunk_stats.items():  # batch means of the chunk means; the batch's gradient sums (d / d x0 of
            # the batch mean is share x the chunk mean's)
            stats[key] = stats.get(key, 0.0) + value * (share**2 if key.startswith("grad_") else share)
    if gdmd_on:  # the batch's cosine, from its sums (the chunks' x0 gradients are blocks of the batch's)
        stats["rl_dmd_cosine"] = stats.pop("grad_dot") / max(math.sqrt(stats.pop("grad_sq_dmd") * stats.pop("grad_sq_rl")), 1e-30)
    grad_norm = sync_and_clip(world.params("generator"), args.grad_clip)
    opt_generator.step()
    return {**stats, "fake_loss": fake_loss, "student_step": k, "grad_norm": grad_norm}


# =====================================================================================================
#                                           plumbing
# =====================================================================================================


# Copied from dmd.py: check_finite
def check_finite(loss, name):
    """Raise FloatingPointError on a non-finite loss. Under torchrun every rank makes the same checks in the same order,
    and a tiny all-reduce makes all of them stop together (a rank left waiting in the next all-reduce would hang until
    the NCCL timeout)."""
    bad = not bool(torch.isfinite(loss))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        flag = torch.tensor([float(bad)], device=loss.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            where = f"on rank {torch.distributed.get_rank()}" if bad else "on another rank"
            raise FloatingPointError(f"{name} is {loss.item() if bad else 'non-finite'} {where}")
    elif bad:
        raise FloatingPointError(f"{name} is {loss.item()}")


# Copied from dmd.py: sync_and_clip
def sync_and_clip(params, max_norm):
    """Average the gradients over the data-parallel ranks (torchrun; a no-op in one process), then clip their norm
    (0: off) and return it (before clipping). Every rank then takes the same optimiser step: the adapters stay
    identical on every rank."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce for the whole adapter
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        for p, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = chunk.view_as(p).clone()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm)  # the norm before clipping (metrics.jsonl's grad_norm)


# Copied from dmd.py: setup_distributed
def setup_distributed(args):
    """torchrun --nproc_per_node N: data parallel, one process per GPU (NCCL; gloo on CPUs). Returns (rank, world_size,
    device). Without torchrun: (0, 1, --device). Each rank draws its own noise, prompts and levels (batch_size is per
    rank); sync_and_clip averages the adapter gradients; rank 0 alone evaluates, logs and saves."""
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
    return rank, world_size, f"cuda:{local_rank}" if cuda else "cpu"


# Copied from dmd.py: resolve_defaults
def resolve_defaults(args):
    """Fill the model-dependent defaults (None fields) from MODEL_DEFAULTS."""
    for key, value in MODEL_DEFAULTS.get(args.model, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def derive_cold_start(args):
    """cold_start_steps defaults to half of num_steps (0 from an --init-checkpoint), so --num-steps alone is consistent."""
    if args.cold_start_steps is None and args.num_steps is not None:
        args.cold_start_steps = 0 if args.init_checkpoint is not None else args.num_steps // 2
    return args


def validate(args):
    """Every check that can fail before any work starts."""
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
    if args.model == "toy2d":
        import toy2d

        if args.toy_mixture not in toy2d.MIXTURES:
            raise ValueError(f"unknown toy mixture {args.toy_mixture!r}; valid mixtures: {', '.join(toy2d.MIXTURES)}")
        if args.toy_path not in toy2d.PATHS:
            raise ValueError(f"unknown toy path {args.toy_path!r}; valid paths: {', '.join(toy2d.PATHS)}")
        if args.toy_reward not in toy2d.REWARDS:
            raise ValueError(f"unknown toy reward {args.toy_reward!r}; valid rewards: {', '.join(toy2d.REWARDS)}")
    else:
        validate_t2i(args)
    if not 1 <= args.student_steps <= 8:
        raise ValueError(f"student_steps must be in 1..8, got {args.student_steps}")
    check_world_options(args)
    check_device(args.device)
    for name in ("num_steps", "batch_size", "fake_updates_per_step", "log_every", "eval_every", "eval_samples",
                 "snapshot_every", "ema_every", "micro_batch_size"):
        if getattr(args, name) is None:
            continue
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)}")
    cold = derive_cold_start(dataclasses.replace(args)).cold_start_steps
    if not 0 <= cold <= args.num_steps:
        raise ValueError(f"cold_start_steps must be in 0..num_steps ({args.num_steps}), got {cold}")
    for name in ("lr_generator", "lr_fake"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(args, name)}")
    if args.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {args.guidance_scale}")
    if not 0.0 <= args.renoise_min < args.renoise_max <= 1.0:
        raise ValueError(f"need 0 <= renoise_min < renoise_max <= 1, got {args.renoise_min}, {args.renoise_max}")
    if args.grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0, got {args.grad_clip}")
    if args.group_size < 1:
        raise ValueError(f"group_size (n, targets per generator output) must be >= 1, got {args.group_size}")
    if args.group_source not in GROUP_SOURCES:
        raise ValueError(f"unknown group source {args.group_source!r}; valid sources: {', '.join(GROUP_SOURCES)}")
    if args.fake_tracks not in FAKE_TRACKS:
        raise ValueError(f"unknown fake_tracks {args.fake_tracks!r}; valid: {', '.join(FAKE_TRACKS)}")
    if args.fake_tracks == "per-step" and args.group_source != "levels" and args.student_steps > 1:
        raise ValueError("--group-source snapshots / both snapshot the one fake: use --fake-tracks final or mixture")
    if not (args.lambda_gdmd >= 0 and math.isfinite(args.lambda_gdmd)):
        raise ValueError(f"lambda_gdmd must be a finite number >= 0, got {args.lambda_gdmd}")
    if not args.adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0, got {args.adv_clip}")
    if args.weight_decay_generator < 0:
        raise ValueError(f"weight_decay_generator must be >= 0, got {args.weight_decay_generator}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.resume is not None and args.init_checkpoint is not None:
        raise ValueError("--resume continues a run from its own checkpoint: it takes no --init-checkpoint")
    if args.init_checkpoint is not None:
        for role in ("generator", *fake_roles(args.fake_tracks, args.student_steps)):
            ckpt = Path(args.init_checkpoint)
            if not ((ckpt / f"{role}.pt").exists() or (ckpt / role).is_dir()):  # toy: <role>.pt; text-to-image: <role>/ LoRA
                raise FileNotFoundError(f"--init-checkpoint {args.init_checkpoint} has no {role}.pt or {role}/")


# Copied from dmd.py: check_world_options
def check_world_options(args):
    """Options of one world are refused on the other, instead of being silently ignored."""
    toy_options = {"toy_mixture": "ring8", "toy_spread": None, "toy_path": "flow", "toy_classes": 0,
                   "toy_reward": "linear", "toy_reward_angle": 0.0, "toy_reward_target": (2.0, 0.0)}
    t2i_options = ("model_path", "prompts", "eval_prompts", "resolution", "t2i_reward", "reward_checkpoints",
                   "lora_rank", "lora_alpha", "fake_lora_rank", "fake_lora_alpha")
    if args.model == "toy2d":
        given = [name for name in t2i_options if getattr(args, name, None) is not None]
        given += [] if getattr(args, "gradient_checkpointing", True) else ["no_gradient_checkpointing"]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a text-to-image option: the toy world has no use for it")
        if args.toy_classes == 0 and getattr(args, "guidance_scale", 1.0) not in (None, 1.0):
            raise ValueError(f"guidance_scale {args.guidance_scale} does nothing on the unconditional toy (it has no "
                             "condition to guide toward): pass --toy-classes N too, or leave it at 1")
    else:
        given = [name for name, default in toy_options.items()
                 if (tuple(v) if isinstance(v := getattr(args, name, default), list) else v) != default]  # json: lists
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a toy option: --model {args.model} has no use for it")


# Copied from dmd.py: check_device
def check_device(device):
    """--device: cpu, cuda, cuda:N, or auto; a device this torch cannot use is an error before any work."""
    if device in ("auto", "cpu"):
        return
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"unknown device {device!r}; valid devices: auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"--device {device}: {why} (use --device cpu or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")


# Copied from dmd.py: validate_t2i
def validate_t2i(args):
    """The text-to-image options, checked without loading anything (t2i's presets and reward specs are plain data)."""
    import t2i
    from t2i.rewards import check_checkpoints, check_packages, parse_checkpoints, parse_spec

    t2i.get_preset(args.model)
    for name in ("prompts", "eval_prompts"):
        if getattr(args, name) is not None and not Path(getattr(args, name)).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {getattr(args, name)} does not exist")
    if args.model_path is not None and not Path(args.model_path).is_dir():
        raise FileNotFoundError(f"--model-path {args.model_path} is not a directory (a diffusers-format model folder)")
    for name in ("t2i_reward", "lora_rank", "lora_alpha", "fake_lora_rank", "fake_lora_alpha"):
        if getattr(args, name) is None:
            raise ValueError(f"{name} has no default for model {args.model}: pass --{name.replace('_', '-')}")
    check_packages(parse_spec(args.t2i_reward))  # hpsv2 / image-reward missing: say so before loading anything
    check_checkpoints(parse_checkpoints(args.reward_checkpoints))  # a missing local path: say so before any model loads
    for name in ("lora_rank", "lora_alpha", "fake_lora_rank", "fake_lora_alpha"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(args, name)}")
    if args.resolution is not None and args.resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {args.resolution}")


# Copied from dmd.py: make_world
def make_world(args, device, n_fakes=1):
    """The world named by --model: the toy, or a text-to-image preset (imported only then: the toy path stays light),
    with n_fakes fake-score adapters (fake, fake1, ...: one per student step for --fake-tracks per-step)."""
    if args.model == "toy2d":
        import toy2d

        torch.set_num_threads(1)  # 2-D toy tensors: thread hand-offs cost more than they save (13x on 2 busy cores)
        return toy2d.ToyWorld(
            mixture=args.toy_mixture, spread=args.toy_spread, path=args.toy_path, n_classes=args.toy_classes,
            reward=args.toy_reward, reward_angle=args.toy_reward_angle, reward_target=tuple(args.toy_reward_target),
            n_fakes=n_fakes, seed=args.seed, device=device,
        )
    if args.model in MODELS:
        import t2i
        from t2i.rewards import parse_checkpoints

        return t2i.T2IWorld(
            args.model, model_path=args.model_path, prompts=args.prompts, eval_prompts=args.eval_prompts,
            resolution=args.resolution, reward=args.t2i_reward, reward_checkpoints=parse_checkpoints(args.reward_checkpoints),
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, fake_lora_rank=args.fake_lora_rank,
            fake_lora_alpha=args.fake_lora_alpha, n_fakes=n_fakes, seed=args.seed, device=device,
            gradient_checkpointing=args.gradient_checkpointing, decode_chunk=args.micro_batch_size,
        )
    raise ValueError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")


# Copied from dmd.py: run_dir_path
def run_dir_path(args, method):
    """The run directory, checked before any work (collision, a parent that cannot be written) and created only once
    the world is built. The default name is unique even for two runs started in the same second."""
    name = args.run_name or f"{method}__{args.model}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_dir = Path(args.output_dir) / name
    if run_dir.exists():
        raise FileExistsError(f"run directory {run_dir} exists; it is never overwritten (choose another --run-name)")
    parent = Path(args.output_dir)
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--output-dir {args.output_dir}: {parent} is not writable")
    return run_dir


# Copied from dmd.py: rng_state
def rng_state():
    """Every random state a run draws from: torch's CPU generator, every CUDA device's, Python's random."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


# Copied from dmd.py: gathered_rng_states
def gathered_rng_states():
    """[rank 0's rng_state(), rank 1's, ...] on every rank (a collective under torchrun: every rank calls it). Each rank
    draws its own noise, so a checkpoint keeps every rank's stream, not rank 0's alone."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [rng_state()]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states


# Copied from dmd.py: set_rng_state
def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


# Copied from dmd.py: save_checkpoint
def save_checkpoint(world, run_dir, step, training_state=None, ema=None):
    """Write every adapter (generator, fake scores) and the training state (optimisers, schedulers, stage counters, RNG
    states: what --resume needs) to checkpoint/ atomically. With a generator EMA (ema: its values, aligned with
    world.params("generator")), generator/ holds the EMA weights (what evaluation and a stock pipeline use) and
    raw/generator/ the trained ones. state.json is written last: a checkpoint directory without it is incomplete."""
    tmp, final, old = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    for role in world.adapter_roles:
        if role == "generator" and ema is not None:
            world.save(role, tmp / "raw")
            with swapped_params(world.params("generator"), ema):
                world.save(role, tmp)
        else:
            world.save(role, tmp)
    if training_state is not None:
        torch.save({**training_state, "ema": ema}, tmp / "training_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# Copied from dmd.py: find_checkpoint
def find_checkpoint(run_dir):
    """The last complete checkpoint of a run, in every crash window of save_checkpoint: checkpoint/, else a complete
    checkpoint.tmp/ (a crash between the two renames: it is the newer one), else checkpoint.old/. None if there is none."""
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        if (Path(run_dir) / name / "state.json").exists():
            return Path(run_dir) / name
    return None


# Copied from dmd.py: read_run
def read_run(args, method):
    """--resume RUN_DIR: (that run's own Args from its config.json, pointing back at its own directory; its last
    complete checkpoint). resume_args then applies what the command line may extend."""
    run_dir = Path(args.resume)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"--resume {run_dir}: no config.json there (not a {method} run directory)")
    config = json.loads(config_path.read_text())
    if config.pop("method", method) != method:
        raise ValueError(f"--resume {run_dir} is not a {method} run")
    ckpt = find_checkpoint(run_dir)
    if ckpt is None or not (ckpt / "training_state.pt").exists():
        raise FileNotFoundError(f"--resume {run_dir}: no complete checkpoint with a training state")
    known = {f.name for f in dataclasses.fields(args)}
    resumed = type(args)(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in known})
    resumed.resume, resumed.progress = str(run_dir), args.progress
    resumed.run_name, resumed.output_dir = run_dir.name, str(run_dir.parent)
    return resumed, ckpt


# Copied from dmd.py: resume_args
def resume_args(args, method):
    """--resume RUN_DIR: that run's own config (the run continues in its own directory), with --num-steps raised if
    given. Returns (args, checkpoint directory)."""
    resumed, ckpt = read_run(args, method)
    if args.num_steps is not None and args.num_steps != resumed.num_steps:
        schedule = getattr(resumed, "lr_schedule", "constant")
        if schedule != "constant":
            raise ValueError(f"--resume {args.resume} --num-steps {args.num_steps}: its {schedule} lr schedule is "
                             f"fixed by num_steps ({resumed.num_steps}); only a constant-lr run can be extended")
        if args.num_steps < resumed.num_steps:
            raise ValueError(f"--num-steps {args.num_steps} is below the run's {resumed.num_steps}: a run is only extended")
        resumed.num_steps = args.num_steps
    return resumed, ckpt


# Copied from dmd.py: load_training_state
def load_training_state(world, ckpt, optimizers, schedulers):
    """Restore adapters, optimiser and scheduler states and this rank's RNG states from a checkpoint; returns the
    training state (its "step", "ema" and the method's own counters)."""
    state = torch.load(ckpt / "training_state.pt", map_location=world.device, weights_only=False)  # our own file
    for role in world.adapter_roles:
        world.load(role, ckpt / "raw" if role == "generator" and state["ema"] is not None else ckpt)
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    for name, sched in schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if len(state["rng"]) != world_size:
        raise ValueError(f"{ckpt} was saved by {len(state['rng'])} process(es), and this run has {world_size}: resume "
                         f"it with as many (torchrun --nproc-per-node {len(state['rng'])}), so every rank's noise "
                         f"continues")
    set_rng_state(state["rng"][rank])
    return state


# Copied from dmd.py: read_history
def read_history(run_dir, step):
    """metrics.jsonl's records up to `step` (a resumed run rewrites what came after its checkpoint, so no record is
    duplicated)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    kept = [r for r in records if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


# Copied from dmd.py: ema_update
@torch.no_grad()
def ema_update(ema, params, decay):
    """Generator EMA: ema <- decay * ema + (1 - decay) * params, tensor by tensor (the fp32 adapter weights)."""
    for e, p in zip(ema, params, strict=True):
        e.lerp_(p.detach(), 1.0 - decay)


# Copied from dmd.py: swapped_params
@contextlib.contextmanager
def swapped_params(params, values):
    """Temporarily copy `values` into `params` (no grad), restoring the originals on exit: evaluates a frozen
    snapshot of an adapter (an EMA, a reference policy) through the world's own role, on any world."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)


# Copied from dmd.py: evaluate
@torch.no_grad()
def evaluate(world, sigmas, n, seed):
    """Student samples from fixed noise (same seed every time, so curves compare) and the world's metrics of the final
    samples (and, K > 1, of every step's x0 output and of their mixture: world.evaluate's steps)."""
    gen = torch.Generator().manual_seed(seed)
    cond = world.sample_cond(n, gen)
    noise = world.noise(cond, gen)
    outputs = sample_student(world, cond, sigmas, noise, generator=gen, every_step=True)
    return outputs[-1], cond, world.evaluate(outputs[-1], cond, steps=outputs if len(outputs) > 1 else None)


# Copied from dmd.py: provenance
def provenance(device):
    """What config.json records beside the options: the git commit, the package versions, the resolved device."""
    import importlib.metadata as md
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {}
    for package in ("torch", "diffusers", "transformers", "peft"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {"git_commit": commit, "versions": versions, "device": str(device)}


def main(args, world=None):
    """Run the method (or, --resume, continue a run). world: an already built world (tests, notebooks)."""
    ckpt = None
    if args.resume is not None:
        args, ckpt = resume_args(args, "gdmd")
    args = derive_cold_start(resolve_defaults(args))
    validate(args)
    rank, world_size, device = setup_distributed(args)
    lead = rank == 0  # data parallel: rank 0 alone evaluates, logs and saves
    run_dir = (Path(args.resume) if ckpt else run_dir_path(args, "gdmd")) if lead else None  # checked before any work
    torch.manual_seed(args.seed)
    roles = fake_roles(args.fake_tracks, args.student_steps)
    world = world if world is not None else make_world(args, device, n_fakes=len(roles))
    if world_size > 1:
        torch.manual_seed(args.seed + 1000 * rank)  # data parallel: each rank its own noise, prompts and levels
    if args.init_checkpoint is not None:
        for role in ("generator", *roles):
            world.load(role, args.init_checkpoint)
    sigmas = student_sigmas(world, args.student_steps)
    opt_generator = torch.optim.AdamW(world.params("generator"), args.lr_generator, weight_decay=args.weight_decay_generator)
    opt_fakes = {role: torch.optim.AdamW(world.params(role), args.lr_fake, weight_decay=0.0) for role in roles}
    optimizers = {"generator": opt_generator, **opt_fakes}
    use_snapshots = args.group_source != "levels" and args.group_size > 1
    snapshots = FakeSnapshots(args.group_size - 1 if use_snapshots else 0)
    ema = [p.detach().clone() for p in world.params("generator")] if args.ema_decay > 0 else None
    first_step, history = 1, []
    if ckpt is not None:  # every rank restores the same adapters, optimiser states and fake snapshots
        state = load_training_state(world, ckpt, optimizers, {})
        ema, first_step, snapshots.states = state["ema"], state["step"] + 1, state["snapshots"]
        history = read_history(run_dir, state["step"]) if lead else []
    if lead:  # a resumed run rewrites its config with the extended num_steps
        run_dir.mkdir(parents=True, exist_ok=ckpt is not None)
        (run_dir / "config.json").write_text(json.dumps({"method": "gdmd", **asdict(args), "provenance": provenance(device)},
                                                        indent=2))
        print(f"gdmd: {'resuming' if ckpt else 'run'} {run_dir} (from step {first_step})", file=sys.stderr)
    log = open(run_dir / "metrics.jsonl", "a") if lead else open(os.devnull, "w")

    def record(entry):
        history.append(entry)
        log.write(json.dumps(entry) + "\n")
        log.flush()

    def training_state(step, rng_states):
        return {"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "schedulers": {},
                "rng": rng_states, "snapshots": snapshots.states}

    def evaluation():
        with swapped_params(world.params("generator"), ema) if ema is not None else contextlib.nullcontext():
            return evaluate(world, sigmas, args.eval_samples, args.seed + 1)

    if ckpt is None:
        rng_states = gathered_rng_states()  # every rank's (a collective)
        if lead:
            _, _, metrics = evaluation()
            record({"step": 0, **metrics})
            save_checkpoint(world, run_dir, 0, training_state(0, rng_states), ema)
    start, shown, samples = time.time(), {}, None
    bar = tqdm(range(first_step, args.num_steps + 1), desc="gdmd", disable=not (args.progress and lead),
               dynamic_ncols=True, initial=first_step - 1, total=args.num_steps)
    for step in bar:
        gdmd_on = step > args.cold_start_steps
        if step == args.cold_start_steps + 1:
            fusion = "naive fusion (raw-sample reward)" if args.naive_fusion else f"{args.group_source} targets"
            tqdm.write(f"gdmd: step {step}: cold start done, GDMD on ({fusion}, n={args.group_size}, "
                       f"lambda={args.lambda_gdmd})")
        try:
            losses = train_step(world, args, sigmas, opt_generator, opt_fakes, snapshots, gdmd_on)
        except FloatingPointError as err:
            log.close()
            where = run_dir / "checkpoint" if lead else "rank 0's run directory"
            raise FloatingPointError(f"{err} at step {step}; stopped. The last good checkpoint is {where}") from None
        if ema is not None and step % args.ema_every == 0:
            ema_update(ema, world.params("generator"), args.ema_decay)
        if use_snapshots and step % args.snapshot_every == 0:
            snapshots.push(world)
        if step % args.log_every == 0:
            record({"step": step, "time": time.time() - start, "gdmd": int(gdmd_on), "stage": 2 if gdmd_on else 1,
                    "lr": opt_generator.param_groups[0]["lr"], **losses})
            bar.set_postfix(dmd=f"{losses['dmd_loss']:.2e}", fake=f"{losses['fake_loss']:.3f}", **shown)
        if step % args.eval_every == 0 or step == args.num_steps:
            rng_states = gathered_rng_states()  # every rank's (a collective); evaluation draws from its own generator
            if lead:
                samples, cond, metrics = evaluation()
                record({"step": step, "time": time.time() - start, **metrics})
                shown = {"reward": f"{metrics['mean_reward']:.3f}",
                         **({"ed": f"{metrics['energy_distance']:.4f}"} if "energy_distance" in metrics else {})}
                bar.set_postfix(dmd=f"{losses['dmd_loss']:.2e}", **shown)
                save_checkpoint(world, run_dir, step, training_state(step, rng_states), ema)
    log.close()
    if not lead:  # data parallel: the other ranks stop here; rank 0 writes the figures
        return {"run_dir": None, "history": history, "final": history[-1] if history else {}, "world": world}

    if samples is None:  # a resumed run that had nothing left to do
        samples, _, _ = evaluation()
    name = "naive fusion" if args.naive_fusion else "gdmd"
    world.plot_samples(samples, run_dir / "samples.png",
                       f"{name}, {args.student_steps}-step student, step {args.num_steps} (GDMD from {args.cold_start_steps})")
    world.plot_curves(history, ["dmd_loss", "nft_loss", "target_reward", "adv_abs", "rl_dmd_cosine", "fake_loss",
                                "energy_distance", "mean_reward", "teacher_logp"], run_dir / "curves.png", name)
    final = {k: v for k, v in history[-1].items()}
    print(f"gdmd: done in {time.time() - start:.1f} s -> {run_dir}")
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return {"run_dir": run_dir, "history": history, "final": final, "world": world}


# Copied from dmd.py: sectioned_args
def sectioned_args(args_class):
    """args_class as --help shows it: one group of options per `# ---- title ----` section of its body, each field's
    docstring as its help, flags unprefixed (--num-steps, not --student-and-training.num-steps). A None default that
    a preset fills is shown as the preset's (the help names each preset's value)."""
    source = textwrap.dedent(inspect.getsource(args_class))
    lines, body = source.splitlines(), ast.parse(source).body[0].body
    hints = typing.get_type_hints(args_class, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(args_class)}
    groups, title, seen = {}, "options", 0
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign):
            continue
        for line in lines[seen : node.lineno - 1]:  # a section comment since the previous field
            if line.strip().startswith("# ----"):
                title = line.strip().strip("#- ").strip()
        seen = node.end_lineno
        after = body[i + 1] if i + 1 < len(body) else None
        doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
        f = fields[node.target.id]
        hint = None  # tyro's "(default: X)"; None defaults that a preset fills say so; a help naming its default, nothing
        if f.default is None and ("toy2d:" in doc or "preset" in doc or doc.startswith("text-to-image")):
            hint = "" if "default" in doc else "(default: the preset's)"
        annotated = Annotated[hints[f.name], tyro.conf.arg(help=" ".join(doc.split()), help_behavior_hint=hint)]
        spec = (dataclasses.field(default=f.default) if f.default_factory is dataclasses.MISSING
                else dataclasses.field(default_factory=f.default_factory))
        groups.setdefault(title, []).append((f.name, annotated, spec))
    outer = []
    for title, group in groups.items():
        name = re.sub(r"[^0-9A-Za-z]+", "_", title).strip("_")  # an identifier; tyro shows it with "-" for "_"
        section = dataclasses.make_dataclass(name, group)
        section.__doc__ = ""
        outer.append((name, Annotated[section, tyro.conf.OmitArgPrefixes], dataclasses.field(default_factory=section)))
    return dataclasses.make_dataclass(args_class.__name__, outer)


# Copied from dmd.py: parse_args
def parse_args(args_class, argv=None):
    """args_class from the command line (argv: sys.argv[1:]), parsed as its sectioned_args, flattened back."""
    description = sys.modules[args_class.__module__].__doc__.split("\n")[0]
    parsed = tyro.cli(sectioned_args(args_class), args=argv, description=description)
    return args_class(**{k: v for group in dataclasses.fields(parsed) for k, v in vars(getattr(parsed, group.name)).items()})


# Copied from dmd.py: cli
def cli(main, args_class):
    """The command line: a validation error (bad input, caught before any work) prints `error: <message>` on one line
    and exits 2; any other failure keeps its traceback. --help lists the options by section (sectioned_args)."""
    args = parse_args(args_class)
    method = Path(sys.argv[0]).stem
    try:
        checked = dataclasses.replace(args)  # resolve_defaults fills in place: check a copy, run the original
        if checked.resume is not None:
            checked, _ = resume_args(checked, method)
        validate(resolve_defaults(checked))
        if checked.resume is None and int(os.environ.get("RANK", "0")) == 0:
            run_dir_path(checked, method)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    main(args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # join the backend's threads before exit (gloo may abort otherwise)


if __name__ == "__main__":
    cli(main, Args)
