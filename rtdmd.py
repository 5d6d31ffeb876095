"""RTDMD: Reward-Tilted Distribution Matching Distillation of a flow teacher into a K-step student (Huang et al. 2026).

    python rtdmd.py                                   # toy: AC-DMD cold start, then the paper's stage 2 (~1 min, 1 core)
    python rtdmd.py --stage2-recipe natural           # stage 2 as the reward-tilted KL at natural scales (see below)
    python rtdmd.py --dm-target tilted --stage2-recipe natural   # beyond the paper: DM against the exact tilted teacher
    python rtdmd.py --beta 0.5 --toy-reward-angle 90  # another tilt
    # table 4 of the paper, one command per row (add --seed, --output-dir as needed):
    python rtdmd.py --rl-steps 0                      #   cold start (AC-DMD only)
    python rtdmd.py --naive-grpo --no-reward-backprop #   w/ GRPO (all K-1 steps, independent noise)
    python rtdmd.py --subset-size 1 --no-reward-backprop   # w/ SubGRPO (M = 1)
    python rtdmd.py --subset-size 1                   #     + L_det
    python rtdmd.py --no-reward-backprop              #   w/ SubGRPO (M = 2)
    python rtdmd.py                                   #     + L_det (the default)
    python rtdmd.py --rl-steps 0 --gamma 0            # table 3: A-DMD (no consistency regulariser)
    python rtdmd.py --model sd3.5-medium              # text-to-image, the authors' recipe (GPU; flow presets only)
    torchrun --nproc_per_node 8 rtdmd.py --model sd3.5-medium --batch-size 9 --groups 6   # per-GPU sizes
    python rtdmd.py --resume runs/<run>               # continue a stopped run from its last checkpoint, exactly
    python rtdmd.py --resume runs/<run> --num-steps 1500   # ... and extend its RL stage to 1500 updates in all
    python rtdmd.py --help                            # every option, with its default

A run writes runs/rtdmd__<model>__<seed>__<time>/: config.json (with the git commit, package versions, device),
metrics.jsonl (losses, lr, gradient norm, evaluations), checkpoint/ (generator = the EMA weights that are evaluated,
raw/ = the trained weights, fake, and the training state --resume restores: optimisers, the generator EMA, step,
RNG states), samples_cold_start.png, samples.png, curves.png.

The algorithm (Algorithm 1, appendix I; equation numbers of the paper)
    Student: K CPS steps (eq. 19-21) on the noise levels 1 = sigma_0 > sigma_1 > ... > sigma_{K-1} > sigma_K = 0.
    Step k predicts x0 = G(x_{k-1}, sigma_{k-1}), eps_hat = (x_{k-1} - (1 - sigma_{k-1}) x0) / sigma_{k-1}, and
        x_k = (1 - sigma_k) x0 + sigma_k cos(eta pi/2) eps_hat + sigma_k sin(eta pi/2) z          (eta 0: Euler, 1: CM)
    a Gaussian policy N(mu_k, (sigma_k sin(eta pi/2))^2 I) for k < K (eq. 13), deterministic at k = K.
    Stage 1, AC-DMD (sec. 3.1), per generator update (TTUR: fake_updates_per_step fake updates first):
      1. roll the student out to a random stop index k in 1..K, gradient through step k only: x_s at level sigma_s;
      2. renoise to sigma_t in [sigma_s, 1]: x_t = a x_s + sqrt(sigma_t^2 - a^2 sigma_s^2) eps, a = alpha_t / alpha_s
         (eq. 8, variance-correct: see below);
      3. fake score: ambient denoising score matching on [sigma_s, 1] (eq. 10) + gamma * the consistency regulariser
         (eq. 11-12, the two-sample estimator of appendix F);
      4. generator: the DM step of eq. 9, alpha_k(t) (s_fake - s_real)(x_t) back-propagated into x_s.
    Stage 2 (sec. 3.2, eq. 18), per update: descend  dm_weight * AC-DMD  -  beta * (L_stoc + L_det):
      5. roll out G groups of N trajectories with SubGRPO's noise (eq. 16: a random subset S of M of the K-1 stochastic
         steps gets independent noise, the others share the group's draw); rewards r_i of the clean samples;
      6. the fake score takes its update(s) on the rollout's clean samples;
      7. group advantages A_i (clipped at +-advantage_clip);
      8. L_stoc (eq. 17): (K-1)/M mean_i sum_{k in S} A_i grad log pi_k (PPO's clipped ratio); L_det (eq. 15): the
         reward back-propagated through the deterministic last step, x_{K-1} held fixed; AC-DMD on that same last step.
    --naive-grpo: independent noise at every step and all K-1 steps in L_stoc (appendix H).
    Every large batch is split into --micro-batch-size chunks whose gradients accumulate into one optimiser step
    (all random draws are made for the whole batch first, so the chunked update equals the unchunked one).
    The generator EMA (the authors'): stage 1 every fake-score update at decay ema_decay; stage 2 the ramp
    min((1 + u) / (10 + u), ema_decay_rl) applied ema_repeats_rl times after each update u with (u + 1) % 8 == 0.
    Evaluation, samples and the checkpoint's generator use the EMA weights; stage 2 starts from them.

Stage 2 recipes (--stage2-recipe)
    paper    Algorithm 1 as the authors run it (notes/recipes.md section 4): DMD2-normalised DM (dm_scale dmd2) on the
             last step only (rl_dm final-step), fake trained 1:1 on the rollout, advantages with a per-prompt mean and a
             global std (global-std), the log-probability -mean_dims (x - mu)^2 (log_prob mse), L_det as the hinge
             det_weight relu(det_margin - r). Its temperature is not beta: the normalisations rescale each term.
             Toy scales (D = 2 dims, not 65,536; measured, README): the kl scale (the DMD2 normalisation by a mean over
             2 dims has infinite variance), the ambient fake weighting, DM 1 / L_det 0.1 (the authors' ratio; at their
             0.001 / 1e-4 the toy reward-hacks) at lr 2e-5. The DM term on the last step cannot move mass between
             modes, so nothing holds the mode weights against the policy gradient: no fixed point, the tilt grows
             with lr x updates (early stopping is the regulariser, as the authors' 1000 updates at lr 3e-6 are).
    natural  the reward-tilted KL at natural scales, where beta is a temperature: un-normalised eq. 9 (dm_scale kl),
             DM on the final samples differentiated through all K steps (rl_dm all-steps: the pathwise gradient of the
             output's KL), leave-one-out advantages (center: unbiased), the exact Gaussian log-probability, L_det
             weight 1, renoise levels up to rl_renoise_max = 0.5. It descends E_t KL(q_t || p_t) - beta E_q[r], whose
             minimiser is not p~ = p exp(beta r) / Z: see fixed_point_on_grid (tests/test_rtdmd_claims.py).
    --dm-target tilted (toy only, beyond the paper): the DM term's real score is the exact tilted teacher's noisy
             marginal (p~ is again a Gaussian mixture), and the reward terms are off (the tilt is in the target;
             adding -beta E[r] would tilt twice). Stage 2 then descends E_t KL(q_t || p~_t), minimised by p~ itself;
             use it with a DM path through every step (--stage2-recipe natural: all-steps), since the last step alone
             cannot re-weight the modes.
             On images this needs the score of p~_t = p_t(x) E_p[exp(beta r(x0)) | x_t = x] / Z, i.e. the gradient of
             the soft value log E_p[exp(beta r(x0)) | x_t]: a learned value function (or teacher rollouts from x_t).

Corrections of the paper's text and deviations from the authors' code (each a named option)
    * Eq. 8 / appendix B renoise x_{t_k} to t with std (t - t_k) / (1 - t_k): that adds standard deviations; Gaussian
      noises add variances. We use x_t = a x_s + sqrt(t^2 - a^2 s^2) eps, as the authors' code does.
    * Consistency kernel: the authors step from sigma_t to sigma_t' = max(sigma_t - Delta, 0), Delta ~ U{1..200} / 1000,
      by CPS at eta 0.9 with the fake's detached prediction. The optimal denoiser is NOT self-consistent under that
      kernel (it re-noises almost fully: measured in tests); the DDPM posterior step is (exactly so for affine
      denoisers), so it is our default (--consistency-kernel ddpm); --consistency-kernel cps is the authors'.
    * PPO's clip: with one inner epoch per rollout (the authors' num_inner_epochs 1) the ratio is 1 and the clip does
      nothing. The authors keep Flow-GRPO's clipped objective because their trainer is Flow-GRPO's, where
      num_inner_epochs may exceed 1; its old log-probabilities come from the sampling pass, so in their bf16 runs the
      ratio differs from 1 only by numerics (a 1e-5 clip may then drop some samples' gradients; not measured here).
      Ours takes the old log-probabilities from the rollout too; --ppo-epochs > 1 reuses each rollout, and then the
      clip bites (tested).
    * L_stoc's factor: eq. 17's (K-1)/M; the authors' gradient accumulation divides every term by M + 1 instead.
    * SubGRPO's subset: drawn per group (Algorithm 1, line 8) with random shared noise; the authors' code draws one
      subset per update and seeds the shared noise from the prompt (same estimator mean).
    * Stage 2's start: the authors merge the cold-start EMA LoRA into the base and train a fresh LoRA (A ~ N(0, 1),
      B = 0); we continue the same LoRA from the EMA weights (the same function at the switch, not the same dynamics).
    * Zero-advantage rows: the authors drop them from the batch; we keep them (zero gradient; means over all rows).

Conventions: noise levels sigma in [0, 1], sigma = 1 pure noise; flow worlds only (toy flow, SD3):
x = (1 - sigma) x0 + sigma eps, velocity eps - x0, x0 = x - sigma v. The student's levels are pre-shift times
1, 1 - 1/K, ... mapped through the world's shift (student_sigmas); every other level in this file (renoise, consistency)
is a noise level sigma drawn directly, unshifted, as in the authors' code. The algorithm sees only x0-predictions,
world.alpha and world.reward, so it is identical on every flow world.
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

MODELS = ("toy2d", "sd3-medium", "sd3.5-medium", "sd3.5-large")  # toy2d/, and the flow presets of t2i/
STAGE2_RECIPES = ("paper", "natural")
PICKSCORE_SCALE = 1 / 26  # the authors divide PickScore (logit_scale * cos ~ 22) by 26 (rewards/pickscore_scorer.py)


@dataclass
class Args:
    # ---- world ----
    model: Literal["toy2d", "sd3-medium", "sd3.5-medium", "sd3.5-large"] = "toy2d"
    """world to distil: toy2d (2-D Gaussian mixture, CPU), or text-to-image sd3-medium, sd3.5-medium, sd3.5-large (flow
    models only: sdxl is a VP / eps model, which RTDMD's CPS sampler cannot run)"""
    model_path: Optional[str] = None
    """local copy of the model weights (text-to-image worlds; default: the preset's hub repository)"""
    prompts: Optional[str] = None
    """text-to-image: training prompts, one per line (default: t2i/prompts/train.txt, a small smoke-test set)"""
    eval_prompts: Optional[str] = None
    """text-to-image: held-out evaluation prompts (default: t2i/prompts/eval.txt)"""
    resolution: Optional[int] = None
    """text-to-image: image size in pixels (RTDMD: SD3-M 1024, SD3.5-M 512; sd3.5-large 1024)"""
    t2i_reward: Optional[str] = None
    """text-to-image reward, name[:weight[:cap]],...: clip, pickscore, aesthetic, hpsv2, imagereward (the tilt's reward;
    each term gets its own advantage normalisation under --advantage global-std) (presets: the authors'
    clip,hpsv2,pickscore:0.03846153846, PickScore / 26)"""
    reward_checkpoints: Optional[str] = None
    """text-to-image: local reward weights, name=PATH,... (e.g. clip=/models/clip-vit-large-patch14)"""
    lora_rank: Optional[int] = None
    """text-to-image: generator LoRA rank (authors: 32)"""
    lora_alpha: Optional[float] = None
    """text-to-image: generator LoRA alpha, scale alpha / rank (authors: 64)"""
    fake_lora_rank: Optional[int] = None
    """text-to-image: fake-score LoRA rank (authors: 32)"""
    fake_lora_alpha: Optional[float] = None
    """text-to-image: fake-score LoRA alpha (authors: 64)"""
    toy_mixture: Literal["ring8", "grid25", "line3"] = "ring8"
    """toy teacher: ring8 (8 equal modes), grid25 (5x5, unequal weights), line3"""
    toy_spread: Optional[float] = None
    """toy mode standard deviation (None: the mixture's default)"""
    toy_path: Literal["flow"] = "flow"
    """toy noising path: flow (RTDMD's CPS sampler needs a flow path; the toy's vp path is refused)"""
    toy_classes: int = 0
    """toy class labels (mode k has label k % toy_classes); 0: unconditional"""
    toy_reward: Literal["linear", "quadratic", "radius"] = "linear"
    """toy reward: linear and quadratic have an exact tilted teacher p exp(beta r) / Z (a Gaussian mixture again: the
    energy_distance_tilted metric, --dm-target tilted); radius has none"""
    toy_reward_angle: float = 0.0
    """toy linear reward's direction in degrees from the x axis: r = cos(a) x_1 + sin(a) x_2"""
    toy_reward_target: tuple[float, float] = (2.0, 0.0)
    """toy quadratic reward's target point c: r = -|x - c|^2 / 2"""
    # ---- student, sampler and training ----
    student_steps: int = 4
    """K, the number of student sampling steps (pre-shift levels 1, 1 - 1/K, ..., 1/K, then 0)"""
    eta: float = 0.9
    """CPS stochasticity in [0, 1]: 0 Euler ODE, 1 consistency sampler (paper: 0.9; stage 2 needs eta > 0)"""
    micro_batch_size: Optional[int] = None
    """split every forward / backward of a batch (fake updates, the generator update, the RL rollout, its reward decode
    and update) into chunks of this many rows whose gradients accumulate into one optimiser step (the same update as the
    whole batch); None: the whole batch at once (toy2d: None; SD3-M 2, SD3.5-M 4, SD3.5-L 2)"""
    gradient_checkpointing: bool = True
    """text-to-image: recompute the network's blocks (and the reward decode) in backward, to save memory;
    --no-gradient-checkpointing keeps the activations (~17% less time per step, measured on CPU)"""
    grad_clip: float = 1.0
    """gradient-norm clipping of both adapters, both stages (0: off; authors: 1.0)"""
    # ---- stage 1: AC DMD cold start ----
    cold_steps: Optional[int] = None
    """stage 1 generator updates (toy2d: 400; text-to-image: 1500, the paper's)"""
    batch_size: Optional[int] = None
    """samples per stage 1 generator / fake update, per process (toy2d: 256; text-to-image: 72, the authors' 9 x 8 GPUs)"""
    lr_generator: Optional[float] = None
    """stage 1 generator learning rate (toy2d: 1e-3; text-to-image: 3e-5, the authors')"""
    lr_fake: Optional[float] = None
    """fake-score learning rate, both stages (toy2d: 1e-3; text-to-image: 3e-5, the authors')"""
    weight_decay_generator: float = 0.0
    """stage 1 AdamW weight decay of the generator adapter (authors: 0)"""
    fake_updates_per_step: Optional[int] = None
    """stage 1 TTUR: fake-score updates per generator update (toy2d: 5; text-to-image: 10, the authors')"""
    guidance_scale: Optional[float] = None
    """classifier-free guidance of the real score (toy2d: 1.0, it needs --toy-classes; SD3-M 7.0, SD3.5 4.5, the
    authors')"""
    renoise_offset: float = 0.01
    """renoise levels sigma_t ~ U[sigma_s + renoise_offset, top] (authors: 10 of 1000 timesteps)"""
    renoise_min: float = 0.02
    """renoise levels are clamped to [renoise_min, renoise_max] (authors: 20 / 1000)"""
    renoise_max: float = 0.98
    """see renoise_min (authors: 980 / 1000)"""
    fake_weighting: Optional[Literal["clamped", "ambient"]] = None
    """weight of the fake's velocity error |v - v*|^2 in eq. 10: clamped, min(1, 10 sigma_ts^2) (the authors'
    clamp(1 / sigma_ts^2, 0, 10) on |sigma_ts (v - v*)|^2), or ambient, (sigma_ts / sigma_t)^2 (= the plain flow loss
    at sigma_s = 0); sigma_ts^2 = sigma_t^2 - a^2 sigma_s^2 is the renoise variance (toy2d: ambient; text-to-image:
    clamped)"""
    gamma: float = 0.01
    """weight of the consistency regulariser in the fake-score loss (eq. 12; paper 0.01; 0: A-DMD)"""
    consistency_max_gap: float = 0.2
    """the consistency step goes from sigma_t to max(sigma_t - Delta, 0), Delta ~ U{1, ..., 1000 max_gap} / 1000
    (noise levels; authors: 200 timesteps)"""
    consistency_kernel: Literal["ddpm", "cps"] = "ddpm"
    """reverse kernel of the consistency step: ddpm (the DDPM posterior step, under which the optimal denoiser is
    self-consistent) or cps (the authors': CPS at --eta)"""
    dm_scale: Optional[Literal["kl", "dmd2"]] = None
    """distribution-matching scale: kl (un-normalised eq. 9, per sample alpha_k (s_fake - s_real)) or dmd2 (the authors':
    normalised by mean|x_s - x0_real|, teacher and fake stepped back to sigma_s by CPS) (default: the --stage2-recipe
    preset's; paper: dmd2 on text-to-image, kl on toy2d; natural: kl)"""
    ema_decay: Optional[float] = None
    """stage 1 generator EMA decay, one update per fake-score update; 0: no EMA (toy2d: 0.99; text-to-image: 0.99, the
    authors' every global step)"""
    # ---- stage 2: the reward tilted KL ----
    stage2_recipe: Literal["paper", "natural"] = "paper"
    """paper (Algorithm 1 at the authors' scales) or natural (the reward-tilted KL at natural scales); sets the stage 2
    defaults below that are None (see the docstring)"""
    rl_steps: Optional[int] = None
    """stage 2 generator updates (toy2d: 600; text-to-image: 1000, the paper's)"""
    num_steps: Optional[int] = None
    """the run's generator updates in all, cold_steps + rl_steps (None: derived). A new run sets its stages with
    --cold-steps and --rl-steps (a --num-steps that differs from their sum is refused). --resume RUN_DIR --num-steps N
    extends a run to N updates by lengthening its RL stage (rl_steps becomes N - cold_steps); the cold start keeps its
    length, so a run stopped in stage 1 still switches to stage 2 at update cold_steps"""
    lr_generator_rl: Optional[float] = None
    """stage 2 generator learning rate (default: the --stage2-recipe preset's; paper: 3e-6 on text-to-image, the
    authors', 2e-5 on toy2d; natural: 3e-6 on text-to-image, 3e-4 on toy2d)"""
    weight_decay_generator_rl: Optional[float] = None
    """stage 2 AdamW weight decay of the generator adapter (toy2d: 0; text-to-image: 1e-4, the authors')"""
    beta: float = 1.0
    """reward strength of the tilt p exp(beta r) / Z (eq. 6; paper: 1.0)"""
    groups: Optional[int] = None
    """groups (prompts) per stage 2 update, per process (toy2d: 16; authors: SD3-M 32, SD3.5-M 48)"""
    group_size: Optional[int] = None
    """trajectories per group N (toy2d: 16; authors: SD3-M 16, SD3.5-M 24)"""
    subset_size: Optional[int] = None
    """SubGRPO: M stochastic steps per group with independent noise, 1 <= M <= K - 1 (default: min(2, K - 1), derived
    from K, not a preset: 2 at the default K = 4, the paper's; 1 at K = 2). Unused with --naive-grpo (all K - 1)"""
    naive_grpo: bool = False
    """naive GRPO: independent noise at every step, all K - 1 steps in the estimator (appendix H)"""
    reward_backprop: bool = True
    """L_det (eq. 15): back-propagate the reward through the deterministic last step (--no-reward-backprop: off)"""
    det_weight: Optional[float] = None
    """L_det = det_weight relu(det_margin - r) (default: the --stage2-recipe preset's; paper: 1e-4 on text-to-image,
    the authors', 0.1 on toy2d; natural: 1)"""
    det_margin: Optional[float] = None
    """see det_weight; inf: no hinge, L_det = det_weight r (default: the --stage2-recipe preset's; paper: 3, the
    authors', on the summed rewards; natural: inf)"""
    advantage: Optional[Literal["global-std", "group-std", "center"]] = None
    """group advantage: global-std (the authors': per reward term (r - group mean) / (std over the batch + 1e-4),
    weighted sum, standardised again), group-std ((r - mean) / group std, the paper's text) or center (leave-one-out
    r_i - mean of the others: unbiased) (default: the --stage2-recipe preset's; paper: global-std; natural: center)"""
    advantage_clip: float = 5.0
    """clip advantages to +-this (authors: 5; 0: off)"""
    log_prob: Optional[Literal["mse", "exact"]] = None
    """log-probability of a transition in L_stoc: mse (the authors' -mean_dims (x - mu)^2, no 1 / (2 std^2): it scales
    the policy gradient by 2 std^2 / D) or exact (log N(x; mu, std^2 I) over the dims, eq. 13) (default: the
    --stage2-recipe preset's; paper: mse; natural: exact)"""
    clip_range: float = 1e-5
    """PPO ratio clip epsilon (paper: 1e-5); inactive with --ppo-epochs 1 (the ratio is 1)"""
    ppo_epochs: int = 1
    """optimiser steps per rollout, each on the whole rollout (authors: 1)"""
    rl_dm: Optional[Literal["final-step", "all-steps", "random-stop"]] = None
    """stage 2 DM term: final-step (AC-DMD on the rollout's deterministic last step, gradient through that step only,
    fake trained on the rollout's samples: the authors'), all-steps (fresh final samples differentiated through all K
    steps: the output's KL gradient) or random-stop (stage 1's AC-DMD) (default: the --stage2-recipe preset's; paper:
    final-step; natural: all-steps)"""
    dm_weight_rl: Optional[float] = None
    """weight of the DM term in stage 2 (eq. 18: 1) (default: the --stage2-recipe preset's; paper: 0.001 on
    text-to-image, the authors', 1 on toy2d; natural: 1)"""
    dm_target: Literal["teacher", "tilted"] = "teacher"
    """real score of the DM term: teacher, or tilted (toy, linear or quadratic reward: the exact p~'s noisy marginals;
    stage 2 is then DM only)"""
    rl_renoise_max: Optional[float] = None
    """stage 2 (final-step, all-steps): top of the renoise interval, then clamped to renoise_max (default: the
    --stage2-recipe preset's; paper: 1, the authors'; natural: 0.5)"""
    fake_updates_per_rl_step: Optional[int] = None
    """stage 2 fake-score updates per generator update (default: the --stage2-recipe preset's; paper: 1, the authors';
    natural: 1 on text-to-image, 5 on toy2d)"""
    ema_decay_rl: Optional[float] = None
    """stage 2 EMA: the top of the ramp min((1 + u) / (10 + u), ema_decay_rl); 0: no EMA (toy2d: 0.9; text-to-image:
    0.9, the authors')"""
    ema_every_rl: int = 8
    """stage 2 EMA fires after update u when (u + 1) % ema_every_rl == 0 (authors: 8)"""
    ema_repeats_rl: int = 16
    """stage 2 EMA updates per firing, all toward the same weights (the authors call it once per sub-batch: 16)"""
    # ---- run ----
    seed: int = 0
    """random seed (adapter init, noise, levels)"""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)"""
    output_dir: str = "runs"
    """parent directory of run directories"""
    run_name: Optional[str] = None
    """run directory name (default rtdmd__<model>__<seed>__<time>); an existing directory is never overwritten"""
    log_every: int = 25
    """steps between metrics.jsonl loss records"""
    eval_every: int = 200
    """steps between evaluations (and checkpoints; also at the end of each stage)"""
    eval_samples: Optional[int] = None
    """samples per evaluation (toy2d: 4000; text-to-image: 16, one per evaluation prompt)"""
    progress: bool = True
    """show a tqdm progress bar"""
    resume: Optional[str] = None
    """continue the run in this directory from its last complete checkpoint, with its own config (and --num-steps, if
    given, to extend its RL stage): adapters, optimisers, the generator EMA, step (and so the stage) and RNG states
    are restored, so the result is the uninterrupted run's"""


# Every None field gets its value here: the model's (MODEL_DEFAULTS, resolve_defaults), then the stage 2 recipe's per
# kind of world (RECIPE_DEFAULTS, resolve_stage2), which also derives subset_size and num_steps.
MODEL_DEFAULTS = {
    # toy2d: the toy scales (measured; the README's rtdmd section and tests/test_rtdmd_claims.py): the kl scale and
    # the ambient weighting (dm_scale and fake_weighting below), the authors' EMA.
    "toy2d": dict(cold_steps=400, batch_size=256, lr_generator=1e-3, lr_fake=1e-3,
                  fake_updates_per_step=5, guidance_scale=1.0, rl_steps=600, groups=16, group_size=16, eval_samples=4000,
                  fake_weighting="ambient", ema_decay=0.99, ema_decay_rl=0.9),
    # The authors' configs (notes/recipes.md section 3, configs/cold_start/*.yaml and configs/rtdmd/*.yaml), one value
    # per row of tests/test_rtdmd_presets.py. Batch sizes are the authors' global ones in one process (torchrun: divide).
    "sd3-medium": dict(resolution=1024, micro_batch_size=2, cold_steps=1500, batch_size=72, lr_generator=3e-5,
                       lr_fake=3e-5, fake_updates_per_step=10, guidance_scale=7.0, rl_steps=1000, groups=32,
                       group_size=16, eval_samples=16, fake_weighting="clamped", ema_decay=0.99, ema_decay_rl=0.9),
    "sd3.5-medium": dict(resolution=512, micro_batch_size=4, cold_steps=1500, batch_size=72, lr_generator=3e-5,
                         lr_fake=3e-5, fake_updates_per_step=10, guidance_scale=4.5, rl_steps=1000, groups=48,
                         group_size=24, eval_samples=16, fake_weighting="clamped", ema_decay=0.99, ema_decay_rl=0.9),
}
MODEL_DEFAULTS["sd3.5-large"] = dict(MODEL_DEFAULTS["sd3.5-medium"], resolution=1024, micro_batch_size=2)  # no authors' recipe
for _name in ("sd3-medium", "sd3.5-medium", "sd3.5-large"):  # LoRA r32 alpha64 on both roles; CLIPScore + HPSv2.1 + PickScore
    MODEL_DEFAULTS[_name].update(lora_rank=32, lora_alpha=64, fake_lora_rank=32, fake_lora_alpha=64,
                                 t2i_reward=f"clip,hpsv2,pickscore:{PICKSCORE_SCALE:.10g}")

RECIPE_DEFAULTS = {
    # paper: the authors' stage 2. The toy scales (measured, tests/test_rtdmd_claims.py): at the authors' weights
    # (DM 0.001, L_det 1e-4) the policy gradient reward-hacks the toy; with DM 1 and L_det 0.1 (their ratio) it tilts,
    # and its mode weights keep drifting with lr x updates (no fixed point: DM on the last step cannot move mass
    # between modes), so lr 2e-5 x 600 updates stops near its closest approach to p~.
    ("paper", "toy2d"): dict(dm_scale="kl", rl_dm="final-step", advantage="global-std", log_prob="mse", det_margin=3.0,
                             det_weight=0.1, dm_weight_rl=1.0, lr_generator_rl=2e-5, weight_decay_generator_rl=0.0,
                             rl_renoise_max=1.0, fake_updates_per_rl_step=1),
    ("paper", "t2i"): dict(dm_scale="dmd2", rl_dm="final-step", advantage="global-std", log_prob="mse", det_margin=3.0,
                           det_weight=1e-4, dm_weight_rl=1e-3, lr_generator_rl=3e-6, weight_decay_generator_rl=1e-4,
                           rl_renoise_max=1.0, fake_updates_per_rl_step=1),
    # natural: eq. 18 at natural scales (dm_weight 1, L_det weight 1, no hinge), the previous toy default.
    ("natural", "toy2d"): dict(dm_scale="kl", rl_dm="all-steps", advantage="center", log_prob="exact", det_margin=math.inf,
                               det_weight=1.0, dm_weight_rl=1.0, lr_generator_rl=3e-4, weight_decay_generator_rl=0.0,
                               rl_renoise_max=0.5, fake_updates_per_rl_step=5),
    ("natural", "t2i"): dict(dm_scale="kl", rl_dm="all-steps", advantage="center", log_prob="exact", det_margin=math.inf,
                             det_weight=1.0, dm_weight_rl=1.0, lr_generator_rl=3e-6, weight_decay_generator_rl=1e-4,
                             rl_renoise_max=0.5, fake_updates_per_rl_step=1),
}


# =====================================================================================================
#                                          the algorithm
# =====================================================================================================


# Copied from dmd.py: student_sigmas
def student_sigmas(world, student_steps):
    """The student's K noise levels: pre-shift times 1, 1 - 1/K, ..., 1/K through the world's shift."""
    return [float(world.sigma(torch.tensor(1.0 - k / student_steps))) for k in range(student_steps)]


def student_schedule(world, student_steps):
    """[sigma_0 = 1, sigma_1, ..., sigma_{K-1}, sigma_K = 0]: the K student levels and the clean end."""
    return student_sigmas(world, student_steps) + [0.0]


def _col(v, x):
    """A number or per-sample (n,) tensor as something that broadcasts against x (n, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() == 1 else v


# Copied from dmd.py: micro_batches
def micro_batches(n, size):
    """Slices that split a batch of n into chunks of at most `size` (None: one chunk). A loss that is a mean over the
    batch becomes the sum over chunks of chunk mean * chunk / n, so accumulated gradients equal the whole batch's."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ---- CPS sampler (eq. 19-21, appendix C) ----


def cps_step(x, x0, sigma, sigma_next, eta, noise):
    """One coefficient-preserving step from level sigma to sigma_next < sigma (eq. 19-20):
    eps_hat = (x - (1 - sigma) x0) / sigma,  x' = (1 - s') x0 + s' cos(eta pi/2) eps_hat + s' sin(eta pi/2) noise.
    sigma, sigma_next, eta: numbers or per-sample (n,). With a known x0 the result has signal coefficient (1 - s') and,
    if x's noise is standard normal, total noise std s' (cos^2 + sin^2 = 1): the scheduler's coefficients exactly."""
    sigma, sigma_next, eta = _col(sigma, x), _col(sigma_next, x), _col(eta, x)
    eps_hat = (x - (1 - sigma) * x0) / sigma
    angle = eta * (math.pi / 2)
    return (1 - sigma_next) * x0 + sigma_next * torch.cos(angle) * eps_hat + sigma_next * torch.sin(angle) * noise


def cps_std(sigma_next, eta):
    """Standard deviation of the CPS transition, sigma_k sin(eta pi / 2) (eq. 13)."""
    return sigma_next * math.sin(eta * math.pi / 2)


def transition_log_prob(x_next, mean, std, form="exact"):
    """Log-probability (n,) of the transition x_next ~ N(mean, std^2 I).
    exact: log N summed over the data dimensions, with its constants (eq. 13);
    mse: the authors' -mean_dims (x_next - mean)^2, which is (2 std^2 / D) (log N + const): their policy gradient is the
    exact one times 2 std^2 / D (D = 65,536 latent dims on SD3 at 512 px, 2 on the toy)."""
    sq = (x_next - mean) ** 2
    if form == "mse":
        return -sq.flatten(1).mean(1)
    d = x_next[0].numel()
    return -sq.flatten(1).sum(1) / (2 * std**2) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


def ddpm_eta(sigma, sigma_next):
    """The eta for which a CPS step is the DDPM posterior step q(x_s' | x_s, x0) of the flow path:
    sin(eta pi/2) = sqrt(1 - (alpha sigma' / (alpha' sigma))^2); tensors or numbers."""
    ratio = ((1 - sigma) * sigma_next / ((1 - sigma_next) * sigma)).clamp(0.0, 1.0)
    return torch.asin((1 - ratio**2).sqrt()) * (2 / math.pi)


def chain_noise(world, cond, big_k, generator=None):
    """The randomness of one K-step rollout: starting noise (n, ...) and the K-1 step noises."""
    x_start = world.noise(cond, generator)
    where = generator.device if generator is not None else x_start.device  # a CPU generator with a CUDA world
    return x_start, [torch.randn(x_start.shape, generator=generator, device=where, dtype=x_start.dtype).to(x_start.device)
                     for _ in range(big_k - 1)]


def sample_student(world, cond, schedule, eta, noise, stop=None, noises=None, generator=None):
    """K-step CPS sampling from noise (n, ...). schedule = [sigma_0, ..., sigma_K]. With stop=k returns the state x_k
    after k steps (k = K: the clean sample). noises: the K-1 injected noises (default: fresh ones from generator)."""
    stop = len(schedule) - 1 if stop is None else stop
    x = noise
    for k in range(1, stop + 1):
        x0 = world.x0("generator", x, schedule[k - 1], cond)
        if schedule[k] == 0:  # the deterministic last step (sigma_K = 0)
            return x0
        where = generator.device if generator is not None else x.device  # a CPU generator with a CUDA world
        z = noises[k - 1] if noises is not None else torch.randn(x.shape, generator=generator, device=where,
                                                                 dtype=x.dtype).to(x.device)
        x = cps_step(x, x0, schedule[k - 1], schedule[k], eta, z)
    return x


def generator_state(world, cond, schedule, eta, x_start, noises, stop, all_steps=False):
    """Backward simulation to stop index k in 1..K: steps 1..k-1 without grad, step k WITH grad; returns x_k (n, ...).
    all_steps=True differentiates all k steps (the pathwise derivative of x_k w.r.t. theta, noise held fixed)."""
    with torch.set_grad_enabled(all_steps and torch.is_grad_enabled()):
        x = sample_student(world, cond, schedule, eta, x_start, stop=stop - 1, noises=noises)
    x0 = world.x0("generator", x, schedule[stop - 1], cond)
    if schedule[stop] == 0:
        return x0
    return cps_step(x, x0, schedule[stop - 1], schedule[stop], eta, noises[stop - 1])


@torch.no_grad()
def simulate_states(world, cond, schedule, eta, stop, micro_batch_size=None):
    """Detached student states x_k at stop index k for conditions cond (n,), in chunks."""
    x_start, noises = chain_noise(world, cond, len(schedule) - 1)
    return torch.cat([generator_state(world, cond[r], schedule, eta, x_start[r], [z[r] for z in noises], stop)
                      for r in micro_batches(cond.shape[0], micro_batch_size)])


# ---- stage 1: AC-DMD (eq. 8-12) ----


def ambient_renoise(world, x_s, sigma_s, sigma_t, eps):
    """Renoise a state at level sigma_s to sigma_t >= sigma_s (per sample): x_t = a x_s + sqrt(sigma_t^2 - a^2 sigma_s^2)
    eps, a = alpha_t / alpha_s. If x_s = alpha_s x0 + sigma_s eps', then x_t = alpha_t x0 + sigma_t eps'': the path's
    marginal at sigma_t (eq. 8, variance-correct)."""
    sigma_s, sigma_t = _col(sigma_s, x_s), _col(sigma_t, x_s)
    a = world.alpha(sigma_t) / world.alpha(sigma_s)
    return a * x_s + (sigma_t**2 - a**2 * sigma_s**2).clamp(min=0).sqrt() * eps


def renoise_levels(sigma_s, n, args, device, top=1.0):
    """The authors' renoise levels (n,): sigma_t ~ U[sigma_s + renoise_offset, top], clamped to [renoise_min,
    renoise_max]. Noise levels, unshifted (at sigma_s = 0.9, SD3's first step, 22% of the draws sit at 0.98)."""
    lo = sigma_s + args.renoise_offset
    hi = max(top, lo)
    return (lo + (hi - lo) * torch.rand(n, device=device)).clamp(args.renoise_min, args.renoise_max)


def real_x0(world, x_t, sigma_t, cond, guidance_scale, tilted=None):
    """The real score's x0-prediction: the teacher with CFG, or (tilted: a toy GaussianMixture) the exact tilted
    teacher's noisy marginal, E_p~[x0 | x_t]."""
    if tilted is None:
        return world.x0("teacher", x_t, sigma_t, cond, cfg=guidance_scale)
    return tilted.x0(x_t, sigma_t, world.path, cond).to(x_t.dtype)


def kl_matching_loss(x, grad):
    """0.5 sum_dims (x - sg(x - grad))^2, averaged over samples: its gradient w.r.t. x_i is grad_i / n, the per-sample
    KL gradient itself (dmd_loss averages over the dimensions too: 1 / (n D))."""
    return 0.5 * ((x - (x - grad).detach()) ** 2).flatten(1).sum(1).mean()


def acdmd_generator_loss(world, x_s, sigma_s, cond, sigma_t, eps, step_noise, guidance_scale, eta, dm_scale, tilted=None):
    """The AC-DMD generator loss of states x_s (n, ..., with grad) at level sigma_s (a number), renoised with eps to the
    levels sigma_t (n,) (eq. 9); a mean over the n rows.
    kl:   d loss / d x_s,i = a (s_fake - s_real)(x_t) / n, a = alpha_t / alpha_s, with the flow marginal score
          s(x, sigma) = (alpha x0 - x) / sigma^2: the un-normalised per-sample KL gradient;
    dmd2: the authors' step: teacher and fake each take one CPS step back from sigma_t to sigma_s with the shared noise
          step_noise, then the DMD2-normalised dmd_grad between x_s and the two results (= DMD2 exactly at sigma_s = 0)."""
    with torch.no_grad():
        x_t = ambient_renoise(world, x_s, sigma_s, sigma_t, eps)
        x0_real = real_x0(world, x_t, sigma_t, cond, guidance_scale, tilted)
        x0_fake = world.x0("fake", x_t, sigma_t, cond)
        if dm_scale == "kl":
            level_t = _col(sigma_t, x_s)
            a = world.alpha(level_t) / world.alpha(_col(sigma_s, x_s))
            grad = a * world.alpha(level_t) * (x0_fake - x0_real) / level_t**2  # a (s_fake - s_real)
        else:
            if sigma_s > 0:  # back to sigma_s: a CPS step is linear in x0, the difference stays along x0_real - x0_fake
                x0_real = cps_step(x_t, x0_real, sigma_t, sigma_s, eta, step_noise)
                x0_fake = cps_step(x_t, x0_fake, sigma_t, sigma_s, eta, step_noise)
            grad = dmd_grad(x_s, x0_real, x0_fake)
    return kl_matching_loss(x_s, grad) if dm_scale == "kl" else dmd_loss(x_s, grad)


def ambient_x0_target(world, x_s, sigma_s, sigma_t, eps):
    """Denoising target of eq. 10 in x0 form. x_t = ambient_renoise(x_s, sigma_s, sigma_t, eps); the conditional score
    (a x_s - x_t) / sigma_ts^2 (sigma_ts^2 = sigma_t^2 - a^2 sigma_s^2) equals the flow score (alpha_t x0* - x_t) / sigma_t^2 of
        x0* = x_s / alpha_s - alpha_t sigma_s^2 / (alpha_s^2 sigma_ts) eps,
    so E[x0* | x_t] is the student marginal's x0-prediction (appendix D). sigma_s = 0 gives x0* = x_s.
    Returns x_t, x0*, sigma_ts (n,)."""
    level_s, level_t = _col(sigma_s, x_s), _col(sigma_t, x_s)
    alpha_s, alpha_t = world.alpha(level_s), world.alpha(level_t)
    sigma_ts = (level_t**2 - (alpha_t / alpha_s) ** 2 * level_s**2).clamp(min=1e-12).sqrt()
    x_t = ambient_renoise(world, x_s, sigma_s, sigma_t, eps)
    target = x_s / alpha_s - alpha_t * level_s**2 / (alpha_s**2 * sigma_ts) * eps
    return x_t, target, sigma_ts.reshape(-1)


def ambient_fake_loss(world, x_s, sigma_s, cond, sigma_t, eps, weighting="clamped"):
    """Eq. 10 as a weighted velocity loss (a mean over rows and dims): |v - v*|^2 = world.loss_weight(sigma_t) |x0 - x0*|^2
    times min(1, 10 sigma_ts^2) (clamped: the authors' clamp(1 / sigma_ts^2, 0, 10) on |sigma_ts (v - v*)|^2) or
    (sigma_ts / sigma_t)^2 (ambient: omega_k = sigma_ts^2 / alpha_t^2 on the score error; dmd.py's fake_score_loss at
    sigma_s = 0). Both bound the target's variance as sigma_t -> sigma_s. Returns the loss and (x_t, x0_fake)."""
    x_t, target, sigma_ts = ambient_x0_target(world, x_s, sigma_s, sigma_t, eps)
    x0_fake = world.x0("fake", x_t, sigma_t, cond)
    per_sample = ((x0_fake - target) ** 2).flatten(1).mean(1) * world.loss_weight(sigma_t)  # |v - v*|^2, mean over dims
    weight = (10 * sigma_ts**2).clamp(max=1.0) if weighting == "clamped" else (sigma_ts / sigma_t) ** 2
    return (weight * per_sample).mean(), x_t, x0_fake


def consistency_levels(sigma_t, max_gap):
    """The consistency step's target levels max(sigma_t - Delta, 0), Delta ~ U{1, ..., round(1000 max_gap)} / 1000."""
    delta = torch.randint(1, round(1000 * max_gap) + 1, sigma_t.shape, device=sigma_t.device).to(sigma_t.dtype) / 1000
    return (sigma_t - delta).clamp(min=0.0)


def consistency_loss(world, x_t, sigma_t, h, cond, sigma_next, noises, kernel="ddpm", eta=0.9):
    """Eq. 11 with appendix F's two-sample estimator: from x_t (level sigma_t, fake x0-prediction h, with grad) take two
    independent reverse steps to sigma_next (the transitions use h detached, as the authors') and return
    mean_rows mean_dims (h'_1 - h)(h'_2 - h), unbiased for mean_dims (E h' - h)^2, which is 0 for a self-consistent
    denoiser (appendix E). kernel ddpm: the DDPM posterior step; cps: CPS at eta (the authors')."""
    step_eta = ddpm_eta(sigma_t, sigma_next) if kernel == "ddpm" else eta
    with torch.no_grad():
        x_next = [cps_step(x_t, h.detach(), sigma_t, sigma_next, step_eta, z) for z in noises]
    h1, h2 = (world.x0("fake", x, sigma_next, cond) for x in x_next)
    return ((h1 - h) * (h2 - h)).flatten(1).mean(1).mean()


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


def pick_stop(schedule):
    """A stop index k uniform in 1..K (one per batch, as the authors broadcast it)."""
    return int(torch.randint(1, len(schedule), (1,)))


def fake_update(world, args, opt_fake, x_s, sigma_s, cond, top=1.0):
    """One fake-score update (eq. 12) on detached states x_s (n, ...) at level sigma_s: ambient DSM at renoise levels in
    [sigma_s, top] + gamma * consistency, in chunks accumulated into one step. Returns (fake loss, consistency)."""
    n = x_s.shape[0]
    sigma_t = renoise_levels(sigma_s, n, args, x_s.device, top)
    eps = torch.randn_like(x_s)
    sigma_next = consistency_levels(sigma_t, args.consistency_max_gap)
    z1, z2 = torch.randn_like(x_s), torch.randn_like(x_s)
    opt_fake.zero_grad(set_to_none=True)
    fake_total, cons_total = 0.0, 0.0
    for r in micro_batches(n, args.micro_batch_size):
        loss, x_t, x0_fake = ambient_fake_loss(world, x_s[r], sigma_s, cond[r], sigma_t[r], eps[r], args.fake_weighting)
        cons = (consistency_loss(world, x_t, sigma_t[r], x0_fake, cond[r], sigma_next[r], (z1[r], z2[r]),
                                 args.consistency_kernel, args.eta) if args.gamma > 0 else loss.new_zeros(()))
        total = (loss + args.gamma * cons) * (x_t.shape[0] / n)  # chunk share of the batch mean
        check_finite(total, "fake_loss")
        total.backward()
        fake_total += loss.item() * x_t.shape[0] / n
        cons_total += cons.item() * x_t.shape[0] / n
    sync_and_clip(world.params("fake"), args.grad_clip)
    opt_fake.step()
    return fake_total, cons_total


def cold_update(world, args, schedule, opt_generator, tilted=None):
    """One stage 1 generator update: AC-DMD (eq. 9) at a random stop index. Every draw (stop index, conditions, the
    rollout's noises, renoise levels and noises) is made for the whole batch first, then the batch runs in micro-batches
    whose gradients accumulate: the same update as one pass. Returns logs (grad_norm: before clipping)."""
    n = args.batch_size
    k = pick_stop(schedule)
    cond = world.sample_cond(n)
    x_start, noises = chain_noise(world, cond, len(schedule) - 1)
    sigma_t = renoise_levels(schedule[k], n, args, x_start.device)
    eps, step_noise = torch.randn_like(x_start), torch.randn_like(x_start)
    opt_generator.zero_grad(set_to_none=True)
    total = 0.0
    for r in micro_batches(n, args.micro_batch_size):
        x_s = generator_state(world, cond[r], schedule, args.eta, x_start[r], [z[r] for z in noises], k)
        loss = acdmd_generator_loss(world, x_s, schedule[k], cond[r], sigma_t[r], eps[r], step_noise[r],
                                    args.guidance_scale, args.eta, args.dm_scale, tilted) * (x_s.shape[0] / n)
        check_finite(loss, "dm_loss")
        loss.backward()
        total += loss.item()
    grad_norm = sync_and_clip(world.params("generator"), args.grad_clip)
    opt_generator.step()
    return {"dm_loss": total, "student_step": k, "grad_norm": grad_norm}


# ---- stage 2: hybrid policy gradient with SubGRPO (eq. 13-18) ----


def group_noises(world, cond, big_k, group_size, subset_size, naive, generator=None):
    """Noise of a group rollout for cond (G * N,), groups of N consecutive rows sharing one condition.
    SubGRPO (eq. 16): per group a uniform subset S of M of the K-1 stochastic steps gets independent noise; the other
    steps, and the starting noise, share one draw per group. Naive GRPO: everything independent, S = all steps.
    Returns the starting noise (G N, ...), the K-1 step noises, and the mask (G N, K-1) of steps in S."""
    n = cond.shape[0]
    g = n // group_size
    x_start, noises = chain_noise(world, cond, big_k, generator)
    if naive:
        return x_start, noises, torch.ones(n, big_k - 1, dtype=torch.bool, device=x_start.device)
    mask = torch.zeros(g, big_k - 1, dtype=torch.bool)
    for j in range(g):
        mask[j, torch.randperm(big_k - 1, generator=generator)[:subset_size]] = True
    mask = mask.repeat_interleave(group_size, 0).to(x_start.device)
    share = lambda z: z[::group_size].repeat_interleave(group_size, 0)  # noqa: E731  (the group's first draw)
    x_start = share(x_start)
    noises = [torch.where(mask[:, k].reshape(-1, *[1] * (z.dim() - 1)), z, share(z)) for k, z in enumerate(noises)]
    return x_start, noises, mask


@torch.no_grad()
def rollout(world, cond, schedule, eta, x_start, noises, micro_batch_size=None, log_prob=None):
    """A detached K-step CPS trajectory [x_0, ..., x_{K-1}] and the clean samples x_K, in chunks; with log_prob (a form
    of transition_log_prob) also the sampling pass's log-probabilities (n, K-1) (PPO's old policy)."""
    big_k = len(schedule) - 1
    parts = []
    for r in micro_batches(cond.shape[0], micro_batch_size):
        states, logps = [x_start[r]], []
        for k in range(1, big_k):
            x = states[-1]
            x0 = world.x0("generator", x, schedule[k - 1], cond[r])
            mean = cps_step(x, x0, schedule[k - 1], schedule[k], eta, torch.zeros_like(x))
            states.append(mean + cps_std(schedule[k], eta) * noises[k - 1][r])  # = cps_step(..., noise)
            if log_prob is not None:
                logps.append(transition_log_prob(states[-1], mean, cps_std(schedule[k], eta), log_prob))
        parts.append((states, world.x0("generator", states[-1], schedule[-2], cond[r]), logps))
    states = [torch.cat([p[0][k] for p in parts]) for k in range(big_k)]
    x0 = torch.cat([p[1] for p in parts])
    if log_prob is None:
        return states, x0
    old = torch.stack([torch.cat([p[2][k] for p in parts]) for k in range(big_k - 1)], 1) if big_k > 1 else None
    return states, x0, old


def reward_terms(world, x0, cond):
    """The reward's terms [(weight, scores (n,)), ...] of clean samples: on text-to-image each weighted term of the
    spec (the authors normalise each term's advantages separately; the world decodes in chunks of decode_chunk), on
    the toy the one reward."""
    return list(world.reward_terms(x0, cond).values())


def group_advantages(rewards, group_size, kind, clip_value=0.0):
    """Advantages (n,) from rewards: a tensor (n,) or reward terms [(weight, (n,)), ...], in groups of group_size rows.
    center:     (r - mean) N / (N - 1) = r_i - mean of the others (an unbiased baseline), on the weighted sum;
    group-std:  (r - mean) / group std (GRPO as the paper writes it), on the weighted sum;
    global-std: the authors': per term (r - group mean) / (std over the batch + 1e-4), the weighted sum of those,
                standardised again over the batch ((A - mean) / (std + 1e-4); population stds).
    A group whose rewards are all equal gets zero advantages (no NaN); then clipped to +-clip_value (0: off)."""
    terms = [(1.0, rewards)] if torch.is_tensor(rewards) else list(rewards)
    if kind == "global-std":
        adv = 0.0
        for w, r in terms:
            g = r.reshape(-1, group_size).double()
            adv = adv + w * ((g - g.mean(1, keepdim=True)) / (g.std(unbiased=False) + 1e-4)).reshape(-1)
        adv = ((adv - adv.mean()) / (adv.std(unbiased=False) + 1e-4)).to(terms[0][1].dtype)
    else:
        r = sum(w * t for w, t in terms).reshape(-1, group_size)
        centered = r - r.mean(1, keepdim=True)
        if kind == "center":
            adv = (centered * group_size / (group_size - 1)).reshape(-1)
        elif kind == "group-std":
            std = r.std(1, keepdim=True)
            adv = torch.where(std > 0, centered / std.clamp(min=1e-12), torch.zeros_like(centered)).reshape(-1)
        else:
            raise ValueError(f"unknown advantage {kind!r}; valid: center, group-std, global-std")
    return adv.clamp(-clip_value, clip_value) if clip_value > 0 else adv


def policy_step_surrogate(world, cond, schedule, eta, k, x_prev, x_next, advantages, clip_range, old_log_prob=None,
                          log_prob="exact"):
    """PPO's clipped surrogate (n,) of step k's transition x_prev -> x_next (eq. 13): min(rho A, clip(rho, 1 +- eps) A),
    rho = pi_theta / pi_old; old_log_prob None: pi_old = pi_theta (rho = 1, the gradient is A grad log pi)."""
    x0 = world.x0("generator", x_prev, schedule[k - 1], cond)
    mean = cps_step(x_prev, x0, schedule[k - 1], schedule[k], eta, torch.zeros_like(x_prev))
    logp = transition_log_prob(x_next, mean, cps_std(schedule[k], eta), log_prob)
    ratio = (logp - (logp.detach() if old_log_prob is None else old_log_prob)).exp()
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages)


def det_surrogate(world, x0, cond, det_weight=1.0, det_margin=math.inf):
    """L_det's surrogate to maximise (n,) on the deterministic last step's x0 (with grad): det_weight min(r - margin, 0)
    = -det_weight relu(margin - r) (the authors' hinge; margin inf: det_weight r, eq. 15)."""
    r = world.reward(x0, cond)
    return det_weight * (r if math.isinf(det_margin) else -F.relu(det_margin - r))


def hybrid_policy_objective(world, cond, schedule, eta, states, mask, advantages, clip_range, use_det=True,
                            old_log_probs=None, log_prob="exact", det_weight=1.0, det_margin=math.inf):
    """The hybrid policy-gradient surrogates to MAXIMISE (eq. 14), means over rows: the stochastic part
    (K-1)/M mean_i sum_{k in S_i} surrogate_ik (eq. 17, on-policy its gradient is A_i grad log pi) and the deterministic
    part mean_i L_det(G(x_{K-1})) with the sampled x_{K-1} held fixed (eq. 15, appendix G.2). Returns (stoc, det)."""
    big_k = len(schedule) - 1
    m = mask.sum(1).clamp(min=1).to(states[0].dtype)  # |S| per row
    stoc = states[0].new_zeros(states[0].shape[0])
    for k in range(1, big_k):
        old = None if old_log_probs is None else old_log_probs[:, k - 1]
        surr = policy_step_surrogate(world, cond, schedule, eta, k, states[k - 1], states[k], advantages, clip_range, old,
                                     log_prob)
        stoc = stoc + torch.where(mask[:, k - 1], surr, torch.zeros_like(surr))
    stoc = ((big_k - 1) / m * stoc).mean()
    if not use_det:
        return stoc, stoc.new_zeros(())
    x0 = world.x0("generator", states[-1], schedule[-2], cond)
    return stoc, det_surrogate(world, x0, cond, det_weight, det_margin).mean()


def dm_fresh_batch(world, args, schedule, opt_fake, tilted):
    """Stage 2's DM term on a fresh batch (rl_dm all-steps: final samples through all K steps; random-stop: stage 1's
    AC-DMD): fake update(s) first, then the generator loss back-propagated in chunks (scaled by dm_weight_rl;
    the caller steps). Returns (dm loss, fake loss, consistency, k)."""
    n = args.batch_size
    big_k = len(schedule) - 1
    all_steps = args.rl_dm == "all-steps"
    top = args.rl_renoise_max if all_steps else 1.0
    fakes = []
    for _ in range(args.fake_updates_per_rl_step):
        k = big_k if all_steps else pick_stop(schedule)
        cond = world.sample_cond(n)
        fakes.append(fake_update(world, args, opt_fake, simulate_states(world, cond, schedule, args.eta, k,
                                                                          args.micro_batch_size),
                                 schedule[k], cond, top))
    k = big_k if all_steps else pick_stop(schedule)
    cond = world.sample_cond(n)
    x_start, noises = chain_noise(world, cond, big_k)
    sigma_t = renoise_levels(schedule[k], n, args, x_start.device, top)
    eps, step_noise = torch.randn_like(x_start), torch.randn_like(x_start)
    total = 0.0
    for r in micro_batches(n, args.micro_batch_size):
        x_s = generator_state(world, cond[r], schedule, args.eta, x_start[r], [z[r] for z in noises], k, all_steps)
        loss = acdmd_generator_loss(world, x_s, schedule[k], cond[r], sigma_t[r], eps[r], step_noise[r],
                                    args.guidance_scale, args.eta, args.dm_scale, tilted) * (x_s.shape[0] / n)
        check_finite(loss, "dm_loss")
        (args.dm_weight_rl * loss).backward()
        total += loss.item()
    return total, sum(f for f, _ in fakes) / len(fakes), sum(c for _, c in fakes) / len(fakes), k


def rl_update(world, args, schedule, opt_generator, opt_fake, tilted=None):
    """One stage 2 update (eq. 18, Algorithm 1 lines 6-13): rollout with SubGRPO's noise, rewards, the fake's update,
    advantages, then --ppo-epochs optimiser steps on  dm_weight_rl * DM - beta (L_stoc + L_det), in chunks.
    tilted (dm_target tilted): DM only, against the exact tilted teacher. Returns logs (grad_norm: the generator's
    gradient norm before clipping, at the last optimiser step)."""
    big_k = len(schedule) - 1
    n = args.groups * args.group_size
    policy = tilted is None
    final_step = args.rl_dm == "final-step"
    if not (policy or final_step):  # DM only, on fresh batches: no rollout needed
        opt_generator.zero_grad(set_to_none=True)
        dm, fake, cons, k = dm_fresh_batch(world, args, schedule, opt_fake, tilted)
        grad_norm = sync_and_clip(world.params("generator"), args.grad_clip)
        opt_generator.step()
        return {"dm_loss": dm, "fake_loss": fake, "consistency": cons, "student_step": k, "stoc": 0.0, "det": 0.0,
                "grad_norm": grad_norm}
    cond = world.sample_cond(args.groups).repeat_interleave(args.group_size, 0)  # one condition per group
    x_start, noises, mask = group_noises(world, cond, big_k, args.group_size, args.subset_size, args.naive_grpo)
    states, x0, old_logps = rollout(world, cond, schedule, args.eta, x_start, noises, args.micro_batch_size,
                                    args.log_prob)
    with torch.no_grad():
        terms = reward_terms(world, x0, cond)  # the text-to-image world decodes in chunks of micro_batch_size
        rewards = sum(w * s for w, s in terms)
    logs = {"reward": rewards.mean().item()}
    if final_step:  # the fake tracks the rollout's clean samples (the authors: once per update, before the advantages)
        fakes = [fake_update(world, args, opt_fake, x0, 0.0, cond, args.rl_renoise_max)
                 for _ in range(args.fake_updates_per_rl_step)]
        logs.update(fake_loss=sum(f for f, _ in fakes) / len(fakes), consistency=sum(c for _, c in fakes) / len(fakes))
    adv = group_advantages(terms, args.group_size, args.advantage, args.advantage_clip) if policy else None
    m = mask.sum(1).clamp(min=1).to(x0.dtype)  # |S| per row
    for _ in range(args.ppo_epochs):
        sigma_t = renoise_levels(0.0, n, args, x0.device, args.rl_renoise_max)
        eps = torch.randn_like(x0)
        opt_generator.zero_grad(set_to_none=True)
        stoc_total, det_total, dm_total = 0.0, 0.0, 0.0
        for r in micro_batches(n, args.micro_batch_size):
            rows = x0[r].shape[0]
            for k in range(1, big_k) if policy else ():  # one backward per step: one forward's activations at a time
                chosen = mask[r, k - 1]
                if not bool(chosen.any()):
                    continue
                surr = policy_step_surrogate(world, cond[r], schedule, args.eta, k, states[k - 1][r], states[k][r],
                                             adv[r], args.clip_range, old_logps[r, k - 1], args.log_prob)
                stoc = ((big_k - 1) / m[r] * torch.where(chosen, surr, torch.zeros_like(surr))).sum() / n
                check_finite(stoc, "rl_loss")
                (-args.beta * stoc).backward()
                stoc_total += stoc.item()
            if not (final_step or (policy and args.reward_backprop)):
                continue
            x0_last = world.x0("generator", states[-1][r], schedule[-2], cond[r])  # the deterministic step, with grad
            # L_det (through the decode and the reward) and AC-DMD (through the teacher and fake) each back-propagate
            # to a detached copy of the output, one graph at a time; then the step's own backward takes their sum.
            out = x0_last.detach().requires_grad_(True)
            if policy and args.reward_backprop:
                det = det_surrogate(world, out, cond[r], args.det_weight, args.det_margin).sum() / n
                check_finite(det, "rl_loss")
                (-args.beta * det).backward()
                det_total += det.item()
            if final_step:
                dm = acdmd_generator_loss(world, out, 0.0, cond[r], sigma_t[r], eps[r], None, args.guidance_scale,
                                          args.eta, args.dm_scale, tilted) * (rows / n)
                check_finite(dm, "dm_loss")
                (args.dm_weight_rl * dm).backward()
                dm_total += dm.item()
            x0_last.backward(out.grad)
        if not final_step:
            dm_total, fake, cons, k = dm_fresh_batch(world, args, schedule, opt_fake, tilted)
            logs.update(fake_loss=fake, consistency=cons, student_step=k)
        grad_norm = sync_and_clip(world.params("generator"), args.grad_clip)
        opt_generator.step()
    return {**logs, "dm_loss": dm_total, "stoc": stoc_total, "det": det_total, "grad_norm": grad_norm}


# ---- generator EMA (the authors': utils/ema.py, dmd_trainer.py, rtdmd_trainer.py) ----


# Copied from dmd.py: ema_update
@torch.no_grad()
def ema_update(ema, params, decay):
    """Generator EMA: ema <- decay * ema + (1 - decay) * params, tensor by tensor (the fp32 adapter weights)."""
    for e, p in zip(ema, params, strict=True):
        e.lerp_(p.detach(), 1.0 - decay)


def ema_ramp_decay(update, max_decay):
    """The authors' stage 2 ramp: the decay min((1 + u) / (10 + u), max_decay) after update u."""
    return min((1 + update) / (10 + update), max_decay)


def ema_update_rl(ema_params, params, update, max_decay, every, repeats):
    """Stage 2's EMA after update u (1, 2, ...): when (u + 1) % every == 0, `repeats` EMA updates toward the same
    weights at the ramp's decay d(u), i.e. one update at decay d(u)^repeats (the authors call their EMA once per
    sub-batch, 16 times per update, with the update counter u; it fires on every 8th)."""
    if (update + 1) % every == 0:
        ema_update(ema_params, params, ema_ramp_decay(update, max_decay) ** repeats)


def ema_weights(world, ema_params):
    """Within the block the generator runs with the EMA weights (None: unchanged); its own weights come back after."""
    if ema_params is None:
        return contextlib.nullcontext()
    return swapped_params(world.params("generator"), ema_params)


def train_step(world, args, schedule, stage, opt_generator, opt_fake, ema=None, tilted=None):
    """One RTDMD iteration (algorithm 1). Stage 1: TTUR fake-score updates on fresh states at random stop indices, then
    one AC-DMD generator update, the EMA updated after every fake update (the last one after the generator's, as the
    authors' per-global-step EMA). Stage 2: one rl_update (its own fake updates)."""
    if stage == 2:
        return rl_update(world, args, schedule, opt_generator, opt_fake, tilted)
    fake, cons = [], []
    for i in range(args.fake_updates_per_step):
        k = pick_stop(schedule)
        cond = world.sample_cond(args.batch_size)
        x_s = simulate_states(world, cond, schedule, args.eta, k, args.micro_batch_size)
        f, c = fake_update(world, args, opt_fake, x_s, schedule[k], cond)
        fake.append(f)
        cons.append(c)
        if ema is not None and i < args.fake_updates_per_step - 1:
            ema_update(ema, world.params("generator"), args.ema_decay)
    logs = cold_update(world, args, schedule, opt_generator)  # stage 1 distils the (untilted) teacher
    if ema is not None:
        ema_update(ema, world.params("generator"), args.ema_decay)
    return {**logs, "fake_loss": sum(fake) / len(fake), "consistency": sum(cons) / len(cons)}


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


def resolve_stage2(args):
    """The defaults that follow from other options (after resolve_defaults): the stage 2 recipe's for the kind of world
    (RECIPE_DEFAULTS), subset_size from K (min(2, K - 1)), and num_steps = cold_steps + rl_steps. A resumed run given
    --num-steps N (resume_args has checked N against the run's own) lengthens its RL stage: rl_steps = N - cold_steps."""
    if args.model not in MODELS or args.stage2_recipe not in STAGE2_RECIPES:
        return args  # validate() names the valid ones
    recipe = RECIPE_DEFAULTS[(args.stage2_recipe, "toy2d" if args.model == "toy2d" else "t2i")]
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.subset_size is None:
        args.subset_size = max(1, min(2, args.student_steps - 1))
    if args.cold_steps is not None and args.rl_steps is not None:
        if args.num_steps is None:
            args.num_steps = args.cold_steps + args.rl_steps
        elif args.resume is not None:
            args.rl_steps = args.num_steps - args.cold_steps
    return args


def validate(args):
    """Every check that can fail before any work starts, on the options as main() resolves them (resolve_stage2 is
    applied to a copy here)."""
    if args.model == "sdxl":
        raise ValueError("RTDMD's CPS sampler needs a flow model (x = (1 - sigma) x0 + sigma eps); sdxl is a VP / eps model. "
                         f"Use one of {', '.join(m for m in MODELS if m != 'toy2d')} (or dmd.py / dmdr.py / gdmd.py for sdxl)")
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
    if args.stage2_recipe not in STAGE2_RECIPES:
        raise ValueError(f"unknown stage2_recipe {args.stage2_recipe!r}; valid: {', '.join(STAGE2_RECIPES)}")
    args = resolve_stage2(dataclasses.replace(args))
    if args.model == "toy2d":
        import toy2d

        if args.toy_mixture not in toy2d.MIXTURES:
            raise ValueError(f"unknown toy mixture {args.toy_mixture!r}; valid mixtures: {', '.join(toy2d.MIXTURES)}")
        if args.toy_path not in toy2d.PATHS:
            raise ValueError(f"unknown toy path {args.toy_path!r}; valid paths: {', '.join(toy2d.PATHS)}")
        if args.toy_path != "flow":
            raise ValueError("RTDMD's CPS sampler needs a flow world (x = (1 - sigma) x0 + sigma eps); use --toy-path flow")
        if args.toy_reward not in toy2d.REWARDS:
            raise ValueError(f"unknown toy reward {args.toy_reward!r}; valid rewards: {', '.join(toy2d.REWARDS)}")
    else:
        validate_t2i(args)
    for name in (*MODEL_DEFAULTS["toy2d"], *RECIPE_DEFAULTS[("paper", "toy2d")], "subset_size", "num_steps"):
        if getattr(args, name) is None:
            raise ValueError(f"{name} has no default for model {args.model}: pass --{name.replace('_', '-')}")
    check_world_options(args)
    check_device(args.device)
    if not 2 <= args.student_steps <= 8:
        raise ValueError(f"student_steps must be in 2..8 (RTDMD needs a stochastic step), got {args.student_steps}")
    if not 0.0 <= args.eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {args.eta}")
    for name in ("cold_steps", "rl_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, name)}")
    if args.num_steps != args.cold_steps + args.rl_steps:
        raise ValueError(f"num_steps {args.num_steps} is not cold_steps + rl_steps = {args.cold_steps + args.rl_steps}: "
                         "a new run sets its stages with --cold-steps and --rl-steps; --num-steps N extends a run "
                         "(with --resume RUN_DIR) to N updates")
    if args.num_steps < 1:
        raise ValueError("cold_steps + rl_steps must be >= 1: the run has no update")
    for name in ("batch_size", "fake_updates_per_step", "fake_updates_per_rl_step", "groups", "ppo_epochs",
                 "ema_every_rl", "ema_repeats_rl", "log_every", "eval_every", "eval_samples", "micro_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)}")
    if args.group_size < 2:
        raise ValueError(f"group_size must be >= 2 (group advantages need two trajectories), got {args.group_size}")
    if not 1 <= args.subset_size <= args.student_steps - 1:
        raise ValueError(f"subset_size M must be in 1..K-1 = 1..{args.student_steps - 1}, got {args.subset_size}")
    if args.rl_steps > 0 and args.eta == 0.0 and args.dm_target == "teacher":
        raise ValueError("eta = 0 is the deterministic (Euler) sampler: stage 2 has no stochastic policy to train. "
                         "Use eta > 0 (paper: 0.9), or --rl-steps 0")
    for name in ("lr_generator", "lr_fake", "lr_generator_rl"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(args, name)}")
    for name in ("gamma", "beta", "guidance_scale", "advantage_clip", "clip_range", "dm_weight_rl", "det_weight",
                 "det_margin", "grad_clip", "renoise_offset", "weight_decay_generator", "weight_decay_generator_rl"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, name)}")
    for name in ("ema_decay", "ema_decay_rl"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(args, name)}")
    if not 0.0 <= args.renoise_min < args.renoise_max <= 1.0:
        raise ValueError(f"need 0 <= renoise_min < renoise_max <= 1, got {args.renoise_min}, {args.renoise_max}")
    if not args.renoise_offset < args.rl_renoise_max <= 1.0:
        raise ValueError(f"need renoise_offset < rl_renoise_max <= 1, got {args.rl_renoise_max}")
    if not 0.001 <= args.consistency_max_gap < 1.0:
        raise ValueError(f"consistency_max_gap must be in [0.001, 1), got {args.consistency_max_gap}")
    choices = {"dm_scale": ("kl", "dmd2"), "advantage": ("center", "group-std", "global-std"), "log_prob": ("mse", "exact"),
               "rl_dm": ("final-step", "all-steps", "random-stop"), "dm_target": ("teacher", "tilted"),
               "fake_weighting": ("clamped", "ambient"), "consistency_kernel": ("ddpm", "cps")}
    for name, valid in choices.items():
        if getattr(args, name) not in valid:
            raise ValueError(f"{name} must be one of {', '.join(valid)}, got {getattr(args, name)!r}")
    if args.dm_target == "tilted":
        if args.model != "toy2d" or args.toy_reward not in ("linear", "quadratic"):
            raise ValueError("--dm-target tilted needs the exact tilted teacher: the toy with a linear or quadratic reward "
                             "(on images it would need log E_p[exp(beta r(x0)) | x_t], see the docstring)")
        if args.guidance_scale != 1.0:
            raise ValueError("--dm-target tilted is the tilt of the unguided teacher: use --guidance-scale 1")


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


@torch.no_grad()
def evaluate(world, schedule, eta, n, seed, beta=None):
    """Student samples (CPS, the training sampler) from fixed noise, and the world's metrics (vs the tilted teacher too)."""
    gen = torch.Generator().manual_seed(seed)
    cond = world.sample_cond(n, gen)
    samples = sample_student(world, cond, schedule, eta, world.noise(cond, gen), generator=gen)
    return samples, cond, world.evaluate(samples, cond, beta=beta)


def make_optimizers(world, args, stage):
    """Fresh AdamW for both adapters at the stage's rates (stage 2 is a new run in the authors' code)."""
    lr, wd = (args.lr_generator, args.weight_decay_generator) if stage == 1 else (args.lr_generator_rl,
                                                                                  args.weight_decay_generator_rl)
    return (torch.optim.AdamW(world.params("generator"), lr, weight_decay=wd),
            torch.optim.AdamW(world.params("fake"), args.lr_fake, weight_decay=0.0))


def main(args, world=None):
    """Run the method (or, --resume, continue a run). world: an already built world (tests, notebooks)."""
    ckpt = None
    if args.resume is not None:
        args, ckpt = resume_args(args, "rtdmd")
    args = resolve_stage2(resolve_defaults(args))
    validate(args)
    rank, world_size, device = setup_distributed(args)
    lead = rank == 0  # data parallel: rank 0 alone evaluates, logs and saves
    run_dir = (Path(args.resume) if ckpt else run_dir_path(args, "rtdmd")) if lead else None  # checked before any work
    torch.manual_seed(args.seed)
    world = world if world is not None else make_world(args, device)
    if not world.is_flow:
        raise ValueError("RTDMD's CPS sampler needs a flow world (world.is_flow is False)")
    if world_size > 1:
        torch.manual_seed(args.seed + 1000 * rank)  # data parallel: each rank its own noise, prompts and levels
    schedule = student_schedule(world, args.student_steps)
    beta = args.beta if args.model == "toy2d" and args.toy_reward in ("linear", "quadratic") else None
    tilted = world.reward_fn.tilt(world.mixture, args.beta) if args.dm_target == "tilted" else None
    total = args.num_steps  # = cold_steps + rl_steps
    opt_generator, opt_fake = make_optimizers(world, args, 1)
    optimizers = {"generator": opt_generator, "fake": opt_fake}
    ema = [p.detach().clone() for p in world.params("generator")] if args.ema_decay > 0 else None
    first_step, history = 1, []
    if ckpt is not None:  # every rank restores the same adapters, optimiser states, EMA and RNG states; a checkpoint
        # in stage 2 holds stage 2's optimiser states (with their rates) and EMA; one taken at step cold_steps still
        # holds stage 1's, and the switch below happens at the start of update cold_steps + 1, as in an unbroken run
        state = load_training_state(world, ckpt, optimizers, {})
        ema, first_step = state["ema"], state["step"] + 1
        history = read_history(run_dir, state["step"]) if lead else []
    if lead:  # a resumed run rewrites its config with the extended num_steps / rl_steps
        run_dir.mkdir(parents=True, exist_ok=ckpt is not None)
        (run_dir / "config.json").write_text(json.dumps({"method": "rtdmd", **asdict(args), "provenance": provenance(device)},
                                                        indent=2))
        print(f"rtdmd: {'resuming' if ckpt else 'run'} {run_dir} (from step {first_step})", file=sys.stderr)
    log = open(run_dir / "metrics.jsonl", "a") if lead else open(os.devnull, "w")

    def record(entry):
        history.append(entry)
        log.write(json.dumps(entry) + "\n")
        log.flush()

    def training_state(step, rng_states):
        return {"step": step, "stage": 1 if step <= args.cold_steps else 2, "schedulers": {}, "rng": rng_states,
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}

    def evaluation():
        with ema_weights(world, ema):
            return evaluate(world, schedule, args.eta, args.eval_samples, args.seed + 1, beta)

    if ckpt is None:
        rng_states = gathered_rng_states()  # every rank's (a collective)
        if lead:
            _, _, metrics = evaluation()
            record({"step": 0, "stage": 1, **metrics})
            save_checkpoint(world, run_dir, 0, training_state(0, rng_states), ema)
    start, shown, samples = time.time(), {}, None
    stage_names = {1: "rtdmd stage 1 (AC-DMD)", 2: f"rtdmd stage 2 ({args.stage2_recipe})"}
    bar = tqdm(range(first_step, total + 1), desc=stage_names[1 if first_step <= args.cold_steps else 2],
               disable=not (args.progress and lead), dynamic_ncols=True, initial=first_step - 1, total=total)
    for step in bar:
        stage = 1 if step <= args.cold_steps else 2
        if step == args.cold_steps + 1:  # the switch to stage 2
            if ema is not None:  # stage 2 starts from the cold start's EMA weights (the authors load generator_ema.pt)
                with torch.no_grad():
                    for p, e in zip(world.params("generator"), ema, strict=True):
                        p.copy_(e)
            ema = [p.detach().clone() for p in world.params("generator")] if args.ema_decay_rl > 0 else None
            opt_generator, opt_fake = make_optimizers(world, args, 2)
            optimizers.update(generator=opt_generator, fake=opt_fake)
            bar.set_description(stage_names[2])
            if lead and not args.progress:
                print(f"rtdmd: stage 2 ({args.stage2_recipe} recipe, beta={args.beta}) from step {step}", file=sys.stderr)
        try:
            losses = train_step(world, args, schedule, stage, opt_generator, opt_fake, ema if stage == 1 else None, tilted)
        except FloatingPointError as err:
            log.close()
            where = run_dir / "checkpoint" if lead else "rank 0's run directory"
            raise FloatingPointError(f"{err} at step {step} (stage {stage}); stopped. The last good checkpoint is {where}"
                                     ) from None
        if stage == 2 and ema is not None:
            ema_update_rl(ema, world.params("generator"), step - args.cold_steps, args.ema_decay_rl, args.ema_every_rl,
                          args.ema_repeats_rl)
        if step % args.log_every == 0:
            record({"step": step, "stage": stage, "time": time.time() - start, "lr": opt_generator.param_groups[0]["lr"],
                    **losses})
            bar.set_postfix(dm=f"{losses['dm_loss']:.2e}",
                            **({"reward": f"{losses['reward']:.3f}"} if "reward" in losses else {}), **shown)
        if step % args.eval_every == 0 or step == args.cold_steps or step == total:
            rng_states = gathered_rng_states()  # every rank's (a collective); evaluation draws from its own generator
            if lead:
                samples, cond, metrics = evaluation()
                record({"step": step, "stage": stage, "time": time.time() - start, **metrics})
                shown = {"eval_reward": f"{metrics['mean_reward']:.3f}",
                         **({"ed": f"{metrics['energy_distance']:.4f}"} if "energy_distance" in metrics else {}),
                         **({"ed_tilted": f"{metrics['energy_distance_tilted']:.4f}"}
                            if "energy_distance_tilted" in metrics else {})}
                bar.set_postfix(dm=f"{losses['dm_loss']:.2e}", **shown)
                save_checkpoint(world, run_dir, step, training_state(step, rng_states), ema)
            if step == args.cold_steps:
                world.plot_samples(samples, run_dir / "samples_cold_start.png",
                                   f"rtdmd after stage 1 (AC-DMD), step {args.cold_steps}", beta=beta)
    log.close()
    if not lead:  # data parallel: the other ranks stop here; rank 0 writes the figures
        return {"run_dir": None, "history": history, "final": history[-1] if history else {}, "world": world, "ema": ema}

    if samples is None:  # a resumed run that had nothing left to do
        samples, _, _ = evaluation()
    world.plot_samples(samples, run_dir / "samples.png",
                       f"rtdmd, {args.student_steps}-step student, beta={args.beta}, step {total}", beta=beta)
    world.plot_curves(history, ["dm_loss", "fake_loss", "consistency", "reward", "energy_distance",
                                "energy_distance_tilted", "mean_reward", "teacher_logp"], run_dir / "curves.png", "rtdmd")
    final = {k: v for k, v in history[-1].items()}
    print(f"rtdmd: done in {time.time() - start:.1f} s -> {run_dir}")
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return {"run_dir": run_dir, "history": history, "final": final, "world": world, "ema": ema}


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
