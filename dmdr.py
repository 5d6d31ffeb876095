"""DMDR: Distribution Matching Distillation meets Reinforcement Learning (Jiang et al., v2), two stages in one command.

    python dmdr.py                                   # toy world: ring8, linear reward, stage 1 + stage 2 (ReFL), ~1 min on 2 cores
    python dmdr.py --rl dpo                          # stage 2 with Diffusion-DPO pairs instead of ReFL (also: grpo, none)
    python dmdr.py --no-dmd                          # "RL only" ablation (paper fig. 4): stage 2 without the DMD loss
    python dmdr.py --no-rt-dm --no-dyna-dg --no-dyna-rs --stage2-steps 0 --lora-scale-f 1   # plain DMD2 (= dmd.py)
    python dmdr.py --stage1-steps 0 --stage2-steps 500 --lambda-rl 1.0
    python dmdr.py --model sd3-medium                # SD3-Medium, DMDR's recipe (GPU; reward CLIP + HPSv2.1: pip install hpsv2)
    python dmdr.py --model sd3-medium --t2i-reward clip:0.3:0.7 --model-path DIR  # without hpsv2, local weights
    torchrun --nproc_per_node 8 dmdr.py --model sd3-medium  # data parallel (--batch-size is per GPU, 8 in the paper)
    python dmdr.py --help                            # every option, with its default

A run writes runs/dmdr__<model>__<seed>__<time>/: config.json, metrics.jsonl (losses, rewards, evaluation metrics),
checkpoint/ (the latest good generator and fake adapters), samples_stage1.png and samples_stage2.png (student samples
after each stage over the teacher's contours), curves.png (losses, reward, teacher log-density, energy distance).

The algorithm (paper v2 section numbers and equations):
    DMD2 backbone (sec. 2.1, eq. 1): a K-step student G = teacher + generator adapter, sampled by backward simulation;
        a fake score (teacher + fake adapter) trained with the diffusion loss on the student's samples (TTUR);
        normalised DMD gradient (p_real - p_fake) / mean|p_real| applied through 0.5 * mse(x, sg(x - grad)).
    Stage 1, cold start:
        RT-DM (sec. 2.4, eq. 4): the per-sample DMD gradient is multiplied by w_i = exp(r_i / ||r||), with r_i the
            reward (no gradient) of the student's COMPLETE K-step rollout through the trained sample.
            Ours (the paper leaves it open): ||r|| = RMS of the batch's rewards, sqrt(mean_i r_i^2) (a batch-size-free
            L2 norm), and the weights are renormalised to mean 1 (self-normalised importance weights of the tilted
            target), so the DMD step size is unchanged and a constant reward gives exactly plain DMD.
        DynaDG (sec. 2.5): real score = teacher + lora_scale_r(step) * FAKE adapter, with
            lora_scale_r(step) = lora_scale_r0 * 0.5 (1 + cos(pi step / dynamic_steps)), 0 from dynamic_steps on;
            fake score = teacher + lora_scale_f * fake adapter (also the scale the fake-score loss trains it at).
        DynaRS (sec. 2.5): the renoise level u ~ Beta(a_c, b_c), a_c = 1 + (a - 1) c, b_c = 1 + (b - 1) c,
            c = 0.5 (1 + cos(pi min(step / dynamic_steps, 1))): Beta(4, 1.5) (high noise) at step 0, U(0, 1) from
            dynamic_steps on; used for the DMD renoise and the fake-score update. u is a pre-shift time (the world
            applies its shift); the DMD renoise maps it to [renoise_min, renoise_max] as DMD2's U[0.02, 0.98] does.
        The schedules count generator updates over both stages (step 0 = the first update of stage 1).
    Stage 2, joint DMD + RL (sec. 2.3, eq. 3): L = L_dmd + lambda_rl * L_rl, with L_rl one of
        refl  ReFL: -mean r(x0), the reward's gradient through the generator's x0 prediction at the backward-simulated step
        dpo   Diffusion-DPO: groups of complete rollouts, winner = best and loser = worst reward of each group; both are
              noised with shared noise to a student level and the generator's denoising errors are compared with
              those of the reference (the generator frozen at the start of stage 2)
        grpo  group-normalised advantages, log-probabilities of the stochastic few-step sampler (the DMD2 sampler's
              renoise steps are Gaussian transitions N(alpha x0_k, sigma_{k+1}^2 I)), PPO clipped ratio
        none  keep distilling
    --no-dmd drops L_dmd in stage 2 (the "RL only" ablation; the fake score is then not updated).

Measured on the toy (ring8, s = 0.25, linear reward, tests/test_dmdr.py settings, seeds 0-2; teacher samples: mean
reward 0, mean teacher log-density -2.13):
    stage 1, 600 steps: RT-DM mean reward 0.08 / 0.46 / 0.43 vs plain DMD -0.22 / -0.12 / 0.09, log-density within
        0.3 nats of DMD's (mean of the evaluations at steps 300-600);
    stage 2, 200 steps from the RT-DM checkpoint: joint DMD + ReFL reward 1.39 / 1.71 / 1.86 at log-density -2.3 / -3.8 /
        -3.2, DMD only 0.0 / 0.2 / 0.4 at -2.4 / -2.8 / -2.5, ReFL alone 5e8 to 6e9 at below -1e18 (reward hacking);
    cold start from a student shifted off the teacher (ED ~9): energy distance after 36 steps, mean of seeds 1-5,
        DynaDG + DynaRS 0.081 vs plain DMD 0.129 (behind in 2 of 5 seeds; in one seed run per component, DynaRS
        alone gave the gain and DynaDG alone none).
    DPO and GRPO raise the reward (RL only: +1.4 to +2.0 in 20 steps) but joint runs from the teacher-initialised student
    are unstable on the toy at lambda_rl = 0.5 and 0.1 (log-density swings to -30 and back); ReFL is the default.

Conventions: sigma in [0, 1], sigma = 1 is pure noise. Flow worlds (toy flow, SD3): x = (1 - sigma) x0 + sigma eps.
VP worlds (toy vp, SDXL): x = alpha x0 + sigma eps. A pre-shift time t in [0, 1] maps to sigma = world.sigma(t)
(SD3's shift). The algorithm below sees only x0-predictions, world.renoise and world.reward, so it is identical on
every world.
"""

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

MODELS = ('toy2d', 'sd3-medium', 'sd3.5-medium', 'sd3.5-large', 'sdxl')  # toy2d/, and the presets of t2i/
RL_LOSSES = ("refl", "dpo", "grpo", "none")


@dataclass
class Args:
    # ---- world ----
    model: str = "toy2d"
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
    """text-to-image reward, name[:weight[:cap]],...: clip, pickscore, aesthetic, hpsv2, imagereward (dmdr: optimised by RT-DM and ReFL)"""
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
    toy_mixture: str = "ring8"
    """toy teacher: ring8 (8 equal modes), grid25 (5x5, unequal weights), line3"""
    toy_spread: Optional[float] = None
    """toy mode standard deviation (None: the mixture's default)"""
    toy_path: str = "flow"
    """toy noising path: flow (SD3-like, velocity) or vp (SDXL-like, eps)"""
    toy_classes: int = 0
    """toy class labels (mode k has label k % toy_classes); 0: unconditional"""
    toy_reward: str = "linear"
    """toy reward: linear (r = d . x), quadratic (r = -|x - c|^2 / 2), radius (r = |x|, hackable)"""
    toy_reward_angle: float = 0.0
    """toy linear reward's direction in degrees from the x axis: r = cos(a) x_1 + sin(a) x_2"""
    toy_reward_target: tuple[float, float] = (2.0, 0.0)
    """toy quadratic reward's target point c: r = -|x - c|^2 / 2"""
    # ---- student and DMD ----
    student_steps: int = 4
    """K, the number of student sampling steps (pre-shift levels 1, 1 - 1/K, ..., 1/K)"""
    stage1_steps: Optional[int] = None
    """generator updates of stage 1, the RT-DM cold start (toy2d: 1000; 0 skips it)"""
    stage2_steps: Optional[int] = None
    """generator updates of stage 2, joint DMD + RL (toy2d: 600; 0 skips it)"""
    batch_size: Optional[int] = None
    """samples per generator update (toy2d: 256); in stage 2 with dpo / grpo: groups x group_size"""
    lr_generator: Optional[float] = None
    """generator adapter learning rate (toy2d: 1e-3)"""
    lr_fake: Optional[float] = None
    """fake-score adapter learning rate (toy2d: 1e-3)"""
    weight_decay_generator: float = 0.01
    """AdamW weight decay of the generator adapter (the fake adapter has none)"""
    fake_updates_per_step: int = 5
    """TTUR: fake-score updates per generator update (DMDR: 5)"""
    guidance_scale: Optional[float] = None
    """classifier-free guidance of the real score (toy2d: 1.0; DMDR SD3-M: 7)"""
    renoise_min: float = 0.02
    """lowest pre-shift time of the DMD renoise (DMD2: 0.02)"""
    renoise_max: float = 0.98
    """highest pre-shift time of the DMD renoise (DMD2: 0.98)"""
    grad_clip: float = 1.0
    """gradient-norm clipping of both adapters (0: off)"""
    micro_batch_size: Optional[int] = None
    """split every forward / backward of a batch into chunks of this many samples whose gradients accumulate into one
    optimiser step (the same update as the whole batch); None: the whole batch at once"""
    gradient_checkpointing: bool = True
    """text-to-image: recompute the network's blocks (and the reward decode) in backward, to save memory;
    --no-gradient-checkpointing keeps the activations (~17% less time per step, measured on CPU)"""
    # ---- stage 1: RT-DM, DynaDG, DynaRS ----
    rt_dm: bool = True
    """stage 1: reward-tilted DM (eq. 4), DMD gradient weighted by exp(r / ||r||) (--no-rt-dm: plain DMD)"""
    rt_dm_beta: float = 1.0
    """RT-DM tilt strength: weights exp(beta * r / ||r||) (paper: 1)"""
    dyna_dg: bool = True
    """DynaDG: real score = teacher + lora_scale_r(step) * fake adapter (--no-dyna-dg: the teacher alone)"""
    lora_scale_f: float = 2.0
    """fake score = teacher + lora_scale_f * fake adapter (DMDR SD3-M and SiT: 2.0; DMD2 / dmd.py: 1.0)"""
    lora_scale_r0: float = 0.5
    """DynaDG real-score adapter scale at step 0, annealed by a cosine to 0 (DMDR SD3-M: 0.5, SiT: 0.75)"""
    dynamic_steps: Optional[int] = None
    """generator updates over which DynaDG and DynaRS anneal (toy2d: 500; DMDR SD3-M: 2000); 0: both off"""
    dyna_rs: bool = True
    """DynaRS: renoise levels from the annealed Beta(a_c, b_c) (--no-dyna-rs: U(0, 1) as DMD2)"""
    dyna_rs_a: float = 4.0
    """DynaRS Beta parameter a at step 0 (DMDR: 4)"""
    dyna_rs_b: float = 1.5
    """DynaRS Beta parameter b at step 0 (DMDR: 1.5)"""
    # ---- stage 2: joint DMD + RL ----
    rl: str = "refl"
    """stage-2 RL loss: refl, dpo, grpo, none"""
    lambda_rl: float = 0.5
    """weight of the RL loss, L = L_dmd + lambda_rl * L_rl (eq. 3; paper default 0.5)"""
    dmd: bool = True
    """stage 2 keeps the DMD loss (--no-dmd: the "RL only" ablation)"""
    group_size: int = 8
    """dpo / grpo: rollouts per group (one condition per group)"""
    dpo_beta: float = 1.0
    """dpo: inverse temperature of the Diffusion-DPO logit on native-loss error differences"""
    grpo_clip: float = 0.2
    """grpo: PPO ratio clip epsilon (one update per rollout here, so the ratio is 1 and the clip is inactive)"""
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


MODEL_DEFAULTS = {
    "toy2d": dict(eval_samples=4000, stage1_steps=1000, stage2_steps=600, batch_size=256, lr_generator=1e-3, lr_fake=1e-3,
                  guidance_scale=1.0, dynamic_steps=500),
    # text-to-image, DMDR's SD3-M recipe (notes/reference-implementations.md): 4 steps, batch 8 per GPU, lr 1e-6 / 5e-7,
    # real CFG 7 (SD3.5: 4.5, as RTDMD's SD3.5-M), DynaDG / DynaRS over 2000 generator steps, generator LoRA r64 alpha128,
    # fake r32 alpha32, ReFL on the hinge relu(0.7 - s) of CLIP and HPSv2.1 at weight 0.3 each (HPSv2.1 needs the optional
    # hpsv2 package; without it pass --t2i-reward clip:0.3:0.7). Not reproduced: stage 2's lower rates (5e-7 / 2e-7) and
    # batch 4, the CFG jitter, DFN5B CLIP (ours: openai ViT-L/14). Ours: the stage lengths. SDXL: DMD2's CFG 8 and LoRA lr 5e-5.
    **{name: dict(stage1_steps=2000, stage2_steps=2000, batch_size=8, lr_generator=1e-6, lr_fake=5e-7,
                  guidance_scale=7.0 if name == "sd3-medium" else 4.5, dynamic_steps=2000, eval_samples=16,
                  t2i_reward="clip:0.3:0.7,hpsv2:0.3:0.7", lora_rank=64, lora_alpha=128, fake_lora_rank=32, fake_lora_alpha=32)
       for name in ("sd3-medium", "sd3.5-medium", "sd3.5-large")},
    "sdxl": dict(stage1_steps=2000, stage2_steps=2000, batch_size=4, lr_generator=5e-5, lr_fake=5e-5, guidance_scale=8.0,
                 dynamic_steps=2000, eval_samples=16, t2i_reward="clip:0.3:0.7,hpsv2:0.3:0.7", lora_rank=64, lora_alpha=128,
                 fake_lora_rank=32, fake_lora_alpha=32),
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


@torch.no_grad()
def complete_rollout(world, cond, sigmas, x0, k):
    """Finish the student's K-step trajectory from its x0 at step k: renoise to sigma_{k+1}, denoise, ... (no grad).
    RT-DM scores this complete rollout, not the one-step x0 approximation (paper sec. 2.4)."""
    for j in range(k + 1, len(sigmas)):
        x = world.renoise(x0, sigmas[j], torch.randn_like(x0))
        x0 = world.x0("generator", x, sigmas[j], cond)
    return x0


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


def reward_tilt_weights(rewards, beta=1.0):
    """RT-DM weights (n,) for rewards (n,): exp(beta * r_i / ||r||), renormalised to mean 1.
    ||r|| = sqrt(mean_i r_i^2), the RMS over the batch (the L2 norm without its sqrt(n) batch-size dependence), so
    the exponent is O(1) for any reward scale. Renormalising (= n * softmax) makes the weights self-normalised
    importance weights of the tilted target p exp(beta r / ||r||): the DMD step size is unchanged on average and a
    constant reward gives exactly 1 (plain DMD)."""
    norm = rewards.pow(2).mean().sqrt().clamp_min(1e-12)  # all-zero rewards: weights 1
    return rewards.shape[0] * torch.softmax(beta * rewards / norm, dim=0)


# ---- stage 1: DynaDG and DynaRS (sec. 2.5) ----


def lora_scale_r(step, lora_scale_r0, dynamic_steps):
    """DynaDG: the real score's fake-adapter scale at generator step `step` (0-based): a cosine from lora_scale_r0
    at step 0 to 0 at dynamic_steps, and 0 from then on."""
    if step >= dynamic_steps:
        return 0.0
    return lora_scale_r0 * 0.5 * (1.0 + math.cos(math.pi * step / dynamic_steps))


def dynamic_renoise_sigma(n, step, dynamic_steps, a=4.0, b=1.5, device=None):
    """DynaRS: n renoise levels (pre-shift times in (0, 1)) at generator step `step` (0-based), drawn from
    Beta(a_c, b_c), a_c = 1 + (a - 1) c, b_c = 1 + (b - 1) c, c = 0.5 (1 + cos(pi min(step / dynamic_steps, 1))):
    Beta(a, b) at step 0 (a = 4, b = 1.5: mean 0.73, high noise), exactly U(0, 1) from dynamic_steps on."""
    c = 0.5 * (1.0 + math.cos(math.pi * min(step / dynamic_steps, 1.0))) if dynamic_steps > 0 else 0.0
    a_c, b_c = 1.0 + (a - 1.0) * c, 1.0 + (b - 1.0) * c
    if a_c == 1.0 and b_c == 1.0:
        return torch.rand(n, device=device)  # Beta(1, 1) = U(0, 1): the same draws as DMD2's renoise
    return torch.distributions.Beta(torch.tensor(a_c), torch.tensor(b_c)).sample((n,)).to(device)


def dmdr_generator_loss(world, x0, cond, t, guidance_scale, real_scale=0.0, fake_scale=1.0, weights=None):
    """DMD loss of generator outputs x0 (n, ...) renoised at pre-shift times t (n,).
    Real score: teacher + real_scale * fake adapter (DynaDG; the teacher alone at 0), with CFG.
    Fake score: teacher + fake_scale * fake adapter. weights (n,): RT-DM's per-sample weights (eq. 4), None: plain DMD."""
    with torch.no_grad():
        sigma = world.sigma(t)
        x_t = world.renoise(x0, sigma, torch.randn_like(x0))
        real_role = "fake" if real_scale > 0 else "teacher"
        x0_real = world.x0(real_role, x_t, sigma, cond, cfg=guidance_scale, adapter_scale=real_scale)
        x0_fake = world.x0("fake", x_t, sigma, cond, adapter_scale=fake_scale)
        grad = dmd_grad(x0, x0_real, x0_fake)  # (n, ...)
        if weights is not None:
            grad = weights.reshape(-1, *[1] * (x0.dim() - 1)) * grad  # eq. 4: exp(r / ||r||) (s_real - s_fake)
    return dmd_loss(x0, grad)


# ---- stage 2: the RL losses of eq. 3 ----


def refl_loss(world, x0, cond):
    """ReFL: minus the mean reward of the generator's x0 prediction (n, ...), differentiated through it."""
    return -world.reward(x0, cond).mean()


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


def dpo_rl_loss(world, cond, x_w, x_l, sigmas, ref_values, beta):
    """Diffusion-DPO on pairs (m, ...) of complete rollouts: winner and loser share a student level sigma_k and the
    noise; the reference is the generator frozen at the start of stage 2 (ref_values, swapped in without grad)."""
    m = x_w.shape[0]
    sigma = torch.tensor(sigmas, device=x_w.device)[torch.randint(len(sigmas), (m,), device=x_w.device)]  # (m,)
    eps = torch.randn_like(x_w)
    xw_t, xl_t = world.renoise(x_w, sigma, eps), world.renoise(x_l, sigma, eps)
    with torch.no_grad(), swapped_params(world.params("generator"), ref_values):  # before the policy's graph exists
        err_w_ref = denoising_error(world, x_w, xw_t, sigma, cond)
        err_l_ref = denoising_error(world, x_l, xl_t, sigma, cond)
    err_w = denoising_error(world, x_w, xw_t, sigma, cond)
    err_l = denoising_error(world, x_l, xl_t, sigma, cond)
    return dpo_loss(err_w, err_l, err_w_ref, err_l_ref, beta)


def group_advantages(rewards, group_size, eps=1e-6):
    """GRPO advantages (n,): rewards normalised within consecutive groups of group_size, (r - mean) / (std + eps),
    std the population standard deviation of the group."""
    r = rewards.reshape(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)).reshape(-1)


def grpo_loss(logp, logp_old, advantages, clip):
    """PPO-clipped policy loss: logp, logp_old (n, S) per stochastic step, advantages (n,) shared by a trajectory's
    steps; -mean min(ratio A, clip(ratio, 1 - clip, 1 + clip) A)."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None]
    return -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv).mean()


def transition_logprob(world, x, x_next, sigma, sigma_next, cond):
    """log N(x_next; alpha(sigma_next) G(x, sigma), sigma_next^2 I) (n,): the DMD2 sampler's renoise step as a policy."""
    mean = world.alpha(sigma_next) * world.x0("generator", x, sigma, cond)
    d = x[0].numel()
    sq = ((x_next - mean) ** 2).flatten(1).sum(1)
    return -sq / (2 * sigma_next**2) - d * math.log(sigma_next) - 0.5 * d * math.log(2 * math.pi)


@torch.no_grad()
def rollout_with_states(world, cond, sigmas, noise):
    """K-step student rollout keeping its states [x_0 = noise, x_1, ..., x_{K-1}] and the final sample."""
    states, x = [noise], noise
    for k, sigma in enumerate(sigmas):
        x0 = world.x0("generator", x, sigma, cond)
        if k + 1 < len(sigmas):
            x = world.renoise(x0, sigmas[k + 1], torch.randn_like(x0))
            states.append(x)
    return states, x0


def trajectory_logprobs(world, states, sigmas, cond):
    """Log-probabilities (n, K - 1) of the K - 1 stochastic transitions x_k -> x_{k+1} (the last step is deterministic)."""
    return torch.stack([transition_logprob(world, states[k], states[k + 1], sigmas[k], sigmas[k + 1], cond)
                        for k in range(len(sigmas) - 1)], dim=1)


# ---- the training steps ----


def fake_updates(world, args, sigmas, step, opt_fake):
    """TTUR: fake_updates_per_step diffusion-loss updates of the fake adapter (at lora_scale_f) on detached student
    samples, renoise levels from DynaRS (or U(0, 1))."""
    n, losses = args.batch_size, []
    for _ in range(args.fake_updates_per_step):
        cond = world.sample_cond(n)
        with torch.no_grad():
            x0, _ = generator_sample(world, cond, sigmas, world.noise(cond))
        u = renoise_levels(args, n, step, x0.device)
        loss = fake_score_loss(world, x0, cond, u.clamp(min=1e-3), adapter_scale=args.lora_scale_f)
        check_finite(loss, "fake_score_loss")
        opt_fake.zero_grad(set_to_none=True)
        loss.backward()
        sync_and_clip(world.params("fake"), args.grad_clip)
        opt_fake.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def renoise_levels(args, n, step, device):
    """Pre-shift renoise levels in (0, 1): DynaRS, or U(0, 1) when it is off."""
    if args.dyna_rs:
        return dynamic_renoise_sigma(n, step, args.dynamic_steps, args.dyna_rs_a, args.dyna_rs_b, device)
    return torch.rand(n, device=device)


def distribution_matching_loss(world, args, x0, cond, step, weights=None):
    """The generator's DMD term at generator step `step`: DynaRS levels mapped to [renoise_min, renoise_max], DynaDG
    real score, fake score at lora_scale_f, optional RT-DM weights."""
    u = renoise_levels(args, x0.shape[0], step, x0.device)
    t = args.renoise_min + (args.renoise_max - args.renoise_min) * u
    real_scale = lora_scale_r(step, args.lora_scale_r0, args.dynamic_steps) if args.dyna_dg else 0.0
    return dmdr_generator_loss(world, x0, cond, t, args.guidance_scale, real_scale, args.lora_scale_f, weights)


def stage1_step(world, args, sigmas, step, opt_generator, opt_fake):
    """Stage 1 (cold start): TTUR fake updates, then one RT-DM generator update. step: 0-based generator step."""
    fake_loss = fake_updates(world, args, sigmas, step, opt_fake)
    n = args.batch_size
    cond = world.sample_cond(n)
    x0, k = generator_sample(world, cond, sigmas, world.noise(cond))  # (n, ...) with grad at student step k
    with torch.no_grad():  # the rollout's reward is logged either way; only RT-DM uses it
        reward = world.reward(complete_rollout(world, cond, sigmas, x0.detach(), k), cond)  # (n,)
    check_finite(reward.mean(), "reward")
    weights = reward_tilt_weights(reward, args.rt_dm_beta) if args.rt_dm else None  # (n,)
    loss = distribution_matching_loss(world, args, x0, cond, step, weights)
    check_finite(loss, "dmd_loss")
    opt_generator.zero_grad(set_to_none=True)
    loss.backward()
    sync_and_clip(world.params("generator"), args.grad_clip)
    opt_generator.step()
    out = {"dmd_loss": loss.item(), "fake_loss": fake_loss, "train_reward": reward.mean().item(), "student_step": k}
    if weights is not None:
        out["rt_dm_weight_max"] = weights.max().item()
    return out


def stage2_step(world, args, sigmas, step, opt_generator, opt_fake, ref_values):
    """Stage 2: L = L_dmd + lambda_rl * L_rl (eq. 3), one generator update (after TTUR fake updates if DMD is on)."""
    out = {}
    if args.dmd:
        out["fake_loss"] = fake_updates(world, args, sigmas, step, opt_fake)
    n = args.batch_size
    total = 0.0
    if args.rl in ("dpo", "grpo"):
        cond = world.sample_cond(n // args.group_size).repeat_interleave(args.group_size)  # one condition per group
    else:
        cond = world.sample_cond(n)
    # DPO swaps the reference's weights into the generator in place: it runs before any graph through them exists
    loss_rl, reward = None, None
    if args.rl == "dpo":
        with torch.no_grad():
            x_final = sample_student(world, cond, sigmas, world.noise(cond))  # (n, ...) complete rollouts
            reward = world.reward(x_final, cond)
        check_finite(reward.mean(), "reward")
        r = reward.reshape(-1, args.group_size)  # (groups, G)
        rows = torch.arange(r.shape[0], device=r.device) * args.group_size
        best, worst = rows + r.argmax(1), rows + r.argmin(1)
        loss_rl = dpo_rl_loss(world, cond[best], x_final[best], x_final[worst], sigmas, ref_values, args.dpo_beta)
    elif args.rl == "grpo":
        states, x_final = rollout_with_states(world, cond, sigmas, world.noise(cond))
        with torch.no_grad():
            reward = world.reward(x_final, cond)
        check_finite(reward.mean(), "reward")
        adv = group_advantages(reward, args.group_size)  # (n,)
        logp = trajectory_logprobs(world, states, sigmas, cond)  # (n, K - 1) with grad
        loss_rl = grpo_loss(logp, logp.detach(), adv, args.grpo_clip)  # on-policy: old = the rollout's own policy
    if args.dmd or args.rl == "refl":
        x0, k = generator_sample(world, cond, sigmas, world.noise(cond))  # (n, ...) with grad at student step k
        out["student_step"] = k
    if args.dmd:
        loss_dmd = distribution_matching_loss(world, args, x0, cond, step)
        check_finite(loss_dmd, "dmd_loss")
        out["dmd_loss"] = loss_dmd.item()
        total = total + loss_dmd
    if args.rl == "refl":
        loss_rl = refl_loss(world, x0, cond)
        check_finite(loss_rl, "reward")
        reward = -loss_rl.detach()  # the batch's mean reward, for the log
    if loss_rl is not None:
        check_finite(loss_rl, "rl_loss")
        out["rl_loss"] = loss_rl.item()
        out["train_reward"] = reward.mean().item()
        total = total + args.lambda_rl * loss_rl
    opt_generator.zero_grad(set_to_none=True)
    total.backward()
    sync_and_clip(world.params("generator"), args.grad_clip)
    opt_generator.step()
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
    if args.rl not in RL_LOSSES:
        raise ValueError(f"unknown RL loss {args.rl!r}; valid RL losses: {', '.join(RL_LOSSES)}")
    if not 1 <= args.student_steps <= 8:
        raise ValueError(f"student_steps must be in 1..8, got {args.student_steps}")
    for name in ("stage1_steps", "stage2_steps", "dynamic_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "fake_updates_per_step", "log_every", "eval_every", "eval_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)}")
    for name in ("lr_generator", "lr_fake", "lora_scale_f", "dyna_rs_a", "dyna_rs_b"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(args, name)}")
    for name in ("lambda_rl", "lora_scale_r0", "rt_dm_beta", "guidance_scale", "grad_clip", "dpo_beta", "grpo_clip"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.renoise_min < args.renoise_max <= 1.0:
        raise ValueError(f"need 0 <= renoise_min < renoise_max <= 1, got {args.renoise_min}, {args.renoise_max}")
    if args.stage2_steps > 0:
        if not args.dmd and args.rl == "none":
            raise ValueError("stage 2 with --no-dmd and --rl none trains nothing; drop one of them")
        if args.rl in ("dpo", "grpo"):
            if args.group_size < 2 or args.batch_size % args.group_size:
                raise ValueError(f"--rl {args.rl} needs group_size >= 2 dividing batch_size, got {args.group_size}, "
                                 f"{args.batch_size}")
        if args.rl == "grpo" and args.student_steps < 2:
            raise ValueError("--rl grpo needs student_steps >= 2 (a 1-step student has no stochastic transition)")


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


def make_run_dir(args, method):
    name = args.run_name or f"{method}__{args.model}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.output_dir) / name
    if run_dir.exists():
        raise FileExistsError(f"run directory {run_dir} exists; it is never overwritten (choose another --run-name)")
    run_dir.mkdir(parents=True)
    return run_dir


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


def main(args, world=None):
    """Run both stages. world: an already built world (tests, notebooks); default make_world(args)."""
    args = resolve_defaults(args)
    validate(args)
    rank, world_size, device = setup_distributed(args)
    torch.manual_seed(args.seed)
    world = world if world is not None else make_world(args, device)
    if world_size > 1:
        torch.manual_seed(args.seed + 1000 * rank)  # data parallel: each rank its own noise, prompts and levels
    lead = rank == 0  # data parallel: rank 0 alone evaluates, logs and saves
    run_dir = make_run_dir(args, "dmdr") if lead else None
    if lead:
        (run_dir / "config.json").write_text(json.dumps({"method": "dmdr", **asdict(args)}, indent=2))
    sigmas = student_sigmas(world, args.student_steps)
    opt_generator = torch.optim.AdamW(world.params("generator"), args.lr_generator, weight_decay=args.weight_decay_generator)
    opt_fake = torch.optim.AdamW(world.params("fake"), args.lr_fake, weight_decay=0.0)

    history = []
    log = open(run_dir / "metrics.jsonl", "a") if lead else open(os.devnull, "w")

    def record(entry):
        history.append(entry)
        log.write(json.dumps(entry) + "\n")
        log.flush()

    if lead:
        samples, _, metrics = evaluate(world, sigmas, args.eval_samples, args.seed + 1)
        record({"step": 0, "stage": 0, **metrics})
        save_checkpoint(world, run_dir, 0)
    start = time.time()
    total = args.stage1_steps + args.stage2_steps
    bar = tqdm(total=total, desc="dmdr stage 1", disable=not (args.progress and lead), dynamic_ncols=True)
    ref_values = None
    for step in range(1, total + 1):
        stage = 1 if step <= args.stage1_steps else 2
        if stage == 2 and step == args.stage1_steps + 1:
            what = "RL only" if not args.dmd else ("DMD only" if args.rl == "none" else "joint DMD + RL")
            msg = f"dmdr: stage 2 ({what}, --rl {args.rl}) from step {step}"
            bar.set_description("dmdr stage 2")
            tqdm.write(msg) if args.progress else print(msg)
            ref_values = [p.detach().clone() for p in world.params("generator")]  # DPO's frozen reference
        try:
            if stage == 1:
                losses = stage1_step(world, args, sigmas, step - 1, opt_generator, opt_fake)
            else:
                losses = stage2_step(world, args, sigmas, step - 1, opt_generator, opt_fake, ref_values)
        except FloatingPointError as err:
            log.close()
            bar.close()
            raise FloatingPointError(
                f"{err} at step {step} (stage {stage}); stopped. The last good checkpoint is {run_dir / 'checkpoint'}"
            ) from None
        bar.update(1)
        if step % args.log_every == 0:
            record({"step": step, "stage": stage, "time": time.time() - start, **losses})
            bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items() if k in ("dmd_loss", "rl_loss", "train_reward")})
        stage_end = step in (args.stage1_steps, total)
        if lead and (step % args.eval_every == 0 or stage_end):
            samples, _, metrics = evaluate(world, sigmas, args.eval_samples, args.seed + 1)
            record({"step": step, "stage": stage, "time": time.time() - start, **metrics})
            if "energy_distance" in metrics:  # toy metrics; text-to-image worlds report rewards only
                bar.set_postfix(ed=f"{metrics['energy_distance']:.4f}", reward=f"{metrics['mean_reward']:.3f}",
                                logp=f"{metrics['teacher_logp']:.2f}")
            else:
                bar.set_postfix(reward=f"{metrics['mean_reward']:.3f}")
            save_checkpoint(world, run_dir, step)
        if lead and stage_end:
            world.plot_samples(samples, run_dir / f"samples_stage{stage}.png",
                               f"dmdr stage {stage}, {args.student_steps}-step student, step {step}")
    bar.close()
    log.close()
    if not lead:  # data parallel: the other ranks stop here; rank 0 writes the figures
        return {"run_dir": None, "history": history, "final": history[-1] if history else {}, "world": world}
    if total == 0:
        world.plot_samples(samples, run_dir / "samples_stage0.png", "dmdr, untrained student")
    world.plot_curves(history, ["dmd_loss", "fake_loss", "rl_loss", "mean_reward", "teacher_logp", "energy_distance"],
                      run_dir / "curves.png", "dmdr")
    final = dict(history[-1])
    print(f"dmdr: done in {time.time() - start:.1f} s -> {run_dir}")
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return {"run_dir": run_dir, "history": history, "final": final, "world": world}


if __name__ == "__main__":
    main(tyro.cli(Args))
