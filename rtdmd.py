"""RTDMD: Reward-Tilted Distribution Matching Distillation of a flow teacher into a K-step student (Huang et al. 2026).

    python rtdmd.py                                   # toy world: stage 1 (AC-DMD) then stage 2 (RL), ~80 s on 2 CPU cores
    python rtdmd.py --beta 0.5 --toy-reward-angle 90  # another tilt
    # table 4 of the paper, one command per row (add --seed, --output-dir as needed). On the toy the rows without L_det
    # diverge at the default stage 2 lr 3e-4 (the policy-gradient noise alone drives the adapter off the manifold):
    # add --lr-generator-rl 3e-5 to EVERY row for a like-for-like table (the paper uses 3e-6 on SD).
    python rtdmd.py --rl-steps 0                      #   cold start (AC-DMD only)
    python rtdmd.py --naive-grpo --no-use-det         #   w/ GRPO (all K-1 steps, independent noise)
    python rtdmd.py --subset-size 1 --no-use-det      #   w/ SubGRPO (M = 1)
    python rtdmd.py --subset-size 1                   #     + L_det
    python rtdmd.py --no-use-det                      #   w/ SubGRPO (M = 2)
    python rtdmd.py                                   #     + L_det (the default)
    python rtdmd.py --rl-steps 0 --gamma 0            # table 3: A-DMD (no consistency regulariser)
    python rtdmd.py --dm-scale dmd2 --advantage std --rl-dm-full-chain False   # paper scales
    python rtdmd.py --model sd3.5-medium              # text-to-image, flow presets only (GPU); the paper's scales
    python rtdmd.py --help                            # every option, with its default

A run writes runs/rtdmd__<model>__<seed>__<time>/: config.json, metrics.jsonl, checkpoint/ (generator and fake
adapters), samples_cold_start.png (after stage 1), samples.png (final, over the exact tilted teacher, dashed), curves.png.

The algorithm
    Student: K CPS steps (eq. 19-21) on the levels 1 = t_0 > t_1 > ... > t_{K-1} > t_K = 0. Step k predicts
        x0 = G(x_{t_{k-1}}),  eps_hat = (x - (1 - t_{k-1}) x0) / t_{k-1},
        x_{t_k} = (1 - t_k) x0 + t_k cos(eta pi/2) eps_hat + t_k sin(eta pi/2) z           (eta 0: Euler, 1: consistency)
      a Gaussian policy N(mu_k, (t_k sin(eta pi/2))^2 I) for k < K (eq. 13), deterministic at k = K (t_K = 0).
    Stage 1, AC-DMD (sec. 3.1): pick a step k, roll out to x_{t_k} (gradient through step k only), renoise it to a level
      t in [t_k, 1] and take the DMD step of eq. 9 there (teacher vs fake score); the fake score is trained by denoising
      score matching on the same subinterval (eq. 10) plus gamma times the consistency regulariser (eq. 11-12, appendix F).
    Stage 2 (sec. 3.2, eq. 18): AC-DMD plus beta times the hybrid policy gradient of E[r] (eq. 14):
      SubGRPO on the stochastic steps (eq. 16-17: per group a random subset S of M steps gets independent noise, the
      other steps share the group's noise; group advantages; clipped ratio) + reward back-propagation through the
      deterministic last step (L_det, eq. 15). --naive-grpo: every step independent and used (appendix H).

Which target does stage 2 converge to (the temperature of the tilt)
    Eq. 7: grad KL(p_theta || p~) = grad KL(p_theta || p) - beta grad E[r], so descending the sum reaches
    p~ = p exp(beta r) / Z with the SAME beta only if both terms carry their natural scale and the KL is the KL of the
    output distribution p_theta. Three common choices break that silently, each an unknown change of temperature:
      * DMD2 divides each sample's score difference by mean|x - x0_real| and dmd_loss averages over the data dimension;
      * GRPO divides advantages by the group's reward std: E[A grad log pi] = grad E[r] / std;
      * AC-DMD matches the intermediate states' marginals to the UNTILTED teacher's (the tilted target's are different).
    The toy defaults therefore use, in stage 2: --dm-scale kl (eq. 9 un-normalised, lambda = 1: per sample
    alpha_k(t) (s_fake - s_real), summed over dimensions), --advantage center (r_i - mean of the others: unbiased, also
    under SubGRPO's shared noise; tests check the hybrid estimator's mean against the pathwise gradient) and
    --rl-dm-full-chain (the DM term on the final samples, differentiated through all K steps: the pathwise gradient of
    the output's KL). Stage 2 then descends  E_t KL(p_theta,t || p_t) - beta E[r],  t ~ U[renoise_min, rl_renoise_max].
    Its minimiser is p~ with beta itself in the limit t -> 0 only: at a level t the ambient KL pushes back on a tilt
    by the factor alpha_t J_t (J_t = d E[x0 | x_t] / d x_t; to first order in beta, at p_theta = p~ the DM gradient
    is alpha_t J_t beta grad r against the reward's beta grad r; inside a Gaussian mode of std s the factor is
    alpha_t^2 s^2 / (alpha_t^2 s^2 + t^2) < 1), and mode weights are only seen while modes are separated.
    The fixed point is thus MORE tilted than p~ (an effective beta_eff > beta); a lower rl_renoise_max shrinks the gap
    at the price of a harder fake score (measured on the toy: see the README section / tests/test_rtdmd.py).
    The paper's normalised setting (--dm-scale dmd2 --advantage std --rl-dm-full-chain False) is available (meant for
    the t2i presets); its beta is a knob, not a temperature (on the toy, beta = 1 with it diverges: the reward term
    dominates the normalised DM term).

Corrections of the paper's text (the official code agrees with ours)
    * Eq. 8 / appendix B renoise x_{t_k} to t with std (t - t_k) / (1 - t_k): that adds noise *standard deviations*;
      independent Gaussian noise adds variances. We use  x_t = a x_{t_k} + sqrt(t^2 - a^2 t_k^2) eps,  a = (1-t)/(1-t_k),
      which gives x_t exactly the path's noise level t (tests/test_rtdmd.py checks both against the exact marginal).
    * The consistency regulariser needs a reverse kernel for which the optimal denoiser is self-consistent: we use the
      DDPM posterior step (CPS with sin(eta pi/2) = sqrt(1 - (alpha' sigma'' / (alpha'' sigma'))^2)) from the renoised level
      t' = t to a nearby t'' = t - consistency_gap (the official code uses a nearby level, not t_{k+1}).

Conventions: sigma in [0, 1], sigma = 1 is pure noise; flow worlds only (toy flow, SD3): x = (1 - sigma) x0 + sigma eps,
velocity eps - x0, x0 = x - sigma v. Pre-shift time t maps to sigma = world.sigma(t). The algorithm sees only
x0-predictions, world.renoise / world.alpha and world.reward, so it is identical on every flow world.
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

MODELS = ('toy2d', 'sd3-medium', 'sd3.5-medium', 'sd3.5-large')  # toy2d/, and the presets of t2i/


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
    """text-to-image reward, name[:weight[:cap]],...: clip, pickscore, aesthetic, hpsv2, imagereward (rtdmd: the tilt's reward)"""
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
    """toy noising path: RTDMD needs flow (vp is refused)"""
    toy_classes: int = 0
    """toy class labels (mode k has label k % toy_classes); 0: unconditional"""
    toy_reward: str = "linear"
    """toy reward: linear (exact tilt known), quadratic, radius"""
    toy_reward_angle: float = 0.0
    """direction of the linear reward, in degrees"""
    # ---- student and sampler ----
    student_steps: int = 4
    """K, the number of student sampling steps (pre-shift levels 1, 1 - 1/K, ..., 1/K, then 0)"""
    eta: float = 0.9
    """CPS stochasticity in [0, 1]: 0 Euler ODE, 1 consistency sampler (paper: 0.9)"""
    # ---- stage 1: AC-DMD ----
    cold_steps: Optional[int] = None
    """stage 1 generator updates (toy2d: 400; paper: 1500)"""
    batch_size: Optional[int] = None
    """samples per AC-DMD generator / fake update (toy2d: 256)"""
    lr_generator: Optional[float] = None
    """stage 1 generator learning rate (toy2d: 1e-3; paper SD: 3e-5)"""
    lr_fake: Optional[float] = None
    """fake-score learning rate, both stages (toy2d: 1e-3)"""
    weight_decay_generator: float = 0.0
    """AdamW weight decay of the generator adapter"""
    fake_updates_per_step: int = 5
    """TTUR: fake-score updates per generator update (official code: 10)"""
    guidance_scale: Optional[float] = None
    """classifier-free guidance of the real score (toy2d: 1.0; SD3.5-M: 4.5)"""
    renoise_min: float = 0.02
    """lowest pre-shift renoise time for the last step (k = K); steps k < K renoise in [t_k, renoise_max]"""
    renoise_max: float = 0.98
    """highest pre-shift renoise time"""
    gamma: float = 0.01
    """weight of the consistency regulariser in the fake-score loss (eq. 12; paper 0.01; 0: A-DMD)"""
    consistency_gap: float = 0.05
    """t' - t'' of the consistency regulariser's one reverse step (pre-shift time)"""
    dm_scale: Optional[str] = None
    """distribution-matching scale: kl (un-normalised eq. 9, the tilt's temperature is beta) or dmd2 (normalised,
    as the official code) (toy2d: kl)"""
    # ---- stage 2: reward-tilted KL ----
    rl_steps: Optional[int] = None
    """stage 2 generator updates (toy2d: 800; paper: 1000)"""
    lr_generator_rl: Optional[float] = None
    """stage 2 generator learning rate (toy2d: 3e-4; paper: 3e-6)"""
    beta: float = 1.0
    """reward strength of the tilt p exp(beta r) / Z (eq. 6; paper: 1.0)"""
    groups: Optional[int] = None
    """groups (prompts) per stage 2 update (toy2d: 16; paper SD3: 48)"""
    group_size: Optional[int] = None
    """trajectories per group N (toy2d: 16; paper: 24)"""
    subset_size: int = 2
    """SubGRPO: M stochastic steps per group with independent noise, 1 <= M <= K - 1 (paper: 2)"""
    naive_grpo: bool = False
    """naive GRPO: independent noise at every step, all K - 1 steps in the estimator (appendix H)"""
    use_det: bool = True
    """add L_det, reward back-propagation through the deterministic last step (eq. 15)"""
    advantage: Optional[str] = None
    """group advantage: center ((r - mean) N/(N-1), unbiased) or std ((r - mean)/std, GRPO) (toy2d: center)"""
    advantage_clip: float = 5.0
    """clip advantages to +-this (official code: 5; 0: off)"""
    clip_range: float = 1e-5
    """PPO ratio clip epsilon (paper: 1e-5)"""
    dm_weight_rl: float = 1.0
    """weight of the AC-DMD term in stage 2 (eq. 18: 1)"""
    rl_renoise_max: Optional[float] = None
    """stage 2 (with rl_dm_full_chain): highest pre-shift renoise time of the output's ambient KL. The KL of eq. 7 is
    the t -> 0 limit; high levels push back less (see the docstring), so a lower maximum tilts closer to beta
    (toy2d: 0.5; with 0.98, as stage 1, the toy student runs on to beta_eff ~ 2 instead of settling at ~1.2)"""
    rl_dm_full_chain: Optional[bool] = None
    """stage 2: distribution matching on the final samples only, differentiated through all K steps, i.e. the gradient
    of the output distribution's KL that eq. 7 asks for; False: AC-DMD at a random step as in stage 1 (toy2d: True)"""
    grad_clip: float = 1.0
    """gradient-norm clipping of both adapters (0: off)"""
    # ---- run ----
    seed: int = 0
    """random seed (adapter init, noise, levels)"""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)"""
    output_dir: str = "runs"
    """parent directory of run directories"""
    run_name: Optional[str] = None
    """run directory name (default rtdmd__<model>__<seed>__<time>); an existing directory is never overwritten"""
    log_every: int = 25
    """steps between metrics.jsonl loss records"""
    eval_every: int = 200
    """steps between evaluations (and checkpoints)"""
    eval_samples: Optional[int] = None
    """samples per evaluation (toy2d: 4000; text-to-image: 16, one per evaluation prompt)"""
    progress: bool = True
    """show a tqdm progress bar"""


MODEL_DEFAULTS = {
    "toy2d": dict(eval_samples=4000, 
        cold_steps=400, batch_size=256, lr_generator=1e-3, lr_fake=1e-3, guidance_scale=1.0, dm_scale="kl",
        rl_steps=800, lr_generator_rl=3e-4, groups=16, group_size=16, advantage="center", rl_dm_full_chain=True,
        rl_renoise_max=0.5,
    ),
    # text-to-image (flow presets only), RTDMD's recipe (notes/reference-implementations.md): AC-DMD cold start 1500 steps
    # at lr 3e-5, RL 1000 steps at 3e-6, group size 16 (SD3-M), the paper's normalised scales (dm_scale dmd2, std
    # advantages clipped to 5, AC-DMD at a random step), real CFG 7 (SD3-M) / 4.5 (SD3.5), LoRA r32 alpha64 on both roles.
    # Not reproduced: per-reward advantage normalisation (ours: one weighted reward, PickScore + CLIP score), fake_updates
    # 10 (pass --fake-updates-per-step 10). Ours: batch 8, 4 groups per update, rl_renoise_max = renoise_max.
    **{name: dict(cold_steps=1500, batch_size=8, lr_generator=3e-5, lr_fake=3e-5,
                  guidance_scale=7.0 if name == "sd3-medium" else 4.5, dm_scale="dmd2", rl_steps=1000, lr_generator_rl=3e-6,
                  groups=4, group_size=16, advantage="std", rl_dm_full_chain=False, rl_renoise_max=0.98, eval_samples=16,
                  t2i_reward="pickscore,clip", lora_rank=32, lora_alpha=64, fake_lora_rank=32, fake_lora_alpha=64)
       for name in ("sd3-medium", "sd3.5-medium", "sd3.5-large")},
}


# =====================================================================================================
#                                          the algorithm
# =====================================================================================================


# Copied from dmd.py: student_sigmas
def student_sigmas(world, student_steps):
    """The student's K noise levels: pre-shift times 1, 1 - 1/K, ..., 1/K through the world's shift."""
    return [float(world.sigma(torch.tensor(1.0 - k / student_steps))) for k in range(student_steps)]


def student_schedule(world, student_steps):
    """[t_0 = 1, t_1, ..., t_{K-1}, t_K = 0] as noise levels: the K student levels and the clean end."""
    return student_sigmas(world, student_steps) + [0.0]


def _col(v, x):
    """A number or per-sample (n,) tensor as something that broadcasts against x (n, ...)."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() == 1 else v


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
    """Standard deviation of the CPS transition, sigma_k = t_k sin(eta pi / 2) (eq. 13)."""
    return sigma_next * math.sin(eta * math.pi / 2)


def transition_log_prob(x_next, mean, std):
    """log N(x_next; mean, std^2 I) (n,), summed over the data dimensions (eq. 13, with its constant)."""
    d = x_next[0].numel()
    sq = ((x_next - mean) ** 2).flatten(1).sum(1)
    return -sq / (2 * std**2) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


def ddpm_eta(sigma, sigma_next):
    """The eta for which a CPS step is the DDPM posterior step q(x_s' | x_s, x0) of the flow path:
    sin(eta pi/2) = sqrt(1 - (alpha sigma' / (alpha' sigma))^2); tensors or numbers."""
    ratio = ((1 - sigma) * sigma_next / ((1 - sigma_next) * sigma)).clamp(0.0, 1.0)
    return torch.asin((1 - ratio**2).sqrt()) * (2 / math.pi)


def sample_student(world, cond, schedule, eta, noise, stop=None, noises=None, generator=None):
    """K-step CPS sampling from noise (n, ...). schedule = [t_0, ..., t_K]. With stop=k returns the state x_{t_k}
    after k steps (k = K: the clean sample). noises: optional list of the K-1 injected noises (else fresh ones)."""
    stop = len(schedule) - 1 if stop is None else stop
    x = noise
    for k in range(1, stop + 1):
        x0 = world.x0("generator", x, schedule[k - 1], cond)
        if schedule[k] == 0:  # the deterministic last step (t_K = 0)
            return x0
        where = generator.device if generator is not None else x.device  # a CPU generator with a CUDA world
        z = noises[k - 1] if noises is not None else torch.randn(x.shape, generator=generator, device=where,
                                                                 dtype=x.dtype).to(x.device)
        x = cps_step(x, x0, schedule[k - 1], schedule[k], eta, z)
    return x


def generator_state(world, cond, schedule, eta, noise, k, full_chain=False):
    """Backward simulation for step k in 1..K: steps 1..k-1 without grad, step k WITH grad. Returns x_{t_k} (n, ...).
    full_chain=True differentiates all k steps (the pathwise derivative of x_{t_k} w.r.t. theta, noise held fixed)."""
    with torch.set_grad_enabled(full_chain and torch.is_grad_enabled()):
        x = sample_student(world, cond, schedule, eta, noise, stop=k - 1)
    x0 = world.x0("generator", x, schedule[k - 1], cond)
    if schedule[k] == 0:
        return x0
    return cps_step(x, x0, schedule[k - 1], schedule[k], eta, torch.randn_like(x))


# ---- stage 1: AC-DMD (eq. 8-12) ----


def ambient_renoise(world, x_s, s, t, eps):
    """Renoise a state at level s to level t >= s (per sample): x_t = a x_s + sqrt(t^2 - a^2 s^2) eps, a = alpha_t / alpha_s.
    If x_s = alpha_s x0 + s eps', then x_t = alpha_t x0 + t eps'': the path's marginal at t (eq. 8, variance-correct)."""
    s, t = _col(s, x_s), _col(t, x_s)
    a = world.alpha(t) / world.alpha(s)
    return a * x_s + (t**2 - a**2 * s**2).clamp(min=0).sqrt() * eps


def renoise_levels(world, s_time, n, args, device, hi=None):
    """Pre-shift renoise times t in [t_k, renoise_max] (k = K: [renoise_min, renoise_max]) -> noise levels (n,)."""
    lo = max(s_time, args.renoise_min)
    hi = args.renoise_max if hi is None else hi
    u = lo + (hi - lo) * torch.rand(n, device=device)
    return world.sigma(u)


def acdmd_generator_loss(world, x_s, s, cond, t, guidance_scale, eta, dm_scale):
    """The AC-DMD generator loss of states x_s (n, ..., with grad) at level s, renoised to levels t (n,) in [s, 1] (eq. 9).
    dm_scale "kl": d loss / d x_s,i = alpha_k(t) (s_fake - s_real)(x_t) / n, the un-normalised per-sample KL gradient,
        with s(x, t) = (alpha_t x0 - x) / t^2 the flow marginal score;
    dm_scale "dmd2": the official code's step: teacher and fake each take one CPS step back from t to s with shared
        noise, and the DMD2-normalised dmd_grad between x_s and the two results (= DMD2 exactly for s = 0)."""
    with torch.no_grad():
        x_t = ambient_renoise(world, x_s, s, t, torch.randn_like(x_s))
        x0_real = world.x0("teacher", x_t, t, cond, cfg=guidance_scale)
        x0_fake = world.x0("fake", x_t, t, cond)
        if dm_scale == "kl":
            tc = _col(t, x_s)
            a = world.alpha(tc) / world.alpha(_col(s, x_s))
            grad = a * world.alpha(tc) * (x0_fake - x0_real) / tc**2  # alpha_k (s_fake - s_real)
        else:
            if s > 0:
                z = torch.randn_like(x_s)
                x0_real = cps_step(x_t, x0_real, t, s, eta, z)
                x0_fake = cps_step(x_t, x0_fake, t, s, eta, z)
            grad = dmd_grad(x_s, x0_real, x0_fake)
    if dm_scale == "kl":
        return dmd_loss(x_s, grad) * x_s[0].numel()  # per-sample sum over dimensions, mean over samples
    return dmd_loss(x_s, grad)


def ambient_x0_target(world, x_s, s, t, eps):
    """Denoising target of eq. 10 in x0 form. x_t = ambient_renoise(x_s, s, t, eps); the conditional score
    (a x_s - x_t) / sigma_k^2 (sigma_k^2 = t^2 - a^2 s^2) equals the flow score (alpha_t x0* - x_t) / t^2 of
        x0* = x_s / alpha_s - alpha_t s^2 / (alpha_s^2 sigma_k) eps,
    so E[x0* | x_t] is the student marginal's x0-prediction (appendix D). s = 0 gives x0* = x_s. Returns x_t, x0*, sigma_k."""
    sc, tc = _col(s, x_s), _col(t, x_s)
    a_s, a_t = world.alpha(sc), world.alpha(tc)
    sigma_k = (tc**2 - (a_t / a_s) ** 2 * sc**2).clamp(min=1e-12).sqrt()
    x_t = ambient_renoise(world, x_s, s, t, eps)
    target = x_s / a_s - a_t * sc**2 / (a_s**2 * sigma_k) * eps
    return x_t, target, sigma_k.reshape(-1)


def ambient_fake_loss(world, x_s, s, cond, t):
    """Eq. 10 in the fake model's native loss: weight (sigma_k / t)^2 * world.loss_weight(t) on the x0 error, i.e.
    omega_k(t) = sigma_k^2 / alpha_t^2 on the score error; it is dmd.py's fake_score_loss for s = 0 and keeps the
    variance of the target bounded as t -> s. Returns the loss and (x_t, x0_fake) for the consistency term."""
    eps = torch.randn_like(x_s)
    x_t, target, sigma_k = ambient_x0_target(world, x_s, s, t, eps)
    x0_fake = world.x0("fake", x_t, t, cond)
    per_sample = ((x0_fake - target) ** 2).flatten(1).mean(1)
    return (world.loss_weight(t) * (sigma_k / t) ** 2 * per_sample).mean(), x_t, x0_fake


def consistency_loss(world, x_t, t, h, cond, gap):
    """Eq. 11 with appendix F's two-sample estimator: from x_t (level t, fake x0-prediction h) take two independent
    DDPM-posterior steps to t'' = t - gap with the fake's own prediction, and return mean (h'_1 - h) . (h'_2 - h):
    unbiased for ||E h' - h||^2, which is 0 for the optimal (self-consistent) denoiser (appendix E)."""
    t2 = (t - gap).clamp(min=1e-3)
    eta = ddpm_eta(t, t2)
    h_next = []
    for _ in range(2):
        x_next = cps_step(x_t, h, t, t2, eta, torch.randn_like(x_t))
        h_next.append(world.x0("fake", x_next, t2, cond))
    return ((h_next[0] - h) * (h_next[1] - h)).flatten(1).sum(1).mean()


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


def pick_step(schedule, last=False):
    """A student step k uniform in 1..K (last: k = K), and its pre-shift time t_k (for the renoise range)."""
    big_k = len(schedule) - 1
    k = big_k if last else int(torch.randint(1, big_k + 1, (1,)))
    return k, 1.0 - k / big_k


def fake_update(world, args, schedule, opt_fake, last=False):
    """One fake-score update (eq. 12): AC-DMD's ambient DSM on a fresh detached student state + gamma * consistency."""
    n = args.batch_size
    k, s_time = pick_step(schedule, last)
    cond = world.sample_cond(n)
    with torch.no_grad():
        x_s = generator_state(world, cond, schedule, args.eta, world.noise(cond), k)
    s = schedule[k]
    t = renoise_levels(world, s_time, n, args, x_s.device, args.rl_renoise_max if last else None)
    loss, x_t, x0_fake = ambient_fake_loss(world, x_s, s, cond, t)
    cons = consistency_loss(world, x_t, t, x0_fake, cond, args.consistency_gap) if args.gamma > 0 else loss.new_zeros(())
    total = loss + args.gamma * cons
    check_finite(total, "fake_loss")
    opt_fake.zero_grad(set_to_none=True)
    total.backward()
    sync_and_clip(world.params("fake"), args.grad_clip)
    opt_fake.step()
    return loss.item(), cons.item()


def acdmd_loss_batch(world, args, schedule, full_chain=False):
    """AC-DMD generator loss on a fresh batch at a random student step k (full_chain: the final samples, k = K,
    differentiated through every step). Returns (loss with grad, k)."""
    n = args.batch_size
    k, s_time = pick_step(schedule, last=full_chain)
    cond = world.sample_cond(n)
    x_s = generator_state(world, cond, schedule, args.eta, world.noise(cond), k, full_chain)
    t = renoise_levels(world, s_time, n, args, x_s.device, args.rl_renoise_max if full_chain else None)
    return acdmd_generator_loss(world, x_s, schedule[k], cond, t, args.guidance_scale, args.eta, args.dm_scale), k


# ---- stage 2: hybrid policy gradient with SubGRPO (eq. 13-18) ----


def group_noises(world, cond, big_k, group_size, subset_size, naive, generator=None):
    """Noise of a group rollout for cond (G * N,), groups of N consecutive rows sharing one condition.
    SubGRPO (eq. 16): per group a uniform subset S of M of the K-1 stochastic steps gets independent noise; the other
    steps, and the starting noise, share one draw per group. Naive GRPO: everything independent, S = all steps.
    Returns the starting noise (G N, ...), the K-1 step noises, and the mask (G N, K-1) of steps in S."""
    n = cond.shape[0]
    g = n // group_size
    x_start = world.noise(cond, generator)
    noises = [torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
              for _ in range(big_k - 1)]
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
def rollout(world, cond, schedule, eta, x_start, noises):
    """A detached K-step CPS trajectory [x_{t_0}, ..., x_{t_{K-1}}] and the clean samples x_{t_K}."""
    states = [x_start]
    for k in range(1, len(schedule) - 1):
        x = states[-1]
        x0 = world.x0("generator", x, schedule[k - 1], cond)
        states.append(cps_step(x, x0, schedule[k - 1], schedule[k], eta, noises[k - 1]))
    return states, world.x0("generator", states[-1], schedule[-2], cond)


def group_advantages(rewards, group_size, kind, clip_value=0.0):
    """Advantages (n,) from rewards (n,) in groups of group_size consecutive rows.
    center: (r_i - mean) N / (N - 1) = r_i - mean of the others, an unbiased baseline; std: (r_i - mean) / std (GRPO).
    A group whose rewards are all equal gets zero advantages (no NaN)."""
    r = rewards.reshape(-1, group_size)
    centered = r - r.mean(1, keepdim=True)
    if kind == "center":
        adv = centered * group_size / (group_size - 1)
    else:
        std = r.std(1, keepdim=True)
        adv = torch.where(std > 0, centered / std.clamp(min=1e-12), torch.zeros_like(centered))
    if clip_value > 0:
        adv = adv.clamp(-clip_value, clip_value)
    return adv.reshape(-1)


def hybrid_policy_objective(world, cond, schedule, eta, states, mask, advantages, clip_range, use_det=True):
    """The hybrid policy-gradient surrogate to MAXIMISE (eq. 14): its gradient is eq. 17 + eq. 15.
    Stochastic part: (K-1)/M * mean_i sum_{k in S_i} min(rho A_i, clip(rho, 1 +- eps) A_i), rho = pi_theta / pi_old of the
    sampled transition x_{t_k} | x_{t_{k-1}} (eq. 13); on-policy rho = 1 and the gradient is A_i grad log pi.
    Deterministic part: mean_i r(G_theta(x_{t_{K-1}})), the sampled state x_{t_{K-1}} held fixed (appendix G.2).
    Returns (stochastic, deterministic) surrogates (scalars with grad)."""
    big_k = len(schedule) - 1
    m = mask.sum(1).clamp(min=1).to(states[0].dtype)  # |S| per row
    stoc = states[0].new_zeros(states[0].shape[0])
    for k in range(1, big_k):
        x_prev, x_next = states[k - 1], states[k]
        x0 = world.x0("generator", x_prev, schedule[k - 1], cond)
        mean = cps_step(x_prev, x0, schedule[k - 1], schedule[k], eta, torch.zeros_like(x_prev))
        logp = transition_log_prob(x_next, mean, cps_std(schedule[k], eta))
        ratio = (logp - logp.detach()).exp()
        surr = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages)
        stoc = stoc + torch.where(mask[:, k - 1], surr, torch.zeros_like(surr))
    stoc = ((big_k - 1) / m * stoc).mean()
    if not use_det:
        return stoc, stoc.new_zeros(())
    det = world.reward(world.x0("generator", states[-1], schedule[-2], cond), cond).mean()
    return stoc, det


def rl_update(world, args, schedule, opt_generator):
    """One stage 2 generator update: descend AC-DMD - beta (SubGRPO + L_det) (eq. 18). Returns logs."""
    big_k = len(schedule) - 1
    cond = world.sample_cond(args.groups).repeat_interleave(args.group_size, 0)  # one condition per group
    x_start, noises, mask = group_noises(world, cond, big_k, args.group_size, args.subset_size, args.naive_grpo)
    states, x0 = rollout(world, cond, schedule, args.eta, x_start, noises)
    rewards = world.reward(x0, cond)
    adv = group_advantages(rewards, args.group_size, args.advantage, args.advantage_clip)
    stoc, det = hybrid_policy_objective(world, cond, schedule, args.eta, states, mask, adv, args.clip_range, args.use_det)
    dm, k = acdmd_loss_batch(world, args, schedule, args.rl_dm_full_chain)
    loss = args.dm_weight_rl * dm - args.beta * (stoc + det)
    check_finite(loss, "rl_loss")
    opt_generator.zero_grad(set_to_none=True)
    loss.backward()
    sync_and_clip(world.params("generator"), args.grad_clip)
    opt_generator.step()
    return {"dm_loss": dm.item(), "stoc": stoc.item(), "det": det.item(), "reward": rewards.mean().item(), "student_step": k}


def cold_update(world, args, schedule, opt_generator):
    """One stage 1 generator update: AC-DMD (eq. 9) at a random student step."""
    loss, k = acdmd_loss_batch(world, args, schedule)
    check_finite(loss, "dm_loss")
    opt_generator.zero_grad(set_to_none=True)
    loss.backward()
    sync_and_clip(world.params("generator"), args.grad_clip)
    opt_generator.step()
    return {"dm_loss": loss.item(), "student_step": k}


def train_step(world, args, schedule, stage, opt_generator, opt_fake):
    """One RTDMD iteration (algorithm 1): TTUR fake-score updates, then one generator update of the stage."""
    last = stage == 2 and args.rl_dm_full_chain  # the fake tracks the distribution that is matched
    fake, cons = zip(*[fake_update(world, args, schedule, opt_fake, last) for _ in range(args.fake_updates_per_step)])
    logs = cold_update(world, args, schedule, opt_generator) if stage == 1 else rl_update(world, args, schedule, opt_generator)
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


def validate(args):
    """Every check that can fail before any work starts."""
    if args.model == "sdxl":
        raise ValueError("RTDMD's CPS sampler needs a flow model (x = (1 - sigma) x0 + sigma eps); sdxl is a VP / eps model. "
                         f"Use one of {', '.join(m for m in MODELS if m != 'toy2d')} (or dmd.py / dmdr.py / gdmd.py for sdxl)")
    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
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
    if not 2 <= args.student_steps <= 8:
        raise ValueError(f"student_steps must be in 2..8 (RTDMD needs a stochastic step), got {args.student_steps}")
    if not 0.0 <= args.eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {args.eta}")
    for name in ("cold_steps", "rl_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "fake_updates_per_step", "groups", "log_every", "eval_every", "eval_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)}")
    if args.group_size < 2:
        raise ValueError(f"group_size must be >= 2 (group advantages need two trajectories), got {args.group_size}")
    if not 1 <= args.subset_size <= args.student_steps - 1:
        raise ValueError(f"subset_size M must be in 1..K-1 = 1..{args.student_steps - 1}, got {args.subset_size}")
    if args.rl_steps > 0 and args.eta == 0.0 and not args.use_det:
        raise ValueError("eta = 0 makes every step deterministic: the policy gradient needs eta > 0 (or --use-det)")
    for name in ("lr_generator", "lr_fake", "lr_generator_rl"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(args, name)}")
    for name in ("gamma", "beta", "guidance_scale", "advantage_clip", "clip_range", "dm_weight_rl", "grad_clip"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.renoise_min < args.renoise_max <= 1.0:
        raise ValueError(f"need 0 <= renoise_min < renoise_max <= 1, got {args.renoise_min}, {args.renoise_max}")
    if not args.renoise_min < args.rl_renoise_max <= 1.0:
        raise ValueError(f"need renoise_min < rl_renoise_max <= 1, got {args.rl_renoise_max}")
    if not 0.0 < args.consistency_gap < 1.0:
        raise ValueError(f"consistency_gap must be in (0, 1), got {args.consistency_gap}")
    if args.dm_scale not in ("kl", "dmd2"):
        raise ValueError(f"dm_scale must be kl or dmd2, got {args.dm_scale!r}")
    if args.advantage not in ("center", "std"):
        raise ValueError(f"advantage must be center or std, got {args.advantage!r}")


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


def make_world(args, device):
    """The world named by --model (a flow world)."""
    if args.model == "toy2d":
        import toy2d

        torch.set_num_threads(1)  # 2-D toy tensors: thread hand-offs cost more than they save (13x on 2 busy cores)
        world = toy2d.ToyWorld(
            mixture=args.toy_mixture, spread=args.toy_spread, path=args.toy_path, n_classes=args.toy_classes,
            reward=args.toy_reward, reward_angle=args.toy_reward_angle, seed=args.seed, device=device,
        )
    elif args.model in MODELS:
        import t2i
        from t2i.rewards import parse_checkpoints

        world = t2i.T2IWorld(
            args.model, model_path=args.model_path, prompts=args.prompts, eval_prompts=args.eval_prompts,
            resolution=args.resolution, reward=args.t2i_reward, reward_checkpoints=parse_checkpoints(args.reward_checkpoints),
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, fake_lora_rank=args.fake_lora_rank,
            fake_lora_alpha=args.fake_lora_alpha, seed=args.seed, device=device,
        )
    else:
        raise ValueError(f"unknown model {args.model!r}; valid models: {', '.join(MODELS)}")
    if not world.is_flow:
        raise ValueError("RTDMD's CPS sampler needs a flow world (world.is_flow is False)")
    return world


def make_run_dir(args, method):
    name = args.run_name or f"{method}__{args.model}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.output_dir) / name
    if run_dir.exists():
        raise FileExistsError(f"run directory {run_dir} exists; it is never overwritten (choose another --run-name)")
    run_dir.mkdir(parents=True)
    return run_dir


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


@torch.no_grad()
def evaluate(world, schedule, eta, n, seed, beta=None):
    """Student samples (CPS, the training sampler) from fixed noise, and the world's metrics (vs the tilted teacher too)."""
    gen = torch.Generator().manual_seed(seed)
    cond = world.sample_cond(n, gen)
    samples = sample_student(world, cond, schedule, eta, world.noise(cond, gen), generator=gen)
    return samples, cond, world.evaluate(samples, cond, beta=beta)


def main(args, world=None):
    """Run the method. world: an already built world (tests, notebooks); default make_world(args)."""
    args = resolve_defaults(args)
    validate(args)
    rank, world_size, device = setup_distributed(args)
    torch.manual_seed(args.seed)
    world = world if world is not None else make_world(args, device)
    if world_size > 1:
        torch.manual_seed(args.seed + 1000 * rank)  # data parallel: each rank its own noise, prompts and levels
    lead = rank == 0  # data parallel: rank 0 alone evaluates, logs and saves
    run_dir = make_run_dir(args, "rtdmd") if lead else None
    if lead:
        (run_dir / "config.json").write_text(json.dumps({"method": "rtdmd", **asdict(args)}, indent=2))
    schedule = student_schedule(world, args.student_steps)
    opt_generator = torch.optim.AdamW(world.params("generator"), args.lr_generator, weight_decay=args.weight_decay_generator)
    opt_fake = torch.optim.AdamW(world.params("fake"), args.lr_fake, weight_decay=0.0)
    beta = args.beta if args.toy_reward in ("linear", "quadratic") else None

    history = []
    log = open(run_dir / "metrics.jsonl", "a") if lead else open(os.devnull, "w")

    def record(entry):
        history.append(entry)
        log.write(json.dumps(entry) + "\n")
        log.flush()

    if lead:
        samples, _, metrics = evaluate(world, schedule, args.eta, args.eval_samples, args.seed + 1, beta)
        record({"step": 0, "stage": 1, **metrics})
        save_checkpoint(world, run_dir, 0)
    start = time.time()
    total = args.cold_steps + args.rl_steps
    bar = tqdm(range(1, total + 1), desc="rtdmd stage 1 (AC-DMD)", disable=not (args.progress and lead), dynamic_ncols=True)
    for step in bar:
        stage = 1 if step <= args.cold_steps else 2
        if stage == 2 and step == args.cold_steps + 1:
            if lead:
                world.plot_samples(samples, run_dir / "samples_cold_start.png",
                                   f"rtdmd after stage 1 (AC-DMD), step {args.cold_steps}", beta=beta)
            for group in opt_generator.param_groups:
                group["lr"] = args.lr_generator_rl
            bar.set_description("rtdmd stage 2 (reward-tilted KL)")
            if not args.progress:
                print(f"rtdmd: stage 2 (reward-tilted KL, beta={args.beta}) from step {step}")
        try:
            losses = train_step(world, args, schedule, stage, opt_generator, opt_fake)
        except FloatingPointError as err:
            log.close()
            raise FloatingPointError(
                f"{err} at step {step} (stage {stage}); stopped. The last good checkpoint is {run_dir / 'checkpoint'}"
            ) from None
        if step % args.log_every == 0:
            record({"step": step, "stage": stage, "time": time.time() - start, **losses})
            bar.set_postfix(dm=f"{losses['dm_loss']:.2e}", fake=f"{losses['fake_loss']:.3f}")
        if lead and (step % args.eval_every == 0 or step == args.cold_steps or step == total):
            samples, cond, metrics = evaluate(world, schedule, args.eta, args.eval_samples, args.seed + 1, beta)
            record({"step": step, "stage": stage, "time": time.time() - start, **metrics})
            bar.set_postfix(reward=f"{metrics['mean_reward']:.3f}",
                            **({"ed": f"{metrics['energy_distance']:.4f}"} if "energy_distance" in metrics else {}))
            save_checkpoint(world, run_dir, step)
    log.close()
    if not lead:  # data parallel: the other ranks stop here; rank 0 writes the figures
        return {"run_dir": None, "history": history, "final": history[-1] if history else {}, "world": world}

    world.plot_samples(samples, run_dir / "samples.png",
                       f"rtdmd, {args.student_steps}-step student, beta={args.beta}, step {total}", beta=beta)
    world.plot_curves(history, ["dm_loss", "fake_loss", "consistency", "reward", "energy_distance",
                                "energy_distance_tilted", "mean_reward", "teacher_logp"], run_dir / "curves.png", "rtdmd")
    final = {k: v for k, v in history[-1].items()}
    print(f"rtdmd: done in {time.time() - start:.1f} s -> {run_dir}")
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return {"run_dir": run_dir, "history": history, "final": final, "world": world}


if __name__ == "__main__":
    main(tyro.cli(Args))
