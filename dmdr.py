"""DMDR: Distribution Matching Distillation meets Reinforcement Learning (Jiang et al., v1 and v2), two stages in one command.

    python dmdr.py                                   # toy world: ring8, linear reward, 1-step student, stage 1 + stage 2 (ReFL)
    python dmdr.py --rl dpo                          # stage 2 with Diffusion-DPO pairs instead of ReFL (also: grpo, none)
    python dmdr.py --no-dmd                          # "RL only" ablation (paper fig. 4): stage 2 without the DMD loss
    python dmdr.py --no-rt-dm --no-dyna-dg --no-dyna-rs --stage2-steps 0 --lora-scale-f 1   # plain DMD2 (= dmd.py)
    python dmdr.py --student-steps 4 --sampler ode   # a 4-step student with the authors' ODE backward simulation
    python dmdr.py --model sd3-medium                # SD3-Medium, the authors' recipe (GPU; CLIP + HPSv2.1: pip install hpsv2)
    python dmdr.py --model sd3-medium --t2i-reward clip:0.3:0.7 --model-path DIR  # without hpsv2, local weights
    torchrun --nproc_per_node 8 dmdr.py --model sd3-medium  # data parallel (--batch-size is per GPU, 8 in the paper)
    python dmdr.py --model sd3-medium --micro-batch-size 2  # the same updates in chunks of 2 (gradients accumulated)
    python dmdr.py --resume runs/dmdr__toy2d__0__<time>     # continue a stopped run exactly, in its own directory
    python dmdr.py --resume runs/dmdr__toy2d__0__<time> --stage2-steps 600   # ... with a longer stage 2
    python dmdr.py --help                            # every option, with its default

A run writes runs/dmdr__<model>__<seed>__<time>/: config.json (the options, git commit, package versions, device),
metrics.jsonl (losses, lr, gradient norm, DynaDG scale, rewards, evaluation metrics), checkpoint/ (the latest good
generator and fake adapters, and the training state --resume continues from: optimisers, step, DPO's reference, RNG
states; with --ema-decay, generator/ is the EMA and raw/generator/ the trained weights), samples_stage1.png and
samples_stage2.png (student samples after each stage over the teacher's contours), curves.png (losses, reward, teacher
log-density, energy distance).

The algorithm (paper v2 section numbers and equations; the authors' values: notes/recipes.md sections 1-2):
    DMD2 backbone (sec. 2.1, eq. 1): a K-step student G = teacher + generator adapter; a fake score (teacher + fake
        adapter) trained with the diffusion loss on the student's samples, 5 fake updates per generator update (TTUR);
        normalised DMD gradient (p_real - p_fake) / mean|p_real| applied through 0.5 * mse(x, sg(x - grad)).
        Backward simulation, --sampler:
        sde  DMD2's: pick a step k, run the steps before it without grad (x0 = G(x, sigma_j), renoised to sigma_{j+1}
             with fresh noise), train the generator's x0 at step k; the fake trains on such x0 of random steps.
        ode  the authors' SD3 scripts (`--sample-type ode`): a deterministic Euler rollout of all K steps (no grad,
             no CFG) gives the FINAL sample; it is re-noised with fresh noise to one of the K student levels (drawn per
             sample) and the generator's x0 from there carries the grad; the fake trains on the final samples.
             The student is then sampled with the same Euler rollout (the authors' sampler in ode mode).
        With K = 1 the two are the same thing.
    Stage 1, cold start:
        RT-DM (sec. 2.4, eq. 4): the per-sample DMD gradient is multiplied by w_i = exp(beta r_i / ||r||), r_i the reward
            (no gradient) of the sample's COMPLETE K-step rollout; the weights are renormalised to mean 1 (a constant
            reward gives exactly plain DMD). The paper leaves ||r|| open. Ours (--rt-dm-norm std): the batch's standard
            deviation of r, so that the weights are invariant to r -> r + c and r -> a r (a > 0); the paper-literal
            uncentred RMS (--rt-dm-norm rms) makes them depend on the reward's offset: CLIP / HPS cosines (mean 0.2, std
            0.01) give weights within ~0.9-1.1, a tilt 20x weaker than the std form's (std / rms = 0.05), a near no-op.
            What RT-DM is: a reweighting of the DMD dynamics, not a new target. Eq. 4's second line does not follow
            from its first: multiplying each sample's gradient s_real - s_fake by a positive weight does not move the
            gradient's zero, so with exact scores the student still converges to the UNTILTED teacher p (where
            s_fake = s_real for every sample), never to p exp(r) / Z. What it changes is the path: samples with a high
            reward take larger steps, so at a fixed budget the reward can be higher (the paper's fig. 5 is at a fixed
            budget). Both are measured on the toy (below): the fixed point holds, the fixed-budget gain does not show.
        DynaDG (sec. 2.5): real score = teacher + lora_scale_r(step) * FAKE adapter (with CFG), with
            lora_scale_r(step) = lora_scale_r0 * 0.5 (1 + cos(pi step / dynamic_steps)), 0 from dynamic_steps on;
            fake score = teacher + lora_scale_f * fake adapter (also the scale the fake-score loss trains it at).
        DynaRS (sec. 2.5): the noise level of the DMD renoise and of the fake-score update is drawn directly as
            sigma ~ Beta(a_c, b_c), a_c = 1 + (a - 1) c, b_c = 1 + (b - 1) c, c = 0.5 (1 + cos(pi min(step / dynamic_steps,
            1))): Beta(4, 1.5) (mean 0.73, high noise) at step 0, U(0, 1) from dynamic_steps on. As the authors draw it:
            no timestep shift and no mapping into DMD2's [0.02, 0.98] (sigma is the network's time; ours: floored at
            0.001, the authors' lowest level). --no-dyna-rs: DMD2's levels (pre-shift t ~ U[0.02, 0.98] for the DMD
            renoise, U(0, 1) for the fake, both through the world's shift).
        The schedules count generator updates over both stages (step 0 = the first update of stage 1).
    Stage 2, joint DMD + RL (sec. 2.3, eq. 3): L = L_dmd + lambda_rl * L_rl, with L_rl one of
        refl  ReFL: the hinge mean relu(margin - r(x0)) (the authors' relu(0.7 - s)), the reward's gradient through the
              generator's x0 at the backward-simulated input. Text-to-image: the caps of --t2i-reward are the hinge
              (clip:0.3:0.7 is 0.3 relu(0.7 - clip) up to a constant) and lambda_rl = 1 (the authors add the hinges to the
              DMD loss with weights 0.3 each, no further factor).
        dpo   Diffusion-DPO: groups of complete rollouts, winner = best and loser = worst reward of each group; both are
              noised with shared noise to a student level and the generator's denoising errors are compared with
              those of the reference (the generator frozen at the start of stage 2)
        grpo  group-normalised REINFORCE: advantages normalised within each group of rollouts (GRPO's), times the
              log-probabilities of the stochastic sampler's renoise transitions N(alpha x0_k, sigma_{k+1}^2 I), one
              policy update per rollout. (With one update per rollout PPO's ratio is exactly 1 and its clip never acts,
              so there is none. The rollouts use the sde sampler whatever --sampler is: the ode one has no density.)
        none  keep distilling
    --no-dmd drops L_dmd in stage 2 (the "RL only" ablation; the fake score is then not updated).
    Stage 2 has its own batch size and learning rates where the authors' scripts do (SD3: 4, 5e-7 / 2e-7).

Measured on the toy (ring8, s = 0.25, linear reward r = x_1; teacher samples: mean reward 0, log-density -2.13;
energy-distance floor 0.0013; tests/test_dmdr_claims.py and tests/test_dmdr_claims_stage2.py; seeds 0 / 1 / 2):
    `python dmdr.py` (1-step student, 600 + 300 updates of 256): 34 s of CPU on one thread (83 s wall on 2 busy
        cores); seed 0: energy distance 1.44 -> 0.050 after stage 1 (8 modes), then reward 0.67 (from -0.06) at
        log-density -4.7 (from -4.2), 8 modes, after stage 2.
    stage 1, 600 updates from the teacher-initialised student (energy distance 1.44: every sample on the mixture mean):
        RT-DM 0.053 / 0.044 / 0.048, plain DMD (with DynaDG + DynaRS) 0.032 / 0.023 / 0.021; mean reward at updates
        200 / 400 / 600: RT-DM 0.03 -0.12 -0.09 | 0.18 -0.15 -0.25 | 0.01 0.01 0.21, DMD -0.02 0.05 -0.15 | 0.08 0.04
        -0.03 | -0.08 -0.02 -0.12. Not reproduced: RT-DM's faster preference alignment at a fixed budget (v2 fig. 5).
        RT-DM's fixed point, 1600 updates: energy distance to p 0.035 / 0.025 / 0.023, to the tilted teacher its weights
        would imply (beta / std_p(r) = 0.69) 0.50 / 0.65 / 0.67, mean reward over updates 800-1600 -0.02 / 0.04 / -0.07
        (the tilt's: 1.18). RT-DM slows the escape from the collapse (its std-normalised weights are as strong on a
        collapsed batch as on a diverse one) and, with K >= 2, destabilises the toy: K = 2 diverges on seeds 0 and 1
        with either ||r|| (and at beta 0.5), K = 4 ode on seed 1 with dynamic_steps 150.
    cold start (v1 table 4, v2 fig. 6), no RT-DM, lora_scale_f 2 in every arm, energy distance at updates 150 / 300 /
        600 (dynamic_steps 300), mean of seeds 0-2: plain 0.33 / 0.18 / 0.016, DynaDG 0.36 / 0.068 / 0.031, DynaRS
        1.10 / 0.24 / 0.058, both 0.34 / 0.26 / 0.025; first evaluation below 1.0 (every 25, seeds 0-5): plain 75-100,
        DynaDG 75-100, DynaRS 125-275, both 75-200. Not reproduced: the dynamics do not speed the toy's cold start up;
        DynaRS stalls it (at high noise the outward signal that expands a collapsed student is 0.6-0.7 of DMD2's per
        unit of noise, computed with exact scores). DynaDG alone is ahead at dynamic_steps on every seed, behind at 600.
    stage 2, 300 updates from the same stage-1 checkpoint, mean reward / teacher log-density (seeds 0 / 1; the start:
        -0.09 / -4.26 and -0.25 / -3.19):
        DMD only -0.07 / -3.23 and -0.24 / -3.41; DMD + ReFL (lambda 0.3, margin 3) 1.03 / -4.71 and 0.78 / -3.70
        (8 modes); DMD + ReFL at the paper's 0.5: 1.34 / -5.08 and 1.23 / -5.35 (32-33% of samples off the ring);
        DMD + DPO (0.5) 0.41 / -4.21 and 0.38 / -3.57 (8 modes); ReFL alone 10.2 / -605 and 14.1 / -1296 (every
        sample off the ring); DPO alone 4.3 / -71 and 2.6 / -35.
        GRPO (K >= 2; K = 4, 300 + 300 updates, seed 0): joint at lambda 0.5 swings (sde: reward 1.0 -> -1.8, 1-4 modes)
        or diverges (ode); at 0.05 it stays on the ring without a steady reward gain (-0.12 / 0.91 / -0.13 at 100 /
        200 / 300). Not reproduced: a stable joint DMD + GRPO on the toy.
    the hacking boundary of joint DMD + ReFL (stage 2 from a plain cold start, seeds 0 / 1): linear reward (raised on
        the ring by reweighting modes): on the ring for lambda <= 0.3 at margins 2, 3 and none; from lambda 1 at the
        margin (margin 2: collapse onto the right-hand modes, on the ring; 3: every sample at x_1 = 3, off; none:
        diverges). Radius reward (raised only off the ring): margin 2 (the ring itself) on the ring at every lambda up
        to 3; margin 3 or none: 9-23% off at lambda 0.1, 28-47% at 0.3, every sample at the margin or diverging from 1.
    backward simulation, K = 4, 600 updates (DynaDG + DynaRS, no RT-DM): DMD2's sde 0.026 / 0.119 / 0.033 (from its
        teacher-initialised 0.029: the fake tracks the mixture of the 4 steps), the authors' ode 0.0057 / 0.0036 /
        0.0097 (from 0.018; seed 0 at 700-900 updates: 0.002-0.003). The ode-trained student sampled with sde: 0.023
        / 0.011 / 0.018. Not reproduced at K = 2: the ode student
        diverges (seed 0 after update 600, seed 2 before it; seed 1 intact at 600): the generator never trains on its
        own Euler states (only on re-noised final samples), and at K = 2 its second step sees 0.5 G(z) + 0.5 z, far from
        the 0.5 x + 0.5 eps it trains on.
The toy's default sampler is sde: at its default K = 1 the two are the same algorithm. With --student-steps 4 pass
--sampler ode (the measurements above); eval.py samples a dmdr run with its own sampler.

Conventions: sigma in [0, 1], sigma = 1 is pure noise. Flow worlds (toy flow, SD3): x = (1 - sigma) x0 + sigma eps.
VP worlds (toy vp, SDXL): x = alpha x0 + sigma eps. A pre-shift time t in [0, 1] maps to sigma = world.sigma(t)
(SD3's shift); the student's K levels are pre-shift times 1, 1 - 1/K, ..., 1/K. The algorithm below sees only
x0-predictions, world.renoise and world.reward, so it is identical on every world.
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

MODELS = ("toy2d", "sd3-medium", "sd3.5-medium", "sd3.5-large", "sdxl")  # toy2d/, and the presets of t2i/
RL_LOSSES = ("refl", "dpo", "grpo", "none")
SAMPLERS = ("sde", "ode")
RT_DM_NORMS = ("std", "rms")


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
    """text-to-image: image size in pixels (default: the preset's; DMDR SD3-M 512, SD3.5-L 1024)"""
    shift: Optional[float] = None
    """timestep shift of the student's levels on a flow world (default: the world's own, SD3's scheduler 3, toy 1;
    DMDR SD3.5-L: 5). DynaRS levels are not shifted (the authors' rule), so this moves the student's levels only"""
    t2i_reward: Optional[str] = None
    """text-to-image reward, name[:weight[:cap]],...: clip, pickscore, aesthetic, hpsv2, imagereward, optimised by RT-DM
    and ReFL (DMDR SD3-M, SD3.5-M and sdxl: clip:0.3:0.7,hpsv2:0.3:0.7, the authors' hinges; SD3.5-L: weights 0.1)"""
    hps_prefix: Optional[str] = None
    """text-to-image: text put before each prompt for the hpsv2 reward term (DMDR: "Realistic photo"; the other terms and
    the evaluation metrics get the prompt itself); applies only when hpsv2 is in --t2i-reward"""
    reward_checkpoints: Optional[str] = None
    """text-to-image: local reward weights, name=PATH,... (e.g. clip=/models/clip-vit-large-patch14)"""
    lora_rank: Optional[int] = None
    """text-to-image: generator LoRA rank (DMDR: 64)"""
    lora_alpha: Optional[float] = None
    """text-to-image: generator LoRA alpha, scale alpha / rank (DMDR: 128)"""
    fake_lora_rank: Optional[int] = None
    """text-to-image: fake-score LoRA rank (DMDR: 32)"""
    fake_lora_alpha: Optional[float] = None
    """text-to-image: fake-score LoRA alpha (DMDR: 32)"""
    toy_mixture: Literal["ring8", "grid25", "line3"] = "ring8"
    """toy teacher: ring8 (8 equal modes), grid25 (5x5, unequal weights), line3"""
    toy_spread: Optional[float] = None
    """toy mode standard deviation (None: the mixture's default)"""
    toy_path: Literal["flow", "vp"] = "flow"
    """toy noising path: flow (SD3-like, velocity) or vp (SDXL-like, eps)"""
    toy_classes: int = 0
    """toy class labels (mode k has label k % toy_classes); 0: unconditional"""
    toy_reward: Literal["linear", "quadratic", "radius"] = "linear"
    """toy reward: linear (r = d . x), quadratic (r = -|x - c|^2 / 2), radius (r = |x|, raised only off the ring)"""
    toy_reward_angle: float = 0.0
    """toy linear reward's direction in degrees from the x axis: r = cos(a) x_1 + sin(a) x_2"""
    toy_reward_target: tuple[float, float] = (2.0, 0.0)
    """toy quadratic reward's target point c: r = -|x - c|^2 / 2"""
    # ---- student and DMD ----
    student_steps: Optional[int] = None
    """K, the number of student sampling steps (pre-shift levels 1, 1 - 1/K, ..., 1/K) (toy2d: 1; text-to-image: 4)"""
    sampler: Optional[Literal["sde", "ode"]] = None
    """backward simulation and sampling: sde (DMD2's, x0 renoised with fresh noise) or ode (the authors' SD3 scripts:
    Euler rollout, its final sample re-noised to a random student level) (toy2d, sdxl: sde; SD3 presets: ode; equal at
    K = 1)"""
    stage1_steps: Optional[int] = None
    """generator updates of stage 1, the RT-DM cold start (toy2d: 600; DMDR SD3: 2000; sdxl: 3000; 0 skips it); with
    --resume, a larger value extends stage 1 of a run still in it"""
    stage2_steps: Optional[int] = None
    """generator updates of stage 2, joint DMD + RL (toy2d: 300; DMDR SD3-M: 2000; SD3.5-L, sdxl: 1000; 0 skips it);
    with --resume, a larger value extends the run's stage 2 (a run ended after stage 1 continues into it)"""
    batch_size: Optional[int] = None
    """samples per generator update in stage 1, per GPU (toy2d: 256; DMDR SD3-M: 8; SD3.5-L: 4)"""
    stage2_batch_size: Optional[int] = None
    """samples per generator update in stage 2, per GPU (default: batch_size; DMDR SD3-M, sdxl: 4; SD3.5-L: 2); dpo / grpo:
    groups x group_size"""
    lr_generator: Optional[float] = None
    """generator adapter learning rate in stage 1 (toy2d: 1e-3; DMDR SD3: 1e-6; sdxl: 5e-5)"""
    lr_fake: Optional[float] = None
    """fake-score adapter learning rate in stage 1 (toy2d: 1e-3; DMDR SD3-M: 5e-7; SD3.5-L: 2e-8; sdxl: 5e-5)"""
    stage2_lr_generator: Optional[float] = None
    """generator learning rate in stage 2 (default: lr_generator; DMDR SD3-M: 5e-7; SD3.5-L: 1e-7)"""
    stage2_lr_fake: Optional[float] = None
    """fake-score learning rate in stage 2 (default: lr_fake; DMDR SD3-M: 2e-7; SD3.5-L: 5e-9)"""
    weight_decay_generator: float = 0.01
    """AdamW weight decay of the generator adapter (the fake adapter has none)"""
    fake_updates_per_step: int = 5
    """TTUR: fake-score updates per generator update (DMDR: 5)"""
    guidance_scale: Optional[float] = None
    """classifier-free guidance of the real score (toy2d: 1.0, it needs --toy-classes; DMDR SD3-M: 7; SD3.5-L: 4;
    sd3.5-medium: 4.5; sdxl: 7)"""
    guidance_jitter: Optional[float] = None
    """the real score's guidance is drawn from U(g - j, g + j) at each generator update (toy2d: 0, it needs
    --toy-classes; DMDR SD3, sdxl: 0.5)"""
    renoise_min: float = 0.02
    """with --no-dyna-rs: lowest pre-shift time of the DMD renoise (DMD2: 0.02)"""
    renoise_max: float = 0.98
    """with --no-dyna-rs: highest pre-shift time of the DMD renoise (DMD2: 0.98)"""
    grad_clip: float = 1.0
    """gradient-norm clipping of both adapters (0: off)"""
    ema_decay: float = 0.0
    """generator EMA: ema <- decay * ema + (1 - decay) * weights every ema_every updates, used for evaluation and saved as
    checkpoint/generator/ (the trained weights in checkpoint/raw/); 0: off (DMDR: "EMA is not useful", recipes.md s.2)"""
    ema_every: int = 1
    """generator updates between EMA updates"""
    micro_batch_size: Optional[int] = None
    """split every forward / backward of a batch into chunks of this many samples whose gradients accumulate into one
    optimiser step, the same update as the whole batch (fake updates, the generator's DMD and ReFL terms, GRPO's
    trajectories; DPO: pairs of half as many), and the reward decode; None: the whole batch at once"""
    gradient_checkpointing: bool = True
    """text-to-image: recompute the network's blocks (and the reward decode) in backward, to save memory;
    --no-gradient-checkpointing keeps the activations (~17% less time per step, measured on CPU)"""
    # ---- stage 1: reward tilt, DynaDG, DynaRS ----
    rt_dm: bool = True
    """stage 1: reward-tilted DM (eq. 4), DMD gradient weighted by exp(beta r / ||r||) (--no-rt-dm: plain DMD)"""
    rt_dm_beta: float = 1.0
    """RT-DM tilt strength: weights exp(beta * r / ||r||) (paper: 1)"""
    rt_dm_norm: Literal["std", "rms"] = "std"
    """RT-DM's ||r||: std (ours: the batch's standard deviation, weights invariant to the reward's offset and scale) or
    rms (paper-literal: the uncentred RMS, weights depend on the reward's offset)"""
    dyna_dg: bool = True
    """DynaDG: real score = teacher + lora_scale_r(step) * fake adapter (--no-dyna-dg: the teacher alone)"""
    lora_scale_f: float = 2.0
    """fake score = teacher + lora_scale_f * fake adapter (DMDR SD3-M and SiT: 2.0, also with DynaDG off; DMD2: 1.0)"""
    lora_scale_r0: float = 0.5
    """DynaDG real-score adapter scale at step 0, annealed by a cosine to 0 (DMDR SD3-M: 0.5, SiT: 0.75)"""
    dynamic_steps: Optional[int] = None
    """generator updates over which DynaDG and DynaRS anneal (toy2d: 300; DMDR SD3: 2000; sdxl: 0); 0: both off"""
    dyna_rs: bool = True
    """DynaRS: noise levels drawn from the annealed Beta(a_c, b_c) (--no-dyna-rs: DMD2's levels)"""
    dyna_rs_a: float = 4.0
    """DynaRS Beta parameter a at step 0 (DMDR: 4)"""
    dyna_rs_b: float = 1.5
    """DynaRS Beta parameter b at step 0 (DMDR: 1.5)"""
    # ---- stage 2: joint DMD and RL ----
    rl: Literal["refl", "dpo", "grpo", "none"] = "refl"
    """stage-2 RL loss: refl, dpo, grpo (group-normalised REINFORCE), none"""
    lambda_rl: Optional[float] = None
    """weight of the RL loss, L = L_dmd + lambda_rl * L_rl (eq. 3) (toy2d: 0.3, below the measured hacking boundary, where
    the paper's 0.5 already crosses it; text-to-image: 1, the weights are in --t2i-reward as the authors' scripts have them)"""
    refl_margin: Optional[float] = None
    """ReFL's hinge: L_rl = mean relu(margin - r) (toy2d: 3.0, above every mode's reward as the authors' 0.7 is above every
    CLIP / HPS score; inf: -mean r). Text-to-image: none, the caps of --t2i-reward are the hinge"""
    dmd: bool = True
    """stage 2 keeps the DMD loss (--no-dmd: the "RL only" ablation)"""
    group_size: int = 8
    """dpo / grpo: rollouts per group (one condition per group)"""
    dpo_beta: float = 1.0
    """dpo: inverse temperature of the Diffusion-DPO logit on native-loss error differences"""
    # ---- run ----
    seed: int = 0
    """random seed (adapter init, noise, renoise levels)"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    output_dir: str = "runs"
    """parent directory of run directories"""
    run_name: Optional[str] = None
    """run directory name (default dmdr__<model>__<seed>__<time>); an existing directory is never overwritten"""
    log_every: int = 25
    """steps between metrics.jsonl loss records"""
    eval_every: int = 200
    """steps between evaluations (and checkpoints); each stage's end is always evaluated"""
    eval_samples: Optional[int] = None
    """samples per evaluation (toy2d: 4000; text-to-image: 16, one per evaluation prompt)"""
    progress: bool = True
    """show a tqdm progress bar"""
    resume: Optional[str] = None
    """continue the run in this directory from its last complete checkpoint, with its own config (and a larger
    --stage2-steps, or --stage1-steps while the run is still in stage 1, to extend it): adapters, optimisers, EMA, step
    and stage, DPO's reference and RNG states are restored, so the result is the uninterrupted run's"""


# Every Args field that defaults to None gets its value here, per model. Text-to-image values are the authors' scripts
# (notes/recipes.md section 1 row by row; section 2 for the mechanics); tests/test_dmdr_presets.py checks each one.
_SD3 = dict(student_steps=4, sampler="ode", guidance_jitter=0.5, dynamic_steps=2000, eval_samples=16, lambda_rl=1.0,
            hps_prefix="Realistic photo", lora_rank=64, lora_alpha=128, fake_lora_rank=32, fake_lora_alpha=32)
MODEL_DEFAULTS = {
    # toy2d: a 1-step student, the toy's cold start (teacher-initialised it maps every noise to the mixture mean, energy
    # distance 1.44, as a few-step SD3 student starts from blurry averages; a 4-step one already samples the ring at 0.028);
    # ReFL's hinge margin 3.0 lies above every mode's reward (the best mode scores 2), as 0.7 lies above CLIP / HPS scores;
    # lambda_rl 0.3: joint DMD + ReFL stays on the ring up to 0.3 and leaves it from 0.5-1 on (tests/test_dmdr_claims_stage2.py),
    # a scale of the toy's losses (the paper's 0.5 is one of SD3's).
    "toy2d": dict(student_steps=1, sampler="sde", stage1_steps=600, stage2_steps=300, batch_size=256, lr_generator=1e-3,
                  lr_fake=1e-3, guidance_scale=1.0, guidance_jitter=0.0, dynamic_steps=300, eval_samples=4000,
                  lambda_rl=0.3, refl_margin=3.0),
    # SD3-Medium (sd3/scripts/*/cold_start_sd3.sh, dmdr_sd3_refl.sh): 4 steps at shift 3 with the ODE backward simulation,
    # 512 px, batch 8 then 4 per GPU, lr 1e-6 / 5e-7 then 5e-7 / 2e-7, real CFG 7 jittered U(6.5, 7.5), DynaDG 2.0 / 0.5
    # and DynaRS Beta(4, 1.5) over 2000 steps, ReFL hinges relu(0.7 - s) on CLIP and HPSv2.1 (HPS text "Realistic photo
    # <prompt>") at 0.3 each added to the DMD loss, 2000 + 2000 steps. Deviations: CLIP is openai ViT-L/14, not DFN5B
    # ViT-H-14 (open_clip, a torchvision dependency); AdamW in fp32, not bitsandbytes' 8-bit AdamW.
    "sd3-medium": dict(**_SD3, stage1_steps=2000, stage2_steps=2000, batch_size=8, stage2_batch_size=4, lr_generator=1e-6,
                       lr_fake=5e-7, stage2_lr_generator=5e-7, stage2_lr_fake=2e-7, guidance_scale=7.0,
                       t2i_reward="clip:0.3:0.7,hpsv2:0.3:0.7"),
    # SD3.5-Large (*_sd35*.sh): shift 5, 1024 px, batch 4 then 2, lr 1e-6 / 2e-8 then 1e-7 / 5e-9, CFG 4.0 jittered
    # U(3.5, 4.5), hinge weights 0.1, 2000 + 1000 steps (ReFL runs from step 2000 to 3001).
    "sd3.5-large": dict(**_SD3, shift=5.0, resolution=1024, stage1_steps=2000, stage2_steps=1000, batch_size=4,
                        stage2_batch_size=2, lr_generator=1e-6, lr_fake=2e-8, stage2_lr_generator=1e-7,
                        stage2_lr_fake=5e-9, guidance_scale=4.0, t2i_reward="clip:0.1:0.7,hpsv2:0.1:0.7"),
    # SD3.5-Medium: OURS, the authors have no recipe for it (only an argparse default names the model): SD3-M's values
    # with RTDMD's SD3.5-M real CFG 4.5.
    "sd3.5-medium": dict(**_SD3, stage1_steps=2000, stage2_steps=2000, batch_size=8, stage2_batch_size=4,
                         lr_generator=1e-6, lr_fake=5e-7, stage2_lr_generator=5e-7, stage2_lr_fake=2e-7,
                         guidance_scale=4.5, t2i_reward="clip:0.3:0.7,hpsv2:0.3:0.7"),
    # SDXL: OURS, a 4-step LoRA student with DMD2's stochastic sampler and LoRA lr 5e-5. The authors' SDXL is another
    # method: a 1-step FULL-UNet generator at t = 399 initialised from DMD2's ODE-pretrained checkpoint, lr 1e-7 / 5e-8,
    # with DynaDG and DynaRS off (dynamic step 0, uniform levels). Taken from it: real CFG 7 jittered U(6.5, 7.5), batch
    # 8 then 4, 3000 + 1000 steps, ReFL hinges 0.3 each, and DynaDG / DynaRS off.
    "sdxl": dict(student_steps=4, sampler="sde", stage1_steps=3000, stage2_steps=1000, batch_size=8, stage2_batch_size=4,
                 lr_generator=5e-5, lr_fake=5e-5, guidance_scale=7.0, guidance_jitter=0.5, dynamic_steps=0,
                 eval_samples=16, lambda_rl=1.0, t2i_reward="clip:0.3:0.7,hpsv2:0.3:0.7", hps_prefix="Realistic photo",
                 lora_rank=64, lora_alpha=128, fake_lora_rank=32, fake_lora_alpha=32),
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


# ---- the student's sampler: one rollout for every use (RT-DM, DPO, GRPO, the ode backward simulation, evaluation) ----


@torch.no_grad()
def rollout(world, cond, sigmas, x, start=0, sampler="sde", generator=None, noises=None):
    """The student's steps start, ..., K-1 from the state x at level sigmas[start] (no grad). Each step predicts
    x0 = G(x, sigma_k) and moves to sigma_{k+1}: sde (DMD2's sampler) renoises x0 with fresh noise (noises[k] for the
    move k -> k + 1 when given: pre-drawn (n, ...) tensors, as in sample_student); ode takes the Euler step of the flow
    ODE (on a VP path the DDIM step), i.e. renoises x0 with the noise the step implies, eps_hat = (x - alpha_k x0) /
    sigma_k. Returns (the final sample = the last step's x0 (n, ...), the states [x at sigma_start, ..., x at
    sigma_{K-1}])."""
    states = []
    for k in range(start, len(sigmas)):
        states.append(x)
        x0 = world.x0("generator", x, sigmas[k], cond)
        if k + 1 < len(sigmas):
            if sampler == "ode":
                eps = (x - world.alpha(sigmas[k]) * x0) / sigmas[k]
            elif noises is not None:
                eps = noises[k]
            else:
                where = generator.device if generator is not None else x0.device  # a CPU generator with a CUDA world
                eps = torch.randn(x0.shape, generator=generator, device=where, dtype=x0.dtype).to(x0.device)
            x = world.renoise(x0, sigmas[k + 1], eps)
    return x0, states


# ---- micro-batches: a batch's randomness is drawn whole, then the batch is split ----
# Every training step below first draws all of its batch's randomness (noise, steps, levels, renoise noise) in the order
# the unsplit step draws it, then runs the batch in chunks of --micro-batch-size whose losses are the chunk's share of the
# batch mean (chunk mean x chunk / n): the accumulated gradients are the whole batch's, and so is the update.


# Copied from dmd.py: micro_batches
def micro_batches(n, size):
    """Slices that split a batch of n into chunks of at most `size` (None: one chunk). A loss that is a mean over the
    batch becomes the sum over chunks of chunk mean * chunk / n, so accumulated gradients equal the whole batch's."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def take(draws, c):
    """The rows c of a batch's pre-drawn randomness: tensors (n, ...), and lists or dicts of them, are sliced; numbers
    (a step k, a guidance scale) are the whole batch's."""
    if isinstance(draws, dict):
        return {key: take(value, c) for key, value in draws.items()}
    if isinstance(draws, list):
        return [take(value, c) for value in draws]
    return draws[c] if torch.is_tensor(draws) and draws.dim() > 0 else draws


def rollout_noises(noise, sampler, n_steps):
    """The draws of a batch's rollout from pure noise: sde, one (n, ...) tensor per move k -> k + 1; ode, none."""
    return [torch.randn_like(noise) for _ in range(n_steps - 1)] if sampler == "sde" else []


# ---- backward simulation: the generator's trained outputs, and the samples the fake score tracks ----


def simulation_draws(world, args, cond, sigmas):
    """The randomness of one batch's backward simulation: the noise; ode, a student level per sample and the noise that
    re-noises the final sample to it; sde, one step k for the batch and the K - 1 moves' noises (those before k lead to
    it, the later ones complete the rollout whose reward RT-DM uses)."""
    noise = world.noise(cond)
    if args.sampler == "ode":
        k = torch.randint(len(sigmas), (noise.shape[0],), device=noise.device)  # (n,)
        return {"noise": noise, "k": k, "eps": torch.randn_like(noise)}
    return {"noise": noise, "k": int(torch.randint(len(sigmas), (1,))), "noises": rollout_noises(noise, "sde", len(sigmas))}


@torch.no_grad()
def simulation_inputs(world, args, cond, sigmas, draws, complete=True):
    """The generator's inputs for a batch (or chunk) of backward simulation, no grad: (x (n, ...), its level sigma (a
    number, or (n,) per sample), the complete rollouts (n, ...) that RT-DM's reward scores, or None with complete=False).
    ode, the authors': the deterministic K-step rollout's final samples, each re-noised to its drawn student level; the
    complete rollouts are those final samples. sde, DMD2's: the state at step k; the complete rollout continues from
    the generator's x0 there (one more forward, without grad) through the later steps."""
    if args.sampler == "ode":
        final, _ = rollout(world, cond, sigmas, draws["noise"], sampler="ode")
        sigma = torch.tensor(sigmas, device=final.device, dtype=final.dtype)[draws["k"]]  # (n,)
        return world.renoise(final, sigma, draws["eps"]), sigma, final
    k, noises = draws["k"], draws["noises"]
    x = sample_student(world, cond, sigmas, draws["noise"], stop=k, noises=noises)
    if not complete:
        return x, sigmas[k], None
    x0 = world.x0("generator", x, sigmas[k], cond)
    if k + 1 < len(sigmas):
        x0, _ = rollout(world, cond, sigmas, world.renoise(x0, sigmas[k + 1], noises[k]), start=k + 1, noises=noises)
    return x, sigmas[k], x0


def backward_simulation(world, args, cond, sigmas, draws=None):
    """The generator's trained outputs for one whole batch: (x0 (n, ...) with grad, the student step(s) k, the complete
    rollouts of those samples (n, ...), no grad, for RT-DM's reward). sde: DMD2's (one step k for the batch), the rollout
    completed from x0 with fresh noise; ode: the final samples the inputs were made from."""
    draws = simulation_draws(world, args, cond, sigmas) if draws is None else draws
    x, sigma, complete = simulation_inputs(world, args, cond, sigmas, draws)
    return world.x0("generator", x, sigma, cond), draws["k"], complete


def fake_draws(world, args, cond, sigmas):
    """The randomness of one batch of fake-score training samples: the noise; sde, a step k and the noises before it."""
    noise = world.noise(cond)
    if args.sampler == "ode":
        return {"noise": noise}
    k = int(torch.randint(len(sigmas), (1,)))
    return {"noise": noise, "k": k, "noises": [torch.randn_like(noise) for _ in range(k)]}


@torch.no_grad()
def fake_training_samples(world, args, cond, sigmas, draws=None):
    """The samples the fake score tracks: sde, the generator's x0 at a random step (DMD2); ode, the final samples."""
    draws = fake_draws(world, args, cond, sigmas) if draws is None else draws
    if args.sampler == "ode":
        return rollout(world, cond, sigmas, draws["noise"], sampler="ode")[0]
    return generator_sample(world, cond, sigmas, draws["noise"], draws["k"], draws["noises"])[0]


@torch.no_grad()
def evaluate_student(world, args, sigmas, n, seed):
    """Student samples from fixed noise with the run's sampler, and the world's metrics (sde: dmd.py's evaluate)."""
    if args.sampler == "sde":
        return evaluate(world, sigmas, n, seed)
    gen = torch.Generator().manual_seed(seed)  # the same draws as evaluate: cond, then noise
    cond = world.sample_cond(n, gen)
    samples, _ = rollout(world, cond, sigmas, world.noise(cond, gen), sampler="ode")
    return samples, cond, world.evaluate(samples, cond)


# ---- the DMD gradient and the fake score's loss (eq. 1) ----


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



# ---- stage 1: RT-DM (eq. 4) ----


def reward_tilt_weights(rewards, beta=1.0, norm="std"):
    """RT-DM weights (n,) for rewards (n,): exp(beta r_i / ||r||) renormalised to mean 1 (= n softmax), so the DMD step
    size is unchanged on average and a constant reward gives exactly 1 (plain DMD).
    norm "std" (ours): ||r|| = the batch's standard deviation; since softmax ignores an offset of its logits, the weights
    are then invariant to r -> r + c and r -> a r (a > 0). norm "rms" (paper-literal, ||r|| undefined in the paper):
    the uncentred RMS sqrt(mean r^2); scale-free, but an offset changes the weights (mean 0.2, std 0.01: 0.93-1.03)."""
    if norm == "std":
        scale = rewards.std(unbiased=False)
    elif norm == "rms":
        scale = rewards.pow(2).mean().sqrt()
    else:
        raise ValueError(f"unknown RT-DM norm {norm!r}; valid: {', '.join(RT_DM_NORMS)}")
    if not scale > 0 or bool((rewards == rewards[0]).all()):  # a constant (or all-zero) reward: exactly plain DMD
        return torch.ones_like(rewards)
    return rewards.shape[0] * torch.softmax(beta * rewards / scale, dim=0)


# ---- stage 1: DynaDG and DynaRS (sec. 2.5) ----


def lora_scale_r(step, lora_scale_r0, dynamic_steps):
    """DynaDG: the real score's fake-adapter scale at generator step `step` (0-based): a cosine from lora_scale_r0
    at step 0 to 0 at dynamic_steps, and 0 from then on."""
    if step >= dynamic_steps:
        return 0.0
    return lora_scale_r0 * 0.5 * (1.0 + math.cos(math.pi * step / dynamic_steps))


def dynamic_renoise_level(n, step, dynamic_steps, a=4.0, b=1.5, device=None):
    """DynaRS: n noise levels u in (0, 1) at generator step `step` (0-based), drawn from Beta(a_c, b_c),
    a_c = 1 + (a - 1) c, b_c = 1 + (b - 1) c, c = 0.5 (1 + cos(pi min(step / dynamic_steps, 1))): Beta(a, b) at step 0
    (a = 4, b = 1.5: mean 0.73, high noise), exactly U(0, 1) from dynamic_steps on (and with dynamic_steps = 0).
    u is the network's time, as the authors use it: on a flow world sigma = u itself (no shift); pre_shift_time maps it
    into the world's pre-shift time."""
    c = 0.5 * (1.0 + math.cos(math.pi * min(step / dynamic_steps, 1.0))) if dynamic_steps > 0 else 0.0
    a_c, b_c = 1.0 + (a - 1.0) * c, 1.0 + (b - 1.0) * c
    if a_c == 1.0 and b_c == 1.0:
        return torch.rand(n, device=device)  # Beta(1, 1) = U(0, 1)
    return torch.distributions.Beta(torch.tensor(a_c), torch.tensor(b_c)).sample((n,)).to(device)


def pre_shift_time(world, u):
    """The pre-shift time t with world.sigma(t) = sigma_max * u: undoes the world's shift s (sigma = s t / (1 + (s - 1) t)
    on flow worlds; VP worlds have s = 1), so a level drawn unshifted, as the authors draw DynaRS levels, reaches the
    network unshifted. t = u / (s - (s - 1) u)."""
    s = world.shift
    return u / (s - (s - 1) * u)


def renoise_times(args, world, n, step, device, for_fake):
    """Pre-shift times (n,) of the DMD renoise (for_fake False) or of the fake-score update (True) at generator step
    `step`. DynaRS: the annealed Beta, unshifted (pre_shift_time), floored at 0.001 (the authors' lowest level). Off:
    DMD2's, pre-shift t ~ U[renoise_min, renoise_max] for the DMD renoise and U(0, 1] for the fake."""
    if args.dyna_rs:
        u = dynamic_renoise_level(n, step, args.dynamic_steps, args.dyna_rs_a, args.dyna_rs_b, device).clamp(min=1e-3)
        return pre_shift_time(world, u)
    u = torch.rand(n, device=device)
    if for_fake:
        return u.clamp(min=1e-3)
    return args.renoise_min + (args.renoise_max - args.renoise_min) * u


# ---- the DMD term of both stages ----


def real_guidance(args):
    """The real score's CFG for one generator update: guidance_scale, jittered U(g - j, g + j) (the authors' +-0.5)."""
    if args.guidance_jitter == 0:
        return args.guidance_scale
    return args.guidance_scale + args.guidance_jitter * (2.0 * float(torch.rand(())) - 1.0)


def dm_draws(args, world, x0, step):
    """The randomness of one batch's DMD term at generator step `step`: the renoise times t (n,) (DynaRS), the renoise
    noise (n, ...) and the real score's (jittered) guidance."""
    t = renoise_times(args, world, x0.shape[0], step, x0.device, for_fake=False)
    return {"t": t, "eps": torch.randn_like(x0), "cfg": real_guidance(args)}


def distribution_matching_loss(world, args, x0, cond, step, weights=None, draws=None):
    """DMDR's DMD term for generator outputs x0 (n, ...) at generator step `step` (eq. 1; eq. 4 with RT-DM weights (n,)).
    x0 is renoised at the DynaRS level; real score = teacher + lora_scale_r(step) * fake adapter (DynaDG; the teacher
    alone when it is 0) with the (jittered) CFG; fake score = teacher + lora_scale_f * fake adapter, no CFG. draws:
    the rows of dm_draws that x0 is (None: drawn here)."""
    with torch.no_grad():
        draws = dm_draws(args, world, x0, step) if draws is None else draws
        sigma = world.sigma(draws["t"])
        x_t = world.renoise(x0, sigma, draws["eps"])
        real_scale = lora_scale_r(step, args.lora_scale_r0, args.dynamic_steps) if args.dyna_dg else 0.0
        real_role = "fake" if real_scale > 0 else "teacher"
        x0_real = world.x0(real_role, x_t, sigma, cond, cfg=draws["cfg"], adapter_scale=real_scale)
        x0_fake = world.x0("fake", x_t, sigma, cond, adapter_scale=args.lora_scale_f)
        grad = dmd_grad(x0, x0_real, x0_fake)  # (n, ...)
        if weights is not None:
            grad = weights.reshape(-1, *[1] * (x0.dim() - 1)) * grad  # eq. 4: w_i (s_real - s_fake)
    return dmd_loss(x0, grad)


# ---- stage 2: the RL terms of eq. 3 ----
# DPO and GRPO score their own rollouts: <term>_batch does the no-grad part of a batch (rollouts, rewards, pairs or
# advantages), <term>_chunk_loss the part with grad for the rows c, as their share of the batch mean. ReFL differentiates
# the DMD term's own backward-simulated x0 (refl_term, chunk by chunk with it).


def refl_hinge(reward, margin=None):
    """ReFL's L_rl from rewards (n,) that carry the gradient of the generator's x0: the hinge mean relu(margin - r)
    (the authors' relu(0.7 - s)), or -mean r without a margin (None or inf)."""
    if margin is None or math.isinf(margin):
        return -reward.mean()
    return F.relu(margin - reward).mean()


def refl_loss(world, x0, cond, margin=None):
    """ReFL on the generator's x0 (n, ...), differentiated through it (the reward of the decoded sample on text-to-image)."""
    return refl_hinge(world.reward(x0, cond), margin)


def refl_term(world, args, x0, cond):
    """ReFL's L_rl on the DMD batch's x0 (n, ...) (the same backward-simulated outputs), the reward scored once."""
    reward = world.reward(x0, cond)  # (n,) with grad: a decode and the reward models on text-to-image
    check_finite(reward.mean(), "reward")
    return refl_hinge(reward, args.refl_margin), reward.detach()


def dpo_loss(err_w, err_l, err_w_ref, err_l_ref, beta):
    """Diffusion-DPO loss over pairs (m,): -log sigmoid(-beta [(e_w - e_w_ref) - (e_l - e_l_ref)]), e = the model's
    native denoising error on the noised winner / loser (lower error = higher likelihood). The constant T/2 of
    Diffusion-DPO is folded into beta."""
    logits = -beta * ((err_w - err_w_ref) - (err_l - err_l_ref))
    return -F.logsigmoid(logits).mean()


def denoising_error(world, x0, x_t, sigma, cond):
    """Per-sample native diffusion loss (n,) of the generator's prediction at (x_t, sigma) against clean x0."""
    x0_pred = world.x0("generator", x_t, sigma, cond)
    return world.loss_weight(sigma) * ((x0_pred - x0) ** 2).flatten(1).mean(1)


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


def pair_chunk(micro_batch_size):
    """DPO's pairs per chunk: a pair is two forwards (winner and loser), so half the micro-batch (None: all)."""
    return None if micro_batch_size is None else max(1, micro_batch_size // 2)


@torch.no_grad()
def dpo_batch(world, args, cond, sigmas, ref_values):
    """Diffusion-DPO's pairs for one batch (cond: one condition per group of group_size), everything without grad:
    complete rollouts with the run's sampler, the best and the worst reward of each group as winner and loser, both
    noised with shared noise to a shared student level, and the reference's denoising errors on them (the generator
    frozen at the start of stage 2, ref_values, swapped in). Returns (the pairs: a dict of (m, ...) tensors, the
    rollouts' rewards (n,))."""
    n, m = cond.shape[0], cond.shape[0] // args.group_size
    noise = world.noise(cond)
    noises = rollout_noises(noise, args.sampler, len(sigmas))
    chunks = micro_batches(n, args.micro_batch_size)
    x_final = torch.cat([rollout(world, cond[c], sigmas, noise[c], sampler=args.sampler, noises=take(noises, c))[0]
                         for c in chunks])  # (n, ...)
    reward = torch.cat([world.reward(x_final[c], cond[c]) for c in chunks])
    check_finite(reward.mean(), "reward")
    r = reward.reshape(-1, args.group_size)  # (groups, G)
    rows = torch.arange(m, device=r.device) * args.group_size
    best, worst = rows + r.argmax(1), rows + r.argmin(1)
    x_w, x_l = x_final[best], x_final[worst]
    sigma = torch.tensor(sigmas, device=x_w.device)[torch.randint(len(sigmas), (m,), device=x_w.device)]  # (m,)
    eps = torch.randn_like(x_w)
    pairs = {"cond": cond[best], "x_w": x_w, "x_l": x_l, "sigma": sigma,
             "xw_t": world.renoise(x_w, sigma, eps), "xl_t": world.renoise(x_l, sigma, eps)}
    ref = {"err_w_ref": [], "err_l_ref": []}
    with swapped_params(world.params("generator"), ref_values):  # no graph through the generator exists yet
        for c in micro_batches(m, pair_chunk(args.micro_batch_size)):
            p = take(pairs, c)
            ref["err_w_ref"].append(denoising_error(world, p["x_w"], p["xw_t"], p["sigma"], p["cond"]))
            ref["err_l_ref"].append(denoising_error(world, p["x_l"], p["xl_t"], p["sigma"], p["cond"]))
    return {**pairs, **{key: torch.cat(v) for key, v in ref.items()}}, reward


def dpo_chunk_loss(world, args, pairs, sigmas, c):
    """Diffusion-DPO's loss on the pairs c, with grad through the generator's denoising errors, as its share of the
    mean over the m pairs."""
    p = take(pairs, c)
    err_w = denoising_error(world, p["x_w"], p["xw_t"], p["sigma"], p["cond"])
    err_l = denoising_error(world, p["x_l"], p["xl_t"], p["sigma"], p["cond"])
    return dpo_loss(err_w, err_l, p["err_w_ref"], p["err_l_ref"], args.dpo_beta) * ((c.stop - c.start) / len(pairs["cond"]))


def group_advantages(rewards, group_size, eps=1e-6):
    """GRPO advantages (n,): rewards normalised within consecutive groups of group_size, (r - mean) / (std + eps),
    std the population standard deviation of the group."""
    r = rewards.reshape(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)).reshape(-1)


def reinforce_loss(logp, advantages):
    """Group-normalised REINFORCE: -mean A_i log p_i over trajectories and their stochastic steps; logp (n, S) with grad,
    advantages (n,) shared by a trajectory's steps. Its gradient is GRPO's at the rollout's own policy (ratio 1, where
    PPO's clip is inactive)."""
    return -(advantages[:, None] * logp).mean()


def transition_logprob(world, x, x_next, sigma, sigma_next, cond):
    """log N(x_next; alpha(sigma_next) G(x, sigma), sigma_next^2 I) (n,): the DMD2 sampler's renoise step as a policy."""
    mean = world.alpha(sigma_next) * world.x0("generator", x, sigma, cond)
    d = x[0].numel()
    sq = ((x_next - mean) ** 2).flatten(1).sum(1)
    return -sq / (2 * sigma_next**2) - d * math.log(sigma_next) - 0.5 * d * math.log(2 * math.pi)


def trajectory_logprobs(world, states, sigmas, cond):
    """Log-probabilities (n, K - 1) of the K - 1 stochastic transitions x_k -> x_{k+1} (the last step is deterministic)."""
    return torch.stack([transition_logprob(world, states[k], states[k + 1], sigmas[k], sigmas[k + 1], cond)
                        for k in range(len(sigmas) - 1)], dim=1)


@torch.no_grad()
def grpo_batch(world, args, cond, sigmas, ref_values=None):
    """GRPO's trajectories for one batch (one condition per group), without grad: stochastic (sde) rollouts, their
    rewards and group-normalised advantages. Returns (the trajectories: a dict, the rewards (n,))."""
    noise = world.noise(cond)
    noises = rollout_noises(noise, "sde", len(sigmas))
    chunks = micro_batches(cond.shape[0], args.micro_batch_size)
    parts = [rollout(world, cond[c], sigmas, noise[c], sampler="sde", noises=take(noises, c)) for c in chunks]
    states = [torch.cat([chunk_states[k] for _, chunk_states in parts]) for k in range(len(sigmas))]  # K x (n, ...)
    reward = torch.cat([world.reward(x_final, cond[c]) for (x_final, _), c in zip(parts, chunks)])  # (n,)
    check_finite(reward.mean(), "reward")
    return {"cond": cond, "states": states, "advantages": group_advantages(reward, args.group_size)}, reward


def grpo_chunk_loss(world, args, trajectories, sigmas, c):
    """GRPO's loss (group-normalised REINFORCE) on the trajectories c, with grad through their transitions'
    log-probabilities, as its share of the batch mean."""
    t = take(trajectories, c)
    logp = trajectory_logprobs(world, t["states"], sigmas, t["cond"])  # (chunk, K - 1) with grad
    return reinforce_loss(logp, t["advantages"]) * ((c.stop - c.start) / len(trajectories["cond"]))


RL_TERMS = {"dpo": (dpo_batch, dpo_chunk_loss), "grpo": (grpo_batch, grpo_chunk_loss)}  # on their own rollouts


# ---- the training steps ----


def fake_updates(world, args, sigmas, step, n, opt_fake):
    """TTUR: fake_updates_per_step diffusion-loss updates of the fake adapter (at lora_scale_f) on fresh detached
    student samples (fake_training_samples), noise levels from DynaRS (or DMD2's U(0, 1]), each in micro-batches."""
    losses = []
    for _ in range(args.fake_updates_per_step):
        cond = world.sample_cond(n)
        draws = fake_draws(world, args, cond, sigmas)
        t = renoise_times(args, world, n, step, cond.device, for_fake=True)
        eps = torch.randn_like(draws["noise"])
        opt_fake.zero_grad(set_to_none=True)
        total = 0.0
        for c in micro_batches(n, args.micro_batch_size):
            x0 = fake_training_samples(world, args, cond[c], sigmas, take(draws, c))
            loss = fake_score_loss(world, x0, cond[c], t[c], adapter_scale=args.lora_scale_f, eps=eps[c])
            loss = loss * ((c.stop - c.start) / n)
            check_finite(loss, "fake_score_loss")
            loss.backward()
            total += loss.item()
        sync_and_clip(world.params("fake"), args.grad_clip)
        opt_fake.step()
        losses.append(total)
    return sum(losses) / len(losses)


def generator_update(world, args, opt_generator):
    """The optimiser step of one generator update, once its chunks' gradients have accumulated. Returns the gradient
    norm before clipping."""
    grad_norm = sync_and_clip(world.params("generator"), args.grad_clip)
    opt_generator.step()
    return grad_norm


def stage1_step(world, args, sigmas, step, opt_generator, opt_fake):
    """Stage 1 (cold start): TTUR fake updates, then one RT-DM generator update. step: 0-based generator step.
    RT-DM's weights are a softmax over the whole batch's rewards, so the update runs in two passes: the complete
    rollouts' rewards of every chunk (no grad), then each chunk's weighted DMD loss with grad."""
    n = args.batch_size
    fake_loss = fake_updates(world, args, sigmas, step, n, opt_fake)
    cond = world.sample_cond(n)
    sim = simulation_draws(world, args, cond, sigmas)
    dm = dm_draws(args, world, sim["noise"], step)
    chunks = micro_batches(n, args.micro_batch_size)
    inputs, rewards = [], []
    for c in chunks:
        x, sigma, complete = simulation_inputs(world, args, cond[c], sigmas, take(sim, c))
        inputs.append((x, sigma))
        with torch.no_grad():  # the complete rollout's reward is logged either way; only RT-DM uses it
            rewards.append(world.reward(complete, cond[c]))
    reward = torch.cat(rewards)  # (n,)
    check_finite(reward.mean(), "reward")
    weights = reward_tilt_weights(reward, args.rt_dm_beta, args.rt_dm_norm) if args.rt_dm else None  # (n,)
    opt_generator.zero_grad(set_to_none=True)
    total = 0.0
    for c, (x, sigma) in zip(chunks, inputs):
        x0 = world.x0("generator", x, sigma, cond[c])  # (chunk, ...) with grad
        loss = distribution_matching_loss(world, args, x0, cond[c], step, None if weights is None else weights[c],
                                          take(dm, c)) * ((c.stop - c.start) / n)
        check_finite(loss, "dmd_loss")
        loss.backward()
        total += loss.item()
    out = {"dmd_loss": total, "fake_loss": fake_loss, "train_reward": reward.mean().item(),
           "student_step": float(torch.as_tensor(sim["k"], dtype=torch.float32).mean()),
           "grad_norm": generator_update(world, args, opt_generator)}
    if weights is not None:
        out["rt_dm_weight_max"] = weights.max().item()
    return out


def stage2_step(world, args, sigmas, step, opt_generator, opt_fake, ref_values):
    """Stage 2: L = L_dmd + lambda_rl * L_rl (eq. 3), one generator update (after TTUR fake updates if DMD is on).
    The RL term's rollouts and the DMD batch are drawn whole, then run in chunks: chunk i of the RL term (DPO's pairs,
    GRPO's trajectories) and chunk i of the DMD batch (its DMD and ReFL terms) share one backward."""
    n = args.stage2_batch_size
    out = {}
    if args.dmd:
        out["fake_loss"] = fake_updates(world, args, sigmas, step, n, opt_fake)
    rl_batch, reward = None, None
    if args.rl in RL_TERMS:
        cond = world.sample_cond(n // args.group_size).repeat_interleave(args.group_size)  # one condition per group
        # first, as before any graph through the generator exists: DPO swaps the reference's weights in place
        rl_batch, reward = RL_TERMS[args.rl][0](world, args, cond, sigmas, ref_values)
    else:
        cond = world.sample_cond(n)
    rl_chunks = micro_batches(len(rl_batch["cond"]), pair_chunk(args.micro_batch_size) if args.rl == "dpo" else
                              args.micro_batch_size) if rl_batch is not None else []
    dm_chunks, sim, dm = [], None, None
    if args.dmd or args.rl == "refl":
        sim = simulation_draws(world, args, cond, sigmas)
        dm = dm_draws(args, world, sim["noise"], step) if args.dmd else None
        dm_chunks = micro_batches(n, args.micro_batch_size)
        out["student_step"] = float(torch.as_tensor(sim["k"], dtype=torch.float32).mean())
    opt_generator.zero_grad(set_to_none=True)
    sums, refl_rewards = {"dmd_loss": 0.0, "rl_loss": 0.0}, []
    for i in range(max(len(rl_chunks), len(dm_chunks))):
        loss_rl = RL_TERMS[args.rl][1](world, args, rl_batch, sigmas, rl_chunks[i]) if i < len(rl_chunks) else None
        total = 0.0
        if i < len(dm_chunks):
            c = dm_chunks[i]
            x, sigma, _ = simulation_inputs(world, args, cond[c], sigmas, take(sim, c), complete=False)
            x0 = world.x0("generator", x, sigma, cond[c])  # (chunk, ...) with grad
            if args.dmd:
                loss_dmd = distribution_matching_loss(world, args, x0, cond[c], step, draws=take(dm, c)) * ((c.stop - c.start) / n)
                check_finite(loss_dmd, "dmd_loss")
                sums["dmd_loss"] += loss_dmd.item()
                total = total + loss_dmd
            if args.rl == "refl":
                loss_rl, chunk_reward = refl_term(world, args, x0, cond[c])
                loss_rl = loss_rl * ((c.stop - c.start) / n)
                refl_rewards.append(chunk_reward)
        if loss_rl is not None:
            check_finite(loss_rl, "rl_loss")
            sums["rl_loss"] += loss_rl.item()
            total = total + args.lambda_rl * loss_rl
        total.backward()
    if args.dmd:
        out["dmd_loss"] = sums["dmd_loss"]
    if args.rl != "none":
        reward = torch.cat(refl_rewards) if args.rl == "refl" else reward
        out["rl_loss"], out["train_reward"] = sums["rl_loss"], reward.mean().item()
    out["grad_norm"] = generator_update(world, args, opt_generator)
    return out


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


def validate(args):
    """Every check that can fail before any work starts (on the args as resolve_defaults leaves them; stage 2's batch
    size and rates default to stage 1's here as in main)."""
    args = resolve_stage2(dataclasses.replace(args))
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
        if args.shift is not None and args.toy_path != "flow":
            raise ValueError("--shift applies to flow worlds; the toy's vp path has none")
        if args.hps_prefix is not None:
            raise ValueError("--hps-prefix is a text-to-image option: the toy world has no use for it")
        if args.toy_classes == 0 and args.guidance_jitter not in (None, 0.0):
            raise ValueError(f"guidance_jitter {args.guidance_jitter} does nothing on the unconditional toy (it has no "
                             "condition to guide toward): pass --toy-classes N too, or leave it at 0")
    else:
        validate_t2i(args)
        import t2i

        if args.shift is not None and t2i.get_preset(args.model).family != "sd3":
            raise ValueError(f"--shift applies to flow (SD3) models; {args.model} is a VP model")
    for name in ("student_steps", "sampler", "stage1_steps", "stage2_steps", "batch_size", "lr_generator", "lr_fake",
                 "guidance_scale", "guidance_jitter", "dynamic_steps", "eval_samples", "lambda_rl"):
        if getattr(args, name) is None:
            raise ValueError(f"{name} has no default for model {args.model}: pass --{name.replace('_', '-')}")
    if args.rl not in RL_LOSSES:
        raise ValueError(f"unknown RL loss {args.rl!r}; valid RL losses: {', '.join(RL_LOSSES)}")
    if args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    if args.rt_dm_norm not in RT_DM_NORMS:
        raise ValueError(f"unknown rt_dm_norm {args.rt_dm_norm!r}; valid: {', '.join(RT_DM_NORMS)}")
    if not 1 <= args.student_steps <= 8:
        raise ValueError(f"student_steps must be in 1..8, got {args.student_steps}")
    check_world_options(args)
    check_device(args.device)
    for name in ("stage1_steps", "stage2_steps", "dynamic_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "stage2_batch_size", "fake_updates_per_step", "log_every", "eval_every", "eval_samples",
                 "ema_every", "micro_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("lr_generator", "lr_fake", "stage2_lr_generator", "stage2_lr_fake", "lora_scale_f", "dyna_rs_a",
                 "dyna_rs_b", "shift"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(args, name)}")
    for name in ("lambda_rl", "lora_scale_r0", "rt_dm_beta", "guidance_scale", "guidance_jitter", "grad_clip", "dpo_beta",
                 "weight_decay_generator"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.refl_margin is not None and math.isnan(args.refl_margin):
        raise ValueError("refl_margin must be a number (inf: no hinge)")
    if not 0.0 <= args.renoise_min < args.renoise_max <= 1.0:
        raise ValueError(f"need 0 <= renoise_min < renoise_max <= 1, got {args.renoise_min}, {args.renoise_max}")
    if args.stage2_steps > 0:
        if not args.dmd and args.rl == "none":
            raise ValueError("stage 2 with --no-dmd and --rl none trains nothing; drop one of them")
        if args.rl in ("dpo", "grpo"):
            if args.group_size < 2 or args.stage2_batch_size % args.group_size:
                raise ValueError(f"--rl {args.rl} needs group_size >= 2 dividing the stage-2 batch size, got "
                                 f"{args.group_size}, {args.stage2_batch_size}")
        if args.rl == "grpo" and args.student_steps < 2:
            raise ValueError("--rl grpo needs student_steps >= 2 (a 1-step student has no stochastic transition)")


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


def resolve_stage2(args):
    """Stage 2's batch size and learning rates default to stage 1's."""
    for name, source in (("stage2_batch_size", "batch_size"), ("stage2_lr_generator", "lr_generator"),
                         ("stage2_lr_fake", "lr_fake")):
        if getattr(args, name) is None:
            setattr(args, name, getattr(args, source))
    return args


def configure_world(world, args):
    """Options dmdr sets on a built world: the timestep shift of the student's levels (--shift) and the hpsv2 reward
    term's text prefix (--hps-prefix). A run's world needs them wherever it is rebuilt (evaluation too)."""
    if args.shift is not None:
        world.shift = float(args.shift)
    set_hps_prefix(world, args.hps_prefix)
    return world


def set_hps_prefix(world, prefix):
    """Training reward only: the hpsv2 term scores against prefix + " " + prompt (DMDR's "Realistic photo"); no-op
    without an hpsv2 term (the toy, or --t2i-reward without hpsv2)."""
    models = getattr(getattr(world, "reward_fn", None), "models", {})
    if prefix and "hpsv2" in models:
        models["hpsv2"].set_text_prefix(prefix)


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


def resume_args(args, method):
    """--resume RUN_DIR: that run's own config (the run continues in its own directory), extended by a larger
    --stage2-steps, or a larger --stage1-steps while the run is still in stage 1 (dmd.py's resume_args extends its one
    num_steps; dmdr's learning rates are constant within each stage, so either extension is exact). Returns (args,
    checkpoint directory)."""
    resumed, ckpt = read_run(args, method)
    for name in ("stage1_steps", "stage2_steps"):
        given, own = getattr(args, name), getattr(resumed, name)
        if given is None or given == own:
            continue
        if given < own:
            raise ValueError(f"--{name.replace('_', '-')} {given} is below the run's {own}: a run is only extended")
        step = json.loads((ckpt / "state.json").read_text())["step"]
        if name == "stage1_steps" and step > own:
            raise ValueError(f"--resume {args.resume} --stage1-steps {given}: the run is in stage 2 (step {step}); its "
                             f"stage 1 ended at {own}. Extend stage 2 with --stage2-steps")
        setattr(resumed, name, given)
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


def set_learning_rates(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def main(args, world=None):
    """Run both stages (or, --resume, continue a run). world: an already built world (tests, notebooks)."""
    ckpt = None
    if args.resume is not None:
        args, ckpt = resume_args(args, "dmdr")
    args = resolve_stage2(resolve_defaults(args))
    validate(args)
    rank, world_size, device = setup_distributed(args)
    lead = rank == 0  # data parallel: rank 0 alone evaluates, logs and saves
    run_dir = (Path(args.resume) if ckpt else run_dir_path(args, "dmdr")) if lead else None  # checked before any work
    torch.manual_seed(args.seed)
    world = configure_world(world if world is not None else make_world(args, device), args)
    if world_size > 1:
        torch.manual_seed(args.seed + 1000 * rank)  # data parallel: each rank its own noise, prompts and levels
    sigmas = student_sigmas(world, args.student_steps)
    opt_generator = torch.optim.AdamW(world.params("generator"), args.lr_generator, weight_decay=args.weight_decay_generator)
    opt_fake = torch.optim.AdamW(world.params("fake"), args.lr_fake, weight_decay=0.0)
    optimizers = {"generator": opt_generator, "fake": opt_fake}  # their states carry stage 2's learning rates
    ema = [p.detach().clone() for p in world.params("generator")] if args.ema_decay > 0 else None
    first_step, history, ref_values = 1, [], None
    if ckpt is not None:  # every rank restores the same adapters, optimiser states and DPO reference
        state = load_training_state(world, ckpt, optimizers, {})
        ema, first_step, ref_values = state["ema"], state["step"] + 1, state["ref_values"]
        history = read_history(run_dir, state["step"]) if lead else []
    if lead:  # a resumed run rewrites its config with the extended stages
        run_dir.mkdir(parents=True, exist_ok=ckpt is not None)
        (run_dir / "config.json").write_text(json.dumps({"method": "dmdr", **asdict(args), "provenance": provenance(device)},
                                                        indent=2))
        print(f"dmdr: {'resuming' if ckpt else 'run'} {run_dir} (from step {first_step})", file=sys.stderr)
    log = open(run_dir / "metrics.jsonl", "a") if lead else open(os.devnull, "w")

    def record(entry):
        history.append(entry)
        log.write(json.dumps(entry) + "\n")
        log.flush()

    def training_state(step, rng_states):  # the stage follows from the step; DPO's reference is taken at the switch
        return {"step": step, "optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "schedulers": {},
                "rng": rng_states, "ref_values": ref_values}

    def evaluation():
        with swapped_params(world.params("generator"), ema) if ema is not None else contextlib.nullcontext():
            return evaluate_student(world, args, sigmas, args.eval_samples, args.seed + 1)

    samples = None
    if ckpt is None:
        rng_states = gathered_rng_states()  # every rank's (a collective)
        if lead:
            samples, _, metrics = evaluation()
            record({"step": 0, "stage": 0, **metrics})
            save_checkpoint(world, run_dir, 0, training_state(0, rng_states), ema)
    start, shown, shown_losses = time.time(), {}, {}
    total = args.stage1_steps + args.stage2_steps
    bar = tqdm(total=total, initial=first_step - 1, desc=f"dmdr stage {1 if first_step <= args.stage1_steps else 2}",
               disable=not (args.progress and lead), dynamic_ncols=True)
    for step in range(first_step, total + 1):
        stage = 1 if step <= args.stage1_steps else 2
        if stage == 2 and step == args.stage1_steps + 1:
            what = "RL only" if not args.dmd else ("DMD only" if args.rl == "none" else "joint DMD + RL")
            msg = f"dmdr: stage 2 ({what}, --rl {args.rl}) from step {step}"
            bar.set_description("dmdr stage 2")
            tqdm.write(msg) if args.progress else print(msg)
            ref_values = [p.detach().clone() for p in world.params("generator")]  # DPO's frozen reference
            set_learning_rates(opt_generator, args.stage2_lr_generator)  # the authors' stage-2 rates (SD3-M: 5e-7 / 2e-7)
            set_learning_rates(opt_fake, args.stage2_lr_fake)
        try:
            if stage == 1:
                losses = stage1_step(world, args, sigmas, step - 1, opt_generator, opt_fake)
            else:
                losses = stage2_step(world, args, sigmas, step - 1, opt_generator, opt_fake, ref_values)
        except FloatingPointError as err:
            log.close()
            bar.close()
            where = run_dir / "checkpoint" if lead else "rank 0's run directory"
            raise FloatingPointError(f"{err} at step {step} (stage {stage}); stopped. The last good checkpoint is {where}"
                                     ) from None
        if ema is not None and step % args.ema_every == 0:
            ema_update(ema, world.params("generator"), args.ema_decay)
        bar.update(1)
        if step % args.log_every == 0:
            scale_r = lora_scale_r(step - 1, args.lora_scale_r0, args.dynamic_steps) if args.dyna_dg else 0.0
            record({"step": step, "stage": stage, "time": time.time() - start, "lr": opt_generator.param_groups[0]["lr"],
                    "lora_scale_r": scale_r, **losses})
            shown_losses = {k: f"{v:.3g}" for k, v in losses.items() if k in ("dmd_loss", "rl_loss", "train_reward")}
            bar.set_postfix({**shown_losses, **shown})
        stage_end = step in (args.stage1_steps, total)
        if step % args.eval_every == 0 or stage_end:
            rng_states = gathered_rng_states()  # every rank's (a collective); evaluation draws from its own generator
            if lead:
                samples, _, metrics = evaluation()
                record({"step": step, "stage": stage, "time": time.time() - start, **metrics})
                shown = {"reward": f"{metrics['mean_reward']:.3f}"}
                if "energy_distance" in metrics:  # toy metrics; text-to-image worlds report rewards only
                    shown = {"ed": f"{metrics['energy_distance']:.4f}", **shown, "logp": f"{metrics['teacher_logp']:.2f}"}
                bar.set_postfix({**shown_losses, **shown})  # the last evaluation's figures stay beside the losses
                save_checkpoint(world, run_dir, step, training_state(step, rng_states), ema)
        if lead and stage_end:
            world.plot_samples(samples, run_dir / f"samples_stage{stage}.png",
                               f"dmdr stage {stage}, {args.student_steps}-step student ({args.sampler}), step {step}")
    bar.close()
    log.close()
    if not lead:  # data parallel: the other ranks stop here; rank 0 writes the figures
        return {"run_dir": None, "history": history, "final": history[-1] if history else {}, "world": world}
    if total == 0:
        samples = samples if samples is not None else evaluation()[0]
        world.plot_samples(samples, run_dir / "samples_stage0.png", "dmdr, untrained student")
    world.plot_curves(history, ["dmd_loss", "fake_loss", "rl_loss", "mean_reward", "teacher_logp", "energy_distance"],
                      run_dir / "curves.png", "dmdr")
    final = dict(history[-1])
    print(f"dmdr: done in {time.time() - start:.1f} s -> {run_dir}")
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
