"""DMD: DMD2-style distribution matching distillation of a diffusion teacher into a K-step student.

    python dmd.py                                  # toy world: 8-mode ring, 1-step student, ~1 min on 2 CPU cores
    python dmd.py --student-steps 4 --batch-size 256                        # a 4-step student (K fakes, one per step)
    python dmd.py --student-steps 4 --batch-size 256 --fake-tracks mixture  # DMD2's estimator, for comparison
    python dmd.py --student-steps 4 --batch-size 256 --fake-tracks final --fake-ema 0.99   # Flash-DMD's fake EMA
    python dmd.py --renoise-min 0.5                # Flash-DMD's distribution matching at high noise only
    python dmd.py --model sd3-medium               # SD3-Medium, 4-step LoRA student (GPU; hub weights, or --model-path DIR)
    python dmd.py --model sdxl                     # SDXL, a 4-step LoRA student (our preset, see MODEL_DEFAULTS)
    torchrun --nproc_per_node 8 dmd.py --model sdxl  # data parallel on 8 GPUs (--batch-size is per GPU)
    python dmd.py --help                           # every option, with its default

A run writes runs/dmd__<model>__<seed>__<time>/: config.json, metrics.jsonl (losses, evaluation metrics),
checkpoint/ (the latest good generator and fake adapters), samples.png and curves.png. On a text-to-image model the
adapters are diffusers LoRAs: checkpoint/generator/ loads into a stock pipeline with load_lora_weights (README).

The algorithm (Yin et al. 2024, "Improved Distribution Matching Distillation", DMD2, WITHOUT its GAN term: DMDR drops
it on purpose, and we have no real data):
    generator G_theta = teacher + trainable adapter; a K-step student sampled by "backward simulation":
        x <- noise; for k: x0_k = G(x, sigma_k); x <- renoise(x0_k, sigma_{k+1}, fresh noise)
    real score  = frozen teacher with classifier-free guidance (x0-prediction x0_real)
    fake score  = teacher + a second adapter, trained with the plain diffusion loss on detached generator samples,
                  so that it tracks the distribution q of the outputs it scores
    DMD gradient of KL(q_sigma || p_teacher,sigma) w.r.t. a generator output x (renoised to sigma):
        grad = (p_real - p_fake) / mean|p_real|,  p_real = x - x0_real, p_fake = x - x0_fake        (DMD2 normalisation)
        loss = 0.5 * mse(x, (x - grad).detach())           so that d loss / d x = grad / numel
    TTUR: the fake score takes `fake_updates_per_step` updates per generator update.
What the fake score tracks, for K > 1 (--fake-tracks). The step above is the gradient of KL(q || p) only when the fake
is the score of q, the distribution of the step being scored:
    mixture   DMD2's recipe: each fake update trains on a random step's outputs and the generator is trained at a random
              step with that one fake. The fake then tracks the MIXTURE of the K steps' outputs, and the update is the
              gradient of KL(mixture || p): it vanishes once the mixture matches, whatever each step does alone, and
              the later steps learn to compensate for the earlier ones (measured below).
    final     one fake on the last step's outputs; the generator is trained at the last step only (the DMDR authors'
              SD3 scripts also train the fake on final samples). The earlier steps are never trained directly: they
              move only as far as the shared adapter carries them from the last step.
    per-step  K fakes ("fake", "fake1", ...), each round one chain whose step-k outputs update fake k; the generator is
              trained at a random step k with fake k, so every step's KL is minimised. Cost: K fake adapters with their
              optimiser state (SD3-Medium, fake LoRA r32 on the attention projections: 18.8M parameters, ~0.3 GB in
              fp32 with gradients and Adam, per extra fake) and K fake updates per round instead of one.
    With K = 1 the three are the same estimator.
Flash-DMD options (its supplement, Alg. 1): an EMA of the generator into the fake after each generator update
(`--fake-ema`: on LoRA the EMA of the weight deltas B A, refitted to the fake's rank; on the toy's MLPs weight by
weight, from a shared initialisation; its value is ours, the supplement gives none) and distribution matching at high
noise only (`--renoise-min`). Absent here: Flash-DMD's pixel-space GAN, its latent reward model, its stage-2 preference
RL (DPO on high-noise candidates) and real data.

Measured on the toy (`python dmd.py`: ring8, 1-step student, 1500 updates of 512, cosine lr; ~60 s of CPU):
at step 0 the student maps all noise to the mixture mean (energy distance 1.44 to the teacher); after training, seeds
0 / 1 / 2: 0.0085 / 0.0062 / 0.0066 (noise floor 0.0013), 8 of 8 modes, worst mode-mass error 0.15 / 0.08 / 0.11,
7-9% of samples on thin arcs between modes (a 1-step map from a Gaussian cannot cut its mass cleanly), and modes up to
43-46% too wide (mode_width_max 1.44 / 1.46 / 1.43: the arcs' ends widen them).
A 4-step student (`--student-steps 4 --batch-size 256`, 1500 updates, seeds 0 / 1 / 2; every 4-step student starts as
the teacher's own 4-step sampler, energy distance 0.028):
    per-step  0.0024 / 0.0033 / 0.0032, steps 0-2 at 0.006-0.010, every mode's width within 0.91-1.08 of the
              teacher's (the sampling band of 4000 samples is +-10%);
    final     0.0032 / 0.0025 / FINAL2, but modes 7-26% too wide (widths 1.07-1.26) and steps 0 / 1 barely trained
              (0.68-0.73 / 0.29, from 1.44 / 0.58);
    mixture   0.034 (seed 0): no better than where it started, while the mixture of its steps improves 0.33 -> 0.024:
              step 0 stays at 1.13 and the later steps compensate for it.
On 500 updates (tests/test_fake_tracking.py): per-step 0.0021 / 0.0058 / 0.0112, mixture 0.036 / 0.072 / 0.038.
Flash-DMD's fake EMA (600 updates, seed 0): with a 4-step student and the final fake, --fake-ema 0.99 reaches 0.0031
against 0.0066 without it (0.9: 0.021); with the 1-step student it hurts (0.99: 0.10, 0.9: 0.98 against 0.045), since
the generator's adapter is trained at sigma = 1 only and the EMA pulls the fake's other levels toward untrained outputs.
Text-to-image defaults to final (MODEL_DEFAULTS): what is known is the toy's result above and the cost; what is not is
whether the wider modes and the untrained early steps show on images, or whether per-step's K x fake compute pays there.

Conventions: sigma in [0, 1], sigma = 1 is pure noise. Flow worlds (toy flow, SD3): x = (1 - sigma) x0 + sigma eps.
VP worlds (toy vp, SDXL): x = alpha x0 + sigma eps. A pre-shift time t in [0, 1] maps to sigma = world.sigma(t)
(SD3's shift). The algorithm below sees only x0-predictions and world.renoise, so it is identical on every world.
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

LR_SCHEDULES = ("constant", "cosine")
FAKE_TRACKS = ("mixture", "final", "per-step")
MODELS = ("toy2d", "sd3-medium", "sd3.5-medium", "sd3.5-large", "sdxl")  # toy2d/, and the presets of t2i/


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
    """text-to-image reward, name[:weight[:cap]],...: clip, pickscore, aesthetic, hpsv2, imagereward (dmd: clip, a metric)"""
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
    """toy reward, reported as a metric: linear, quadratic, radius"""
    toy_reward_angle: float = 0.0
    """toy linear reward's direction in degrees from the x axis: r = cos(a) x_1 + sin(a) x_2"""
    toy_reward_target: tuple[float, float] = (2.0, 0.0)
    """toy quadratic reward's target point c: r = -|x - c|^2 / 2"""
    # ---- student and training ----
    student_steps: Optional[int] = None
    """K, the number of student sampling steps (pre-shift levels 1, 1 - 1/K, ..., 1/K) (toy2d: 1; text-to-image: 4)"""
    num_steps: Optional[int] = None
    """generator updates (toy2d: 1500; text-to-image: 4000)"""
    batch_size: Optional[int] = None
    """samples per generator update, per GPU under torchrun (toy2d: 512; SD3 presets: 8; sdxl: 4)"""
    lr_generator: Optional[float] = None
    """generator adapter learning rate (toy2d: 1e-3)"""
    lr_fake: Optional[float] = None
    """fake-score adapter learning rate (toy2d: 1e-3)"""
    lr_schedule: Optional[Literal["constant", "cosine"]] = None
    """learning-rate schedule of both adapters: constant, or cosine (decay to 0 over num_steps) (toy2d: cosine)"""
    weight_decay_generator: float = 0.01
    """AdamW weight decay of the generator adapter"""
    fake_updates_per_step: int = 5
    """TTUR: fake-score updates per generator update (DMD2: 5 for SDXL)"""
    fake_tracks: Optional[Literal["mixture", "final", "per-step"]] = None
    """what the fake score tracks when K > 1: mixture (DMD2: one fake on a random step's outputs, so the update is the
    gradient of the K steps' mixture KL), final (one fake on the last step's outputs, DMD on the last step only),
    per-step (K fakes, fake k on step k's outputs, DMD at a random step k with fake k) (toy2d: per-step; text-to-image: final)"""
    guidance_scale: Optional[float] = None
    """classifier-free guidance of the real score (toy2d: 1.0, it needs --toy-classes; sd3-medium: 7; sd3.5: 4.5; sdxl: 8)"""
    renoise_min: float = 0.02
    """lowest pre-shift time t of the DMD renoise, t ~ U[renoise_min, renoise_max] (Flash-DMD high noise: 0.5)"""
    renoise_max: float = 0.98
    """highest pre-shift time t of the DMD renoise"""
    fake_ema: float = 0.0
    """Flash-DMD: after each generator update, fake <- ema * fake + (1 - ema) * generator (LoRA: the weight deltas B A);
    0: off. The value is ours (the supplement gives none); on the toy 0.99 helps a 4-step student and hurts a 1-step one"""
    grad_clip: float = 1.0
    """gradient-norm clipping of both adapters (0: off)"""
    ema_decay: float = 0.0
    """generator EMA: ema <- decay * ema + (1 - decay) * weights every ema_every updates, used for evaluation and saved as
    checkpoint/generator/ (the trained weights in checkpoint/raw/); 0: off (DMDR: "EMA is not useful", recipes.md s.2)"""
    ema_every: int = 1
    """generator updates between EMA updates"""
    micro_batch_size: Optional[int] = None
    """split every forward / backward of a batch into chunks of this many samples whose gradients accumulate into one
    optimiser step (the same update as the whole batch); None: the whole batch at once"""
    gradient_checkpointing: bool = True
    """text-to-image: recompute the network's blocks (and the reward decode) in backward, to save memory;
    --no-gradient-checkpointing keeps the activations (~17% less time per step, measured on CPU)"""
    # ---- run ----
    seed: int = 0
    """random seed (adapter init, noise, renoise levels)"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    output_dir: str = "runs"
    """parent directory of run directories"""
    run_name: Optional[str] = None
    """run directory name (default dmd__<model>__<seed>__<time>); an existing directory is never overwritten"""
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


MODEL_DEFAULTS = {  # every Args field that defaults to None gets its value here, per model
    # toy2d: a 1-step student, the real distillation problem (at step 0 it collapses every sample onto the mixture mean),
    # and a cosine lr decay, so the generator settles instead of oscillating around the teacher at a constant rate.
    # fake_tracks per-step: measured best for K > 1 (docstring); with the default K = 1 all three choices coincide.
    "toy2d": dict(student_steps=1, num_steps=1500, batch_size=512, lr_generator=1e-3, lr_fake=1e-3, lr_schedule="cosine",
                  guidance_scale=1.0, eval_samples=4000, fake_tracks="per-step"),
    # text-to-image (notes/recipes.md section 1): a 4-step student at pre-shift levels [1, .75, .5, .25].
    # SD3: DMDR's SD3-M cold-start settings without its additions (real CFG 7, lr 1e-6 / 5e-7, generator LoRA r64
    # alpha128, fake r32 alpha32; SD3.5: CFG 4.5 as RTDMD's SD3.5-M). fake_tracks final: the fake trains on final
    # samples as in the DMDR authors' SD3 scripts (their ODE backward simulation), at one LoRA and ~1/2 of per-step's fake
    # compute; per-step is measured better on the toy and untested on images. Ours: num_steps, batch size 8 per GPU.
    **{name: dict(student_steps=4, num_steps=4000, batch_size=8, lr_generator=1e-6, lr_fake=5e-7, lr_schedule="constant",
                  guidance_scale=7.0 if name == "sd3-medium" else 4.5, eval_samples=16, t2i_reward="clip", lora_rank=64,
                  lora_alpha=128, fake_lora_rank=32, fake_lora_alpha=32, fake_tracks="final")
       for name in ("sd3-medium", "sd3.5-medium", "sd3.5-large")},
    # SDXL: OUR 4-step LoRA preset, not DMD2's recipe. DMD2's SDXL LoRA also targets the FF, proj and conv layers, adds
    # a GAN on real latents and clips gradients at 10; we keep its real CFG 8 and lr 5e-5 (constant) only. Ours: LoRA r64
    # alpha64 for both roles on the attention projections, batch size 4 per GPU at 1024 px, num_steps, fake_tracks.
    "sdxl": dict(student_steps=4, num_steps=4000, batch_size=4, lr_generator=5e-5, lr_fake=5e-5, lr_schedule="constant",
                 guidance_scale=8.0, eval_samples=16, t2i_reward="clip", lora_rank=64, lora_alpha=64, fake_lora_rank=64,
                 fake_lora_alpha=64, fake_tracks="final"),
}


# =====================================================================================================
#                                          the algorithm
# =====================================================================================================


def student_sigmas(world, student_steps):
    """The student's K noise levels: pre-shift times 1, 1 - 1/K, ..., 1/K through the world's shift."""
    return [float(world.sigma(torch.tensor(1.0 - k / student_steps))) for k in range(student_steps)]


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


def generator_sample(world, cond, sigmas, noise, step=None, noises=None):
    """Backward simulation: at student step k (step=None: a random one, DMD2), run the steps before it without grad,
    and return the generator's x0 at step k WITH grad (the only step that is trained on this batch) and k."""
    k = int(torch.randint(len(sigmas), (1,))) if step is None else step
    with torch.no_grad():
        x_k = sample_student(world, cond, sigmas, noise, stop=k, noises=noises)
    return world.x0("generator", x_k, sigmas[k], cond), k


def micro_batches(n, size):
    """Slices that split a batch of n into chunks of at most `size` (None: one chunk). A loss that is a mean over the
    batch becomes the sum over chunks of chunk mean * chunk / n, so accumulated gradients equal the whole batch's."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def fake_roles(fake_tracks, student_steps):
    """The world roles of the fake scores: one ("fake") for mixture and final, or one per student step for per-step
    (step 0 uses "fake", step k >= 1 "fake{k}"; the world builds them with n_fakes = K)."""
    if fake_tracks == "per-step":
        return ["fake"] + [f"fake{k}" for k in range(1, student_steps)]
    return ["fake"]


def trained_step(fake_tracks, sigmas):
    """The student step a generator update trains: the last for final, else None (a random one, DMD2)."""
    return len(sigmas) - 1 if fake_tracks == "final" else None


def fake_role(fake_tracks, k):
    """The fake score that scores the outputs of student step k."""
    return ("fake" if k == 0 else f"fake{k}") if fake_tracks == "per-step" else "fake"


def dmd_grad(x, x0_real, x0_fake):
    """The DMD2-normalised distribution-matching step for generator outputs x (n, ...):
    (p_real - p_fake) / mean|p_real| per sample, p = x - x0. It is proportional, per sample, to the gradient of
    KL(p_student,sigma || p_teacher,sigma): s_fake - s_real = alpha (x0_fake - x0_real) / sigma^2."""
    p_real = x - x0_real
    p_fake = x - x0_fake
    norm = p_real.abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)  # (n, 1, ...) per-sample scale
    return (p_real - p_fake) / norm


def dmd_loss(x, grad):
    """0.5 * mse(x, sg(x - grad)): its gradient w.r.t. x is grad / numel, whatever produced grad."""
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def fake_score_loss(world, x0, cond, t, adapter_scale=1.0, role="fake", eps=None):
    """The plain diffusion loss of the fake score on (detached) samples x0 at pre-shift times t (n,): renoise (with eps,
    or fresh noise), predict, weight the x0 error into the model's native loss (flow: velocity, 1/sigma^2; VP: eps,
    alpha^2/sigma^2)."""
    sigma = world.sigma(t)
    x_t = world.renoise(x0, sigma, torch.randn_like(x0) if eps is None else eps)
    x0_fake = world.x0(role, x_t, sigma, cond, adapter_scale=adapter_scale)
    per_sample = ((x0_fake - x0) ** 2).flatten(1).mean(1)
    return (world.loss_weight(sigma) * per_sample).mean()


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


@torch.no_grad()
def ema_into_fake(world, decay):
    """Flash-DMD (Alg. 1 line 18): fake <- decay * fake + (1 - decay) * generator, after each generator update.
    LoRA (text-to-image): the EMA of the weight deltas, W_fake <- decay W_fake + (1 - decay) W_gen with W = scaling B A,
    refitted to the fake's rank as the best rank-r approximation of the blend (exact when it has rank <= r); averaging A
    and B separately is not an average of B A. Toy MLP adapters: weight by weight, which is an EMA of the same network
    because both adapters start from the same weights (share_adapter_init)."""
    factors = world.lora_factors("fake"), world.lora_factors("generator")
    if factors[0] is None:
        for p_fake, p_gen in zip(world.params("fake"), world.params("generator"), strict=True):
            p_fake.lerp_(p_gen, 1.0 - decay)
        return
    for (a_f, b_f, s_f), (a_g, b_g, s_g) in zip(*factors, strict=True):
        # blend = [B_f  B_g] [[decay s_f A_f], [(1 - decay) s_g A_g]]: (out, 2r) @ (2r, in), an SVD through two QRs
        q_left, r_left = torch.linalg.qr(torch.cat([b_f, b_g], 1))  # (out, 2r), (2r, 2r)
        q_right, r_right = torch.linalg.qr(torch.cat([decay * s_f * a_f, (1 - decay) * s_g * a_g], 0).T)  # (in, 2r)
        u, sv, vh = torch.linalg.svd(r_left @ r_right.T)  # the blend = (q_left u) diag(sv) (q_right vh^T)^T
        r = a_f.shape[0]
        root = sv[:r].sqrt()
        b_f.copy_((q_left @ u[:, :r]) * root)  # (out, r)
        a_f.copy_((root[:, None] * (vh[:r] @ q_right.T)) / s_f)  # (r, in)


@torch.no_grad()
def share_adapter_init(world):
    """Flash-DMD initialises the fake score and the generator from the same weights (Alg. 1 lines 1-2). LoRA already
    does in weight space (B = 0: both deltas are 0, and ema_into_fake works on the deltas); the toy's MLP adapters are
    averaged weight by weight, so the fake's starts as a copy of the generator's."""
    if world.lora_factors("fake") is None:
        for p_fake, p_gen in zip(world.params("fake"), world.params("generator"), strict=True):
            p_fake.copy_(p_gen)


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


def generator_update(world, args, sigmas, opt_generator):
    """One DMD generator update at a backward-simulated step k (final: always the last), scored with the fake that
    tracks step k, micro-batched like the fake updates. Returns (dmd loss, k, gradient norm before clipping)."""
    n = args.batch_size
    cond = world.sample_cond(n)
    noise = world.noise(cond)
    k = trained_step(args.fake_tracks, sigmas)
    k = int(torch.randint(len(sigmas), (1,))) if k is None else k
    noises = [torch.randn_like(noise) for _ in range(k)]  # the renoise draws of the steps before k
    t = args.renoise_min + (args.renoise_max - args.renoise_min) * torch.rand(n, device=noise.device)
    eps = torch.randn_like(noise)
    opt_generator.zero_grad(set_to_none=True)
    total = 0.0
    for c in micro_batches(n, args.micro_batch_size):
        x0, _ = generator_sample(world, cond[c], sigmas, noise[c], k, [e[c] for e in noises])
        loss = dmd_generator_loss(world, x0, cond[c], t[c], args.guidance_scale, fake_role(args.fake_tracks, k), eps[c])
        loss = loss * ((c.stop - c.start) / n)
        check_finite(loss, "dmd_loss")
        loss.backward()
        total += loss.item()
    grad_norm = sync_and_clip(world.params("generator"), args.grad_clip)
    opt_generator.step()
    return total, k, grad_norm


def train_step(world, args, sigmas, opt_generator, opt_fakes):
    """One DMD2 iteration: TTUR fake-score updates, then one generator update (and Flash-DMD's fake EMA). Returns the
    losses (floats); raises FloatingPointError on a non-finite loss before that update's parameters are touched."""
    fake_loss = fake_score_updates(world, args, sigmas, opt_fakes)
    dmd_loss_value, k, grad_norm = generator_update(world, args, sigmas, opt_generator)
    if args.fake_ema > 0:
        ema_into_fake(world, args.fake_ema)
    return {"dmd_loss": dmd_loss_value, "fake_loss": fake_loss, "student_step": k, "grad_norm": grad_norm}


# =====================================================================================================
#                                           plumbing
# =====================================================================================================


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


def resolve_defaults(args):
    """Fill the model-dependent defaults (None fields) from MODEL_DEFAULTS."""
    for key, value in MODEL_DEFAULTS.get(args.model, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
    for name in ("student_steps", "num_steps", "batch_size", "lr_generator", "lr_fake", "lr_schedule", "guidance_scale",
                 "eval_samples", "fake_tracks"):
        if getattr(args, name) is None:
            raise ValueError(f"{name} has no default for model {args.model}: pass --{name.replace('_', '-')}")
    if not 1 <= args.student_steps <= 8:
        raise ValueError(f"student_steps must be in 1..8, got {args.student_steps}")
    check_world_options(args)
    check_device(args.device)
    for name in ("num_steps", "batch_size", "fake_updates_per_step", "log_every", "eval_every", "eval_samples",
                 "ema_every", "micro_batch_size"):
        if getattr(args, name) is None:
            continue
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("lr_generator", "lr_fake"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(args, name)}")
    if args.fake_tracks not in FAKE_TRACKS:
        raise ValueError(f"unknown fake_tracks {args.fake_tracks!r}; valid: {', '.join(FAKE_TRACKS)}")
    if args.fake_ema > 0 and args.fake_tracks == "per-step" and args.student_steps > 1:
        raise ValueError("--fake-ema mixes the one generator adapter into one fake: use --fake-tracks final or mixture")
    if args.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {args.lr_schedule!r}; valid schedules: {', '.join(LR_SCHEDULES)}")
    if args.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {args.guidance_scale}")
    if not 0.0 <= args.renoise_min < args.renoise_max <= 1.0:
        raise ValueError(f"need 0 <= renoise_min < renoise_max <= 1, got {args.renoise_min}, {args.renoise_max}")
    if not 0.0 <= args.fake_ema < 1.0:
        raise ValueError(f"fake_ema must be in [0, 1), got {args.fake_ema}")
    if args.grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0, got {args.grad_clip}")
    if args.weight_decay_generator < 0:
        raise ValueError(f"weight_decay_generator must be >= 0, got {args.weight_decay_generator}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {args.ema_decay}")


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


def make_lr_schedule(optimizer, kind, num_steps):
    """constant, or cosine from the initial rate to 0 over num_steps updates (stepped once per generator update)."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


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


def rng_state():
    """Every random state a run draws from: torch's CPU generator, every CUDA device's, Python's random."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def gathered_rng_states():
    """[rank 0's rng_state(), rank 1's, ...] on every rank (a collective under torchrun: every rank calls it). Each rank
    draws its own noise, so a checkpoint keeps every rank's stream, not rank 0's alone."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [rng_state()]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


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


def find_checkpoint(run_dir):
    """The last complete checkpoint of a run, in every crash window of save_checkpoint: checkpoint/, else a complete
    checkpoint.tmp/ (a crash between the two renames: it is the newer one), else checkpoint.old/. None if there is none."""
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        if (Path(run_dir) / name / "state.json").exists():
            return Path(run_dir) / name
    return None


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


def read_history(run_dir, step):
    """metrics.jsonl's records up to `step` (a resumed run rewrites what came after its checkpoint, so no record is
    duplicated)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    kept = [r for r in records if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


@torch.no_grad()
def ema_update(ema, params, decay):
    """Generator EMA: ema <- decay * ema + (1 - decay) * params, tensor by tensor (the fp32 adapter weights)."""
    for e, p in zip(ema, params, strict=True):
        e.lerp_(p.detach(), 1.0 - decay)


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


@torch.no_grad()
def evaluate(world, sigmas, n, seed):
    """Student samples from fixed noise (same seed every time, so curves compare) and the world's metrics of the final
    samples (and, K > 1, of every step's x0 output and of their mixture: world.evaluate's steps)."""
    gen = torch.Generator().manual_seed(seed)
    cond = world.sample_cond(n, gen)
    noise = world.noise(cond, gen)
    outputs = sample_student(world, cond, sigmas, noise, generator=gen, every_step=True)
    return outputs[-1], cond, world.evaluate(outputs[-1], cond, steps=outputs if len(outputs) > 1 else None)


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
        args, ckpt = resume_args(args, "dmd")
    args = resolve_defaults(args)
    validate(args)
    rank, world_size, device = setup_distributed(args)
    lead = rank == 0  # data parallel: rank 0 alone evaluates, logs and saves
    run_dir = (Path(args.resume) if ckpt else run_dir_path(args, "dmd")) if lead else None  # checked before any work
    torch.manual_seed(args.seed)
    roles = fake_roles(args.fake_tracks, args.student_steps)
    world = world if world is not None else make_world(args, device, n_fakes=len(roles))
    if world_size > 1:
        torch.manual_seed(args.seed + 1000 * rank)  # data parallel: each rank its own noise, prompts and levels
    sigmas = student_sigmas(world, args.student_steps)
    opt_generator = torch.optim.AdamW(world.params("generator"), args.lr_generator, weight_decay=args.weight_decay_generator)
    if args.fake_ema > 0:
        share_adapter_init(world)
    opt_fakes = {role: torch.optim.AdamW(world.params(role), args.lr_fake, weight_decay=0.0) for role in roles}
    optimizers = {"generator": opt_generator, **opt_fakes}
    schedulers = {name: make_lr_schedule(opt, args.lr_schedule, args.num_steps) for name, opt in optimizers.items()}
    ema = [p.detach().clone() for p in world.params("generator")] if args.ema_decay > 0 else None
    first_step, history = 1, []
    if ckpt is not None:  # every rank restores the same adapters and optimiser states
        state = load_training_state(world, ckpt, optimizers, schedulers)
        ema, first_step = state["ema"], state["step"] + 1
        history = read_history(run_dir, state["step"]) if lead else []
    if lead:  # a resumed run rewrites its config with the extended num_steps
        run_dir.mkdir(parents=True, exist_ok=ckpt is not None)
        (run_dir / "config.json").write_text(json.dumps({"method": "dmd", **asdict(args), "provenance": provenance(device)},
                                                        indent=2))
    if lead:
        print(f"dmd: {'resuming' if ckpt else 'run'} {run_dir} (from step {first_step})", file=sys.stderr)
    log = open(run_dir / "metrics.jsonl", "a") if lead else open(os.devnull, "w")

    def record(entry):
        history.append(entry)
        log.write(json.dumps(entry) + "\n")
        log.flush()

    def training_state(step, rng_states):
        return {"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: sc.state_dict() for k, sc in schedulers.items()}, "rng": rng_states}

    def evaluation(step):
        with swapped_params(world.params("generator"), ema) if ema is not None else contextlib.nullcontext():
            return evaluate(world, sigmas, args.eval_samples, args.seed + 1)

    if ckpt is None:
        rng_states = gathered_rng_states()  # every rank's (a collective)
        if lead:
            _, _, metrics = evaluation(0)
            record({"step": 0, **metrics})
            save_checkpoint(world, run_dir, 0, training_state(0, rng_states), ema)
    start, shown = time.time(), {}
    bar = tqdm(range(first_step, args.num_steps + 1), desc="dmd", disable=not (args.progress and lead), dynamic_ncols=True,
               initial=first_step - 1, total=args.num_steps)
    samples = None
    for step in bar:
        try:
            losses = train_step(world, args, sigmas, opt_generator, opt_fakes)
        except FloatingPointError as err:
            log.close()
            where = run_dir / "checkpoint" if lead else "rank 0's run directory"
            raise FloatingPointError(f"{err} at step {step}; stopped. The last good checkpoint is {where}") from None
        if ema is not None and step % args.ema_every == 0:
            ema_update(ema, world.params("generator"), args.ema_decay)
        lr = opt_generator.param_groups[0]["lr"]  # the rate this update used
        for scheduler in schedulers.values():
            scheduler.step()
        if step % args.log_every == 0:
            record({"step": step, "time": time.time() - start, "lr": lr, **losses})
            bar.set_postfix(dmd=f"{losses['dmd_loss']:.2e}", fake=f"{losses['fake_loss']:.3f}", **shown)
        if step % args.eval_every == 0 or step == args.num_steps:
            rng_states = gathered_rng_states()  # every rank's (a collective); evaluation draws from its own generator
            if lead:
                samples, cond, metrics = evaluation(step)
                record({"step": step, "time": time.time() - start, **metrics})
                shown = ({"ed": f"{metrics['energy_distance']:.4f}",
                          "modes": f"{metrics['modes_covered']}/{metrics['n_modes']}"}
                         if "energy_distance" in metrics else {"reward": f"{metrics['mean_reward']:.4f}"})
                bar.set_postfix(dmd=f"{losses['dmd_loss']:.2e}", **shown)
                save_checkpoint(world, run_dir, step, training_state(step, rng_states), ema)
    log.close()
    if not lead:  # data parallel: the other ranks stop here; rank 0 writes the figures
        return {"run_dir": None, "history": history, "final": history[-1] if history else {}, "world": world}

    if samples is None:  # a resumed run that had nothing left to do
        samples, _, _ = evaluation(args.num_steps)
    world.plot_samples(samples, run_dir / "samples.png", f"dmd, {args.student_steps}-step student, step {args.num_steps}")
    world.plot_curves(history, ["dmd_loss", "fake_loss", "energy_distance", "energy_distance_mixture", "modes_covered",
                                "mode_width_min", "teacher_logp"], run_dir / "curves.png", "dmd")
    final = {k: v for k, v in history[-1].items()}
    print(f"dmd: done in {time.time() - start:.1f} s -> {run_dir}")
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return {"run_dir": run_dir, "history": history, "final": final, "world": world}


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


def parse_args(args_class, argv=None):
    """args_class from the command line (argv: sys.argv[1:]), parsed as its sectioned_args, flattened back."""
    description = sys.modules[args_class.__module__].__doc__.split("\n")[0]
    parsed = tyro.cli(sectioned_args(args_class), args=argv, description=description)
    return args_class(**{k: v for group in dataclasses.fields(parsed) for k, v in vars(getattr(parsed, group.name)).items()})


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
