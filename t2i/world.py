"""The text-to-image world: SD3 (rectified flow) and SDXL (VP) through diffusers + peft, behind toy2d's interface.

Roles, as the authors run SD3 (one frozen base, LoRA adapters):
    teacher    the pretrained transformer (SD3) / UNet (SDXL) with every adapter off, classifier-free guidance
    fake       base + the peft LoRA adapter "fake"        (fp32 parameters, its own optimiser in the method)
    generator  base + the peft LoRA adapter "generator"   (fp32 parameters, its own optimiser in the method)
    DMDR's DynaDG real score is x0("fake", ..., cfg=w, adapter_scale=lambda): teacher + lambda * fake adapter.
One base in bf16 (fp32 on CPU) holds both adapters. Switching roles sets the active adapter directly on every LoRA
layer (layer._active_adapter) and its scale in layer.scaling: peft's set_adapter / enable_adapters /
disable_adapters would also flip requires_grad, and a role switched between building a graph and backward() would
then silently lose its gradients (DESIGN.md pitfalls). requires_grad is set once, at construction.
With gradient checkpointing the blocks are recomputed during backward(), after other roles may have run: the
checkpoint function therefore re-applies the adapter state of the original forward pass while it recomputes.

Conventions (the same as toy2d): sigma in [0, 1], sigma = 1 pure noise.
    SD3 (flow):  x = (1 - sigma) x0 + sigma eps, the transformer predicts v = eps - x0 at timestep 1000 sigma,
                 x0 = x - sigma v. A pre-shift time t maps to sigma = s t / (1 + (s - 1) t), s = the scheduler's shift (3).
    SDXL (VP):   x = alpha x0 + sigma eps, alpha^2 + sigma^2 = 1, alpha^2 = alphas_cumprod[tau] of the model's own
                 scaled-linear schedule, the UNet predicts eps at timestep tau, x0 = (x - sigma eps) / alpha.
                 A pre-shift time t maps to tau = 1000 t - 1 (t = 1, .75, .5, .25 -> DMD2's 999, 749, 499, 249),
                 interpolated linearly between integer timesteps; sigma(t=1) = 0.9977 as in the toy's vp path.
    Latents are the VAE's scaled latents (what the pipelines denoise); decode() returns images in [0, 1], in fp32.
Conditions are prompt indices (n,) into one table: the training prompts, then the evaluation prompts, then "" (the null
condition of classifier-free guidance). Their text embeddings are computed once into an on-disk, memory-mapped cache
(t2i/embeddings.py: built by the process with LOCAL_RANK 0, read by every rank; a later run with the same model and
prompt files loads no text encoder at all), and a batch's rows are moved to the device once per batch, not at every
forward.

Precision and speed (GPU defaults): base in bf16 with fp32 LoRA parameters and optimiser state; the transformer / UNet
forward under bf16 autocast; TF32 matmuls and convolutions; the VAE loaded in fp32 from disk (not rounded through
bf16) and decoded in fp32, in chunks of decode_chunk images, each chunk (decode + reward) checkpointed when
decode_checkpointing is on, so the reward's backward holds one chunk's activations at a time.
"""

import contextlib
import gc
import logging
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from . import embeddings
from .presets import get_preset
from .rewards import WeightedReward

ROLES = ("teacher", "fake", "generator")
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
# LoRA targets: the attention projections (diffusers' SD3 / SDXL LoRA training examples; RTDMD: attention projections)
LORA_TARGETS = {
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
REAL_MODEL_PARAMETERS = 10**8  # above this a base is real weights (SD3-M's transformer: 2e9; the tiny test models: 1e5)


def read_prompts(path):
    """Prompts from a text file, one per line (blank lines and lines starting with # skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def pipeline_class(family):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    return StableDiffusion3Pipeline if family == "sd3" else StableDiffusionXLPipeline


def load_pipeline(preset, model_path=None, dtype=torch.float32, text_encoders=True):
    """The preset's pipeline through the real from_pretrained (a local copy when model_path is given): every component
    in dtype except the VAE, read in fp32 straight from disk (a bf16 load then upcast would round its weights);
    text_encoders=False skips the text encoders and tokenizers (their embeddings are cached)."""
    source = model_path or preset.repo
    skip = {} if text_encoders else {name: None for name in TEXT_COMPONENTS if preset.family == "sd3" or "3" not in name}
    try:
        return pipeline_class(preset.family).from_pretrained(source, dtype={"default": dtype, "vae": torch.float32},
                                                             **skip)
    except Exception as err:  # noqa: BLE001 (missing files, gated repository, no network: one clear message)
        where = f"the local copy {model_path!r}" if model_path else f"the hub repository {preset.repo!r}"
        licence = (f" The repository is gated: accept its licence at https://huggingface.co/{preset.repo} and log in "
                   "(hf auth login) before downloading." if preset.gated else "")
        raise RuntimeError(
            f"--model {preset.name}: could not load the weights from {where} ({type(err).__name__}: {err}).{licence} "
            f"Without network, download {preset.repo} elsewhere (hf download {preset.repo} --local-dir DIR) and pass "
            f"--model-path DIR."
        ) from err


def enable_tf32():
    """TF32 tensor cores for fp32 matmuls and convolutions (the VAE decode, the reward models, the fp32 LoRA path)."""
    try:  # the precision API of current torch; mixing it with the legacy allow_tf32 flags is an error
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    except AttributeError:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def _quiet():
    """Silence transformers' and diffusers' warnings (prompt truncation) for the duration of the block."""
    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class T2IWorld:
    """SD3 / SDXL world. The interface (shared with toy2d.ToyWorld) is the methods' only view of it."""

    def __init__(
        self,
        model="sd3-medium",
        model_path=None,
        prompts=None,
        eval_prompts=None,
        resolution=None,
        reward="clip",
        reward_checkpoints=None,
        lora_rank=64,
        lora_alpha=128,
        fake_lora_rank=32,
        fake_lora_alpha=32,
        n_fakes=1,
        seed=0,
        device="cpu",
        dtype=None,
        max_sequence_length=256,
        gradient_checkpointing=None,
        autocast=None,
        tf32=None,
        decode_chunk=None,
        decode_checkpointing=None,
        prompt_cache_dir=None,
    ):
        """gradient_checkpointing: recompute the transformer / UNet blocks (and the VAE decoder's) in backward (default:
        on CUDA). autocast: bf16 autocast around the transformer / UNet forward (default: on CUDA; on a CPU it runs
        torch's CPU autocast). tf32: TF32 matmuls and convolutions (default: on CUDA; a process-wide torch setting).
        decode_chunk: images per VAE decode in reward() (default: the whole batch). decode_checkpointing: checkpoint
        each chunk's decode + reward, so its activations are recomputed in backward instead of stored (default: as
        gradient_checkpointing). prompt_cache_dir: where the prompt-embedding cache lives (default:
        t2i.embeddings.default_cache_dir(), $T2I_CACHE_DIR or ~/.cache/t2i-prompt-embeddings)."""
        self.preset = get_preset(model)
        self.name = model
        self.family = self.preset.family
        self.is_flow = self.family == "sd3"
        self.path = "flow" if self.is_flow else "vp"
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
        self.autocast = on_gpu if autocast is None else bool(autocast)
        self.gradient_checkpointing = on_gpu if gradient_checkpointing is None else bool(gradient_checkpointing)
        self.decode_checkpointing = self.gradient_checkpointing if decode_checkpointing is None else bool(decode_checkpointing)
        if decode_chunk is not None and decode_chunk < 1:
            raise ValueError(f"decode_chunk must be a positive integer, got {decode_chunk}")
        self.decode_chunk = decode_chunk
        if tf32 if tf32 is not None else on_gpu:
            enable_tf32()
        train = read_prompts(prompts or PROMPTS_DIR / "train.txt")
        held_out = read_prompts(eval_prompts or PROMPTS_DIR / "eval.txt")
        self.prompts = train + held_out + [""]  # cond indexes this table
        self.n_train, self.n_eval = len(train), len(held_out)
        self.null_label = len(self.prompts) - 1

        # the prompt-embedding cache: one entry per prompt list; the text encoders load only if an entry must be built
        cache_dir = Path(prompt_cache_dir) if prompt_cache_dir is not None else embeddings.default_cache_dir()
        fingerprint = embeddings.model_fingerprint(model_path or self.preset.repo)
        parts = [("prompts", train, str(prompts or PROMPTS_DIR / "train.txt")),
                 ("prompts", held_out, str(eval_prompts or PROMPTS_DIR / "eval.txt")), ("null", [""], "the null prompt")]
        entries = []
        for kind, texts, what in parts:
            key, spec = embeddings.entry_key(fingerprint, kind, texts, self.dtype, max_sequence_length, self.family)
            entries.append((cache_dir / key, spec, kind, texts, what))
        builder = embeddings.is_builder()
        to_build = [e for e in entries if not (e[0] / "meta.json").exists()] if builder else []

        pipe = load_pipeline(self.preset, model_path, self.dtype, text_encoders=bool(to_build))
        self.vae_scale_factor = pipe.vae_scale_factor
        self.resolution = resolution or self.preset.resolution
        self.net = pipe.transformer if self.is_flow else pipe.unet
        if prompts is None and sum(p.numel() for p in self.net.parameters()) > REAL_MODEL_PARAMETERS:
            warnings.warn(f"--model {model}: real weights with the default prompt file {PROMPTS_DIR / 'train.txt'}, "
                          f"{self.n_train} smoke-test prompts: a real run needs a real prompt set (--prompts FILE, one "
                          "prompt a line)", stacklevel=2)
        patch = getattr(self.net.config, "patch_size", 1) or 1
        if self.resolution % (self.vae_scale_factor * patch):
            raise ValueError(f"resolution {self.resolution} must be a multiple of {self.vae_scale_factor * patch}")
        size = self.resolution // self.vae_scale_factor
        self.data_shape = (self.net.config.in_channels, size, size)  # latent (C, h, w)
        if to_build:
            self._build_prompt_cache(pipe, to_build, max_sequence_length)
        for directory, *_ in entries:
            embeddings.wait_for_entry(directory)
        self.text = embeddings.PromptTable([embeddings.open_entry(e[0]) for e in entries])
        self._device_text = OrderedDict()  # a few recent batches' embeddings on the device, keyed by their indices
        if not self.is_flow:  # SDXL micro-conditioning: original size, crop top-left (0, 0), target size
            res = self.resolution
            self.time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=self.device, dtype=self.dtype)

        # the noise schedule, from the model's own scheduler config
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        if self.is_flow:
            self.shift = float(self.preset.shift or pipe.scheduler.config.get("shift", 1.0))
            self.sigma_max = 1.0
        else:
            from diffusers import DDPMScheduler

            acp = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.double()  # (T,)
            self._vp_sigmas = (1 - acp).sqrt().to(self.device)  # (T,) increasing in tau
            self.shift = 1.0
            self.sigma_max = float(self._vp_sigmas[-1])

        # frozen base (requires_grad off once, here), VAE in fp32 (as loaded) for decoding into rewards
        self.vae = pipe.vae.to(self.device).eval().requires_grad_(False)
        self.net = self.net.to(self.device, self.dtype).requires_grad_(False)
        self._add_adapters(lora_rank, lora_alpha, fake_lora_rank, fake_lora_alpha, n_fakes, seed)
        if self.gradient_checkpointing:
            self.net.enable_gradient_checkpointing(gradient_checkpointing_func=self._checkpoint)
            self.vae.enable_gradient_checkpointing()
        self.scheduler_config = dict(pipe.scheduler.config)
        del pipe
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        self.reward_fn = WeightedReward(reward, self.prompts, self.device, reward_checkpoints)

    # ---- conditions and noise ----
    def sample_cond(self, n, generator=None, split=None):
        """n prompt indices (n,). split "train": uniform over the training prompts; "eval": the held-out prompts in
        order, cycled (the same prompts at every evaluation). Default: "eval" when a generator is given (the methods'
        evaluation draws its fixed noise from one), else "train"."""
        split = split or ("eval" if generator is not None else "train")
        if split == "train":
            idx = torch.randint(self.n_train, (n,), generator=generator)
        elif split == "eval":
            idx = self.n_train + torch.arange(n) % self.n_eval
        else:
            raise ValueError(f"unknown split {split!r}; valid splits: train, eval")
        return idx.to(self.device)

    def null_cond(self, cond):
        """The null condition (the empty prompt), shaped like cond."""
        return torch.full_like(cond, self.null_label)

    def noise(self, cond, generator=None):
        """Pure noise (n, C, h, w) in fp32, drawn on the generator's device (as diffusers' randn_tensor) then moved."""
        where = generator.device if generator is not None else self.device
        return torch.randn(cond.shape[0], *self.data_shape, generator=generator, device=where).to(self.device)

    # ---- time and path ----
    def sigma(self, t):
        """The model's noise level for a pre-shift time t in [0, 1] (number or tensor).
        SD3: s t / (1 + (s - 1) t). SDXL: sqrt(1 - alphas_cumprod) at tau = 1000 t - 1, linearly interpolated."""
        if self.is_flow:
            return self.shift * t / (1 + (self.shift - 1) * t)
        tt = torch.as_tensor(t, dtype=torch.float64, device=self.device)
        tau = (self.num_train_timesteps * tt - 1).clamp(0, self.num_train_timesteps - 1)
        lo = tau.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = tau - lo
        s = self._vp_sigmas[lo] * (1 - frac) + self._vp_sigmas[lo + 1] * frac
        if torch.is_tensor(t):
            return s.to(t.dtype if t.is_floating_point() else torch.float32).to(t.device)
        return float(s)

    def alpha(self, sigma):
        """Signal coefficient at sigma (flow: 1 - sigma; VP: sqrt(1 - sigma^2))."""
        if self.is_flow:
            return 1.0 - sigma
        if torch.is_tensor(sigma):
            return (1.0 - sigma**2).clamp(min=0.0).sqrt()
        return max(0.0, 1.0 - sigma**2) ** 0.5

    def renoise(self, x0, sigma, eps):
        """x_sigma = alpha(sigma) x0 + sigma eps; sigma a number or per-sample (n,)."""
        s = self._per_sample(sigma, x0).reshape(-1, *[1] * (x0.dim() - 1))
        return self.alpha(s) * x0 + s * eps

    def loss_weight(self, sigma):
        """x0 error -> the model's native loss: velocity 1 / sigma^2 (SD3), eps alpha^2 / sigma^2 (SDXL)."""
        return 1.0 / sigma**2 if self.is_flow else self.alpha(sigma) ** 2 / sigma**2

    def timestep(self, sigma):
        """The network's timestep for noise levels sigma (n,): 1000 sigma (SD3, FlowMatchEulerDiscreteScheduler's
        convention), or tau with sqrt(1 - alphas_cumprod[tau]) = sigma (SDXL, inverse of the interpolated table)."""
        if self.is_flow:
            return sigma.float() * self.num_train_timesteps
        tab = self._vp_sigmas
        s = sigma.double().clamp(float(tab[0]), float(tab[-1]))
        i = torch.searchsorted(tab, s).clamp(1, len(tab) - 1)
        tau = (i - 1) + (s - tab[i - 1]) / (tab[i] - tab[i - 1])
        # a float32 sigma carries ~1e-4 of timestep round-off: snap to the schedule's integer timesteps (those of the
        # stock pipelines, e.g. DMD2's 999 / 749 / 499 / 249), which x0 = (x - sigma eps) / alpha amplifies at high noise
        tau = torch.where((tau - tau.round()).abs() < 1e-3, tau.round(), tau)
        return tau.float()

    def _vp_coefficients(self, tau):
        """(alpha, sigma) (n, 1, 1, 1) in float64 at (fractional) timesteps tau (n,), from the interpolated table."""
        lo = tau.double().floor().long().clamp(0, self.num_train_timesteps - 2)
        frac = (tau.double() - lo)
        sig = (self._vp_sigmas[lo] * (1 - frac) + self._vp_sigmas[lo + 1] * frac).reshape(-1, 1, 1, 1)
        return (1 - sig**2).sqrt(), sig

    # ---- the three roles ----
    def x0(self, role, x, sigma, cond, cfg=1.0, adapter_scale=1.0):
        """x0-prediction (n, C, h, w) in fp32 of a role at level sigma, with classifier-free guidance cfg (both branches in
        one batch, the role's adapter active in both, as a LoRA is in a guided pipeline call)."""
        if role != "teacher" and role not in self.adapter_roles:
            raise ValueError(f"unknown role {role!r}; valid roles: teacher, {', '.join(self.adapter_roles)}")
        sigma = self._per_sample(sigma, x)
        guided = cfg != 1.0 and not bool((cond == self.null_label).all())
        if guided:
            x_in, s_in, c_in = torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([self.null_cond(cond), cond])
        else:
            x_in, s_in, c_in = x, sigma, cond
        with self.adapter(role, adapter_scale):
            out = self._forward(x_in, s_in, c_in).float()  # native output: velocity (SD3) / eps (SDXL)
        if self.is_flow:
            x0 = x_in - s_in.reshape(-1, 1, 1, 1) * out
        else:  # alpha, sigma from the schedule in float64: near sigma = 1, sqrt(1 - sigma^2) of a float32 sigma is off by 1e-5
            alpha, sig = self._vp_coefficients(self.timestep(s_in))
            x0 = ((x_in.double() - sig * out.double()) / alpha).float()
        if guided:
            uncond, cond_pred = x0.chunk(2)
            return uncond + cfg * (cond_pred - uncond)
        return x0

    def params(self, role):
        """Trainable parameters of the role's LoRA adapter (fp32), in a fixed order (the teacher has none)."""
        return list(self._params[role])

    def lora_factors(self, role):
        """The role's LoRA as [(A (r, in), B (out, r), scaling alpha / r)] per adapted layer, the parameters themselves
        (a layer's weight change is scaling * B @ A), in a fixed order that is the same for every role."""
        return [(layer.lora_A[role].weight, layer.lora_B[role].weight, self._scaling[role]) for layer in self._lora_layers
                if role in layer.lora_A]

    def reward(self, x0, cond):
        """Differentiable per-sample reward (n,) of clean latents: fp32 VAE decode, then the reward models; in chunks of
        decode_chunk images, each chunk checkpointed (recomputed in backward, not stored) when decode_checkpointing is
        on and gradients are being recorded."""
        step = self.decode_chunk or x0.shape[0]
        checkpointed = self.decode_checkpointing and torch.is_grad_enabled() and x0.requires_grad
        out = []
        for i in range(0, x0.shape[0], step):
            x, c = x0[i : i + step], cond[i : i + step]
            if checkpointed:
                from torch.utils.checkpoint import checkpoint

                out.append(checkpoint(self._decode_and_score, x, c, use_reentrant=False))
            else:
                out.append(self._decode_and_score(x, c))
        return torch.cat(out)

    def _decode_and_score(self, x0, cond):
        return self.reward_fn(self.decode(x0), cond)

    def reward_terms(self, x0, cond):
        """The reward spec's terms {name: (weight, capped per-sample score (n,))}: reward() is their weighted sum.
        Decoded in chunks of decode_chunk as reward() is (GDMD scores B x n targets at once, without grad)."""
        step = self.decode_chunk or x0.shape[0]
        parts = [self.reward_fn.weighted_terms(self.decode(x0[i : i + step]), cond[i : i + step])
                 for i in range(0, x0.shape[0], step)]
        return {name: (parts[0][name][0], torch.cat([p[name][1] for p in parts])) for name in parts[0]}

    def decode(self, x0):
        """Latents (n, C, h, w) -> images (n, 3, H, W) in [0, 1], in the VAE's dtype (fp32; the pipelines' own latent
        scaling)."""
        cfg = self.vae.config
        latents = x0.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        image = self.vae.decode(latents, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    # ---- adapters in the diffusers LoRA format ----
    def save(self, role, directory):
        """directory/<role>/pytorch_lora_weights.safetensors in the diffusers LoRA format (with the LoRA config as
        metadata, so lora_alpha / rank survives): a stock pipeline loads it with load_lora_weights(directory/<role>)."""
        from peft.utils import get_peft_model_state_dict

        state = {k: v.detach().float().cpu().contiguous()
                 for k, v in get_peft_model_state_dict(self.net, adapter_name=role).items()}
        metadata = self.net.peft_config[role].to_dict()
        out = Path(directory) / role
        cls = pipeline_class(self.family)
        if self.is_flow:
            cls.save_lora_weights(out, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata)
        else:
            cls.save_lora_weights(out, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)

    def load(self, role, directory):
        """Load directory/<role> (written by save) into the role's adapter, in place (optimisers keep their tensors)."""
        from safetensors.torch import load_file

        path = Path(directory) / role / LORA_WEIGHT_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {role} LoRA at {path}")
        prefix = "transformer." if self.is_flow else "unet."
        state = {k[len(prefix):]: v for k, v in load_file(path).items() if k.startswith(prefix)}
        mine = dict(zip(self._param_names[role], self._params[role], strict=True))
        expected = {self._strip(name, role) for name in mine}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ValueError(f"{path} does not match the {role} adapter (missing {missing}, unexpected {extra})")
        for name, p in mine.items():
            if state[self._strip(name, role)].shape != p.shape:
                raise ValueError(f"{path} does not match the {role} adapter: {self._strip(name, role)} has shape "
                                 f"{tuple(state[self._strip(name, role)].shape)}, the adapter {tuple(p.shape)} (another rank?)")
        with torch.no_grad():
            for name, p in mine.items():
                p.copy_(state[self._strip(name, role)].to(p))

    # ---- evaluation and figures ----
    @torch.no_grad()
    def evaluate(self, samples, cond, beta=None, steps=None, batch_size=8):
        """Mean reward (the training reward) and each reward model's mean score on decoded samples (beta: unused;
        a text-to-image teacher has no closed-form tilted distribution; steps: unused, the per-step distances are the
        toy's, an image world has no exact reference distribution to measure them against)."""
        totals = {}
        for i in range(0, samples.shape[0], batch_size):
            images = self.decode(samples[i : i + batch_size])
            scores = self.reward_fn.scores(images, cond[i : i + batch_size])
            scores["mean_reward"] = self.reward_fn.combine(scores)
            for k, v in scores.items():
                totals.setdefault(k, []).append(v.float().cpu())
        out = {("mean_reward" if k == "mean_reward" else f"reward_{k}"): float(torch.cat(v).mean())
               for k, v in totals.items()}
        return {"mean_reward": out.pop("mean_reward"), **out}

    @torch.no_grad()
    def plot_samples(self, samples, path, title="", beta=None, max_images=16):
        """A grid of decoded samples with their prompts."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = min(max_images, samples.shape[0])
        images = torch.cat([self.decode(samples[i : i + 4]) for i in range(0, n, 4)]).permute(0, 2, 3, 1).cpu()
        cols = min(4, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
        cond = self.sample_cond(n, split="eval").cpu()  # evaluation samples come from these prompts, in order
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(images[i].numpy())
                ax.set_title(self.prompts[int(cond[i])][:40], fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def plot_curves(self, history, keys, path, title=""):
        """Metric curves (one panel per key) from metrics.jsonl records; reward terms are added automatically."""
        from toy2d.plots import plot_curves

        extra = ["mean_reward"] + sorted({k for r in history for k in r if k.startswith("reward_")})
        plot_curves(history, list(keys) + extra, path, title)

    # ---- internals ----
    def _build_prompt_cache(self, pipe, entries, max_sequence_length):
        """Encode the prompt lists of the missing cache entries (text encoders on the device for the occasion), then
        free the text encoders."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            enc = getattr(pipe, name, None)
            if enc is not None:
                enc.to(self.device)
        extra = dict(prompt_2=None, prompt_3=None, max_sequence_length=max_sequence_length) if self.is_flow else {}

        def encode_prompts(batch):
            e, _, p, _ = pipe.encode_prompt(batch, device=self.device, do_classifier_free_guidance=False, **extra)
            return {"embeds": e.to(self.dtype), "pooled": p.to(self.dtype)}

        def encode_null(batch):  # exactly as the stock pipeline builds its negative branch for negative_prompt=None
            _, e0, _, p0 = pipe.encode_prompt(batch, device=self.device, do_classifier_free_guidance=True, **extra)
            return {"embeds": e0.to(self.dtype), "pooled": p0.to(self.dtype)}

        with torch.no_grad(), _quiet():  # the tokenizers' truncation warnings, once per prompt batch
            for directory, spec, kind, texts, what in entries:
                embeddings.build_entry(directory, spec, texts, encode_null if kind == "null" else encode_prompts,
                                       description=f"{what} ({self.name}, {len(texts)} prompts)")
        for name in TEXT_COMPONENTS:
            if hasattr(pipe, name):
                setattr(pipe, name, None)

    def _text(self, cond):
        """(embeds (n, L, D), pooled (n, D')) of the prompts cond on the device. A batch's rows are gathered from the
        memory-mapped cache and copied to the device once (through pinned memory on CUDA), then reused by every
        forward of that batch (roles, CFG branches, levels) while they are among the 4 latest index sets."""
        key = tuple(cond.tolist())
        hit = self._device_text.get(key)
        if hit is not None:
            self._device_text.move_to_end(key)
            return hit
        rows = self.text.rows(torch.as_tensor(key, dtype=torch.long))
        if self.device.type == "cuda":
            rows = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in rows.items()}
        else:
            rows = {k: v.to(self.device) for k, v in rows.items()}
        hit = (rows["embeds"], rows["pooled"])
        self._device_text[key] = hit
        while len(self._device_text) > 4:
            self._device_text.popitem(last=False)
        return hit

    def _forward(self, x, sigma, cond):
        """The base network (with whatever adapter state is set) on latents x (n, C, h, w) at levels sigma (n,), under
        bf16 autocast when self.autocast (the fp32 LoRA weights stay the master copies that the optimisers update)."""
        t = self.timestep(sigma)
        x = x.to(self.dtype)
        text, pooled = self._text(cond)  # (n, L, D), (n, D')
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.is_flow:
                return self.net(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled,
                                return_dict=False)[0]
            added = {"text_embeds": pooled, "time_ids": self.time_ids.expand(x.shape[0], -1)}
            return self.net(x, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]

    def _add_adapters(self, rank, alpha, fake_rank, fake_alpha, n_fakes, seed):
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        targets = LORA_TARGETS[self.family]
        # per-step fake scores "fake1", ... (--fake-tracks per-step) are added after the first two, whose init stays as is
        self.adapter_roles = ["generator", "fake"] + [f"fake{k}" for k in range(1, n_fakes)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for role in self.adapter_roles:
                r, a = (rank, alpha) if role == "generator" else (fake_rank, fake_alpha)
                # B = 0: every adapter starts as the teacher, so at step 0 fake == generator == teacher
                config = LoraConfig(r=r, lora_alpha=a, init_lora_weights="gaussian", target_modules=targets)
                with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the design
                    warnings.simplefilter("ignore")
                    self.net.add_adapter(config, adapter_name=role)
        self._lora_layers = [m for m in self.net.modules() if isinstance(m, BaseTunerLayer)]
        self._scaling = {role: self._lora_layers[0].scaling[role] for role in self.adapter_roles}  # alpha / r
        self._params, self._param_names = {"teacher": []}, {"teacher": []}
        for role in self.adapter_roles:
            named = [(n, p) for n, p in self.net.named_parameters() if f".{role}." in n and ".lora_" in n]
            self._param_names[role] = [n for n, _ in named]
            self._params[role] = [p for _, p in named]
            for p in self._params[role]:
                p.data = p.data.float()  # adapters and optimiser state in fp32 over a bf16 base
                p.requires_grad_(True)  # once, here: role switches never touch requires_grad
        self._state = ((), 1.0)
        self._apply_state(self._state)  # rest state: the teacher (no adapter active)

    @staticmethod
    def _strip(name, role):
        """peft parameter name -> diffusers LoRA key: 'a.to_q.lora_A.generator.weight' -> 'a.to_q.lora_A.weight'."""
        return name.replace(f".{role}.", ".")

    def _apply_state(self, state):
        active, scale = state
        for layer in self._lora_layers:
            layer._active_adapter = list(active)  # not set_adapter(): that would toggle requires_grad
            for role in active:
                layer.scaling[role] = self._scaling[role] * scale
        self._state = state

    def adapter(self, role, scale=1.0):
        """Context manager: within the block the base runs as `role`, the teacher (no adapter) or base + scale * that
        role's LoRA. Restores the previous state (and the exact alpha / r scaling) on exit; never touches requires_grad."""
        return self._under(((), 1.0) if role == "teacher" or scale == 0 else ((role,), float(scale)))

    def _checkpoint(self, block, *args):
        """Gradient checkpointing that recomputes a block under the adapter state of its original forward pass
        (by backward() time another role may be active)."""
        from torch.utils.checkpoint import checkpoint

        state = self._state

        def contexts():
            return contextlib.nullcontext(), self._under(state)

        return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=contexts)

    @contextlib.contextmanager
    def _under(self, state):
        previous = self._state
        self._apply_state(state)
        try:
            yield
        finally:
            for role_ in state[0]:
                for layer in self._lora_layers:
                    layer.scaling[role_] = self._scaling[role_]
            self._apply_state(previous)

    def _per_sample(self, sigma, x):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma.reshape(-1)
