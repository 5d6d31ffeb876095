"""bench_t2i.py: what one text-to-image training iteration costs (time, memory) and what the distilled student buys at
sampling time, on random-weight models built offline at the width and depth you pick.

    python bench_t2i.py                                   # CUDA: the real SD3-Medium config, 512 px, the recipes' batch 8
    nice python bench_t2i.py --device cpu                 # CPU: real width (24 heads x 64), 1 of 24 blocks, 128 px, batch 2
    python bench_t2i.py --methods dmd gdmd --options autocast      # a subset
    python bench_t2i.py --model sd3.5-large --layers 4    # another preset's config, at a reduced depth
    python bench_t2i.py --model-path /tmp/tiny/sd3 --resolution 32  # an existing pipeline folder (t2i.tiny's: the test)

What is built. The preset's MMDiT transformer config (SD3_CONFIGS, the hub repositories' transformer/config.json) with
--heads (width = heads x 64) and --layers (depth) of your choice, random weights; the SD3 VAE at its real config
(--vae light: 8 channels a level, same 8x downsampling) in fp32 as the world loads it; tiny text encoders (t2i.tiny's
tokenizers, 77 CLIP and 256 T5 tokens as the real ones give, at the real joint_attention_dim 4096 and pooled dim 2048,
so that the transformer sees real-sized text: 333 tokens beside the image's). The text encoders run once, into the
world's prompt-embedding cache, and never again. Reward models: random CLIP towers at the real sizes (ViT-L/14 for
clip, ViT-H/14 for pickscore and for hpsv2, whose package is optional) or, --reward-models tiny (the CPU default),
t2i.tiny's 32 px CLIP. Everything is written with save_pretrained and loaded by each method's own make_world, so the
world is what a user's run builds (T2IWorld: bf16 base with fp32 LoRA on CUDA, fp32 on CPU).

What is measured, for each method's training iteration (dmd, dmdr stage 1 and 2, rtdmd cold start and RL, gdmd), each
called through its module's public functions (train_step, stage1_step, ...) with its own Args and MODEL_DEFAULTS:
  * seconds per iteration: the median of --iterations after --warmup (torch.cuda.synchronize around each on CUDA);
  * the same iteration's passes timed alone: the first warm-up iteration records every world-level pass it makes
    (each world.x0 call: role, batch, CFG, grad mode, and whether a backward went through it, seen by a tensor hook;
    each world.reward / reward_terms call), then each pass is replayed alone on random inputs of the same shapes, its
    forward and its backward timed one by one (the reward split into its VAE decode and its reward model, each
    checkpointed when the world checkpoints them). Every iteration starts from the same RNG state, so each timed
    iteration draws the same student step and levels and makes exactly the recorded passes (checked: same_passes).
    iteration / sum of passes is the overhead the code adds;
  * FLOPs (torch.utils.flop_counter) of the recorded iteration and of its replayed passes: equal when the replay covers
    all of the iteration's matrix work (a check of the replay itself, free of timing noise);
  * where the time goes: the passes by kind (student rollouts without grad, teacher, fake score, generator with grad,
    decode, reward), the rest (optimisers, losses, sampling, Python), and the fake-update phase's share of the iteration;
  * peak memory (CUDA: max_memory_allocated, and max_memory_reserved; CPU: peak RSS, VmHWM reset through
    /proc/self/clear_refs) against the resident floor (memory between iterations: frozen base, adapters, gradients,
    optimiser state, caches) plus one forward/backward of the base (the generator role) at the largest batch any
    forward with grad had in the iteration, measured alone;
  * sampling: the K-step student (dmd.sample_student) against the teacher's stock sampler (eval.sample_teacher: the
    pipeline scheduler's levels, eval.TEACHER_STEPS, CFG in one batch of 2n), seconds per image of the denoising
    loop, the speed-up beside the NFE ratio (its limit), and the VAE decode per image on its own;
  * options, each a row against the method's default: --micro-batch-size and --gradient-checkpointing where the
    method's Args has the field (a row says so when it has not, and measures nothing), and bf16 autocast (a world
    attribute, T2IWorld.autocast, which no method exposes: the row sets it on the world the method built). A row says
    whether the option acted, from what the run shows: the largest batch a forward with grad saw, the world's
    gradient_checkpointing, its autocast.
Goals checked on every row (issue 14): iteration <= 1.3 x its passes, peak <= 1.3 x (floor + forward/backward),
sampling speed-up >= 0.8 x the NFE ratio. The figures are ratios measured side by side in one process, so they hold on
a loaded machine; the load average before and after is recorded beside them.

Writes its device's section of docs/performance.md (between markers; the rest of the file is kept), a JSON of every
number to <work-dir>/results_<device>.json, and prints the tables.
"""

import contextlib
import ctypes
import dataclasses
import gc
import importlib
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

METHODS = ("dmd", "dmdr-stage1", "dmdr-stage2", "rtdmd-cold", "rtdmd-rl", "gdmd")
OPTIONS = ("micro-batch", "gradient-checkpointing", "autocast")
MODULE = {"dmd": "dmd", "dmdr-stage1": "dmdr", "dmdr-stage2": "dmdr", "rtdmd-cold": "rtdmd", "rtdmd-rl": "rtdmd",
          "gdmd": "gdmd"}
FAKE_PHASE = {"dmd": "fake_score_updates", "gdmd": "fake_score_updates", "dmdr": "fake_updates", "rtdmd": "fake_update"}
PASS_KINDS = ("rollout", "teacher", "fake", "generator", "decode", "reward")
GOALS = {"overhead": 1.3, "memory": 1.3, "speedup": 0.8}  # issue 14's "Goals it must show"

# The presets' transformer configs, as in each hub repository's transformer/config.json (SD3-Medium: given in the task
# brief; SD3.5: as several public loaders quote them). heads and layers are what --heads / --layers replace.
SD3_CONFIGS = {
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
}
# the SD3 / SD3.5 VAE (vae/config.json of the same repositories)
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
LIGHT_VAE = dict(SD3_VAE, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)  # same 8x, ~0.1% FLOPs
SHIFT = {"sd3-medium": 3.0, "sd3.5-medium": 3.0, "sd3.5-large": 3.0}
POOLED = (768, 1280)  # CLIP-L and OpenCLIP bigG pooled embeddings, concatenated: pooled_projection_dim 2048
# vision towers of the reward models at their real sizes (openai ViT-L/14: clip; ViT-H/14: PickScore, HPSv2.1)
VISION = {"L14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=768),
          "H14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=1024)}
# the reward terms the benchmark builds for each method's reward spec: hpsv2 needs its optional package, so a
# PickScore-type scorer on the same ViT-H/14 tower size stands in for it (same cost, not the same score)
REWARD_STANDINS = {"clip": "clip", "pickscore": "pickscore", "hpsv2": "pickscore"}
CPU_SET = ("fake_updates_per_step=1", "rtdmd.groups=1", "rtdmd.group_size=2")  # the CPU defaults of --set (see its docstring)
MARK = "<!-- bench_t2i {} {} -->"


@dataclass
class Args:
    model: Literal["sd3-medium", "sd3.5-medium", "sd3.5-large"] = "sd3-medium"
    """preset whose transformer config is built (and whose method defaults, MODEL_DEFAULTS, each method uses)"""
    model_path: Optional[str] = None
    """benchmark this diffusers SD3 pipeline folder instead of building one (--heads / --layers / --vae then unused)"""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)"""
    heads: Optional[int] = None
    """attention heads of the transformer, width = heads x 64 (default: the preset's, 24 for SD3-Medium)"""
    layers: Optional[int] = None
    """transformer blocks (default: the preset's on CUDA, 24 for SD3-Medium; 1 on CPU, so that it runs in minutes)"""
    resolution: Optional[int] = None
    """image size in pixels (default: the preset's on CUDA, 512; 128 on CPU)"""
    batch_size: Optional[int] = None
    """every iteration's batch: batch_size, and dmdr's stage2_batch_size (default: each method's own on CUDA, 8 for the SD3
    presets, dmdr's stage 2 4; 2 on CPU). RTDMD's RL rollout is --set rtdmd.groups=G rtdmd.group_size=M"""
    vae: Literal["real", "light"] = "real"
    """real: the SD3 VAE config (fp32, as the world decodes); light: 8 channels a level (decode cost ~0)"""
    reward_models: Optional[Literal["real", "tiny"]] = None
    """real: random CLIP towers at the real sizes (ViT-L/14, ViT-H/14); tiny: t2i.tiny's 32 px CLIP (default: real on
    CUDA, tiny on CPU, where one real tower's backward alone would take longer than the rest of the iteration)"""
    methods: tuple[Literal["dmd", "dmdr-stage1", "dmdr-stage2", "rtdmd-cold", "rtdmd-rl", "gdmd"], ...] = METHODS
    """the training iterations to measure"""
    options: tuple[Literal["micro-batch", "gradient-checkpointing", "autocast"], ...] = OPTIONS
    """the option rows (each against the method's default)"""
    option_methods: Optional[tuple[str, ...]] = None
    """the methods that get option rows (default: every one of --methods on CUDA; dmd on CPU, where each row costs
    minutes)"""
    micro_batch_size: Optional[int] = None
    """the micro-batch of the micro-batch row (default: half the batch)"""
    set: Optional[tuple[str, ...]] = None
    """method Args overrides [MODULE.]FIELD=VALUE (MODULE: dmd, dmdr, rtdmd, gdmd; without it every method), applied
    where the method's Args has the field (the results list what applied). Default on CUDA: none (each method's
    recipe); on CPU: fake_updates_per_step=1 (every kind of pass still occurs; the recipe's 5 would make the fake
    updates 5x and the CPU run 3x longer), rtdmd.groups=1 rtdmd.group_size=2 (RTDMD's RL rollout: 2 images instead of
    the recipe's 4 x 16)"""
    warmup: int = 1
    """untimed iterations before the timed ones (the first one is also the recorded one)"""
    iterations: Optional[int] = None
    """timed iterations, the median is reported (default: 5 on CUDA, 2 on CPU)"""
    pass_repeats: Optional[int] = None
    """times each recorded pass is replayed alone, the median is reported (default: 3 on CUDA, 1 on CPU)"""
    count_flops: bool = True
    """count the FLOPs of the recorded iteration and of its replay (an extra untimed replay)"""
    sample_batch: Optional[int] = None
    """images per sampling call (default: the batch size on CUDA, 1 on CPU)"""
    sample_repeats: Optional[int] = None
    """timed sampling calls of each sampler, the median is reported (default: 3 on CUDA, 1 on CPU)"""
    sampling: bool = True
    """measure the sampling rows"""
    student_steps: int = 4
    """K of the student in the sampling rows (the methods' text-to-image default)"""
    threads: Optional[int] = None
    """torch CPU threads (default: 1 on CPU, so that times are this process's CPU seconds; torch's on CUDA)"""
    work_dir: Optional[str] = None
    """where the built models, the prompt-embedding cache and the JSON go (default: $TMPDIR/bench_t2i); models are
    reused when their config matches"""
    docs: Optional[str] = "docs/performance.md"
    """markdown file whose section for this device (and --label) is rewritten (None: do not write)"""
    label: Optional[str] = None
    """a name for this run's section, beside the device's (several runs on one device keep their own sections)"""
    seed: int = 0
    """seed of the random weights and of every draw"""
    activations: bool = False
    """only measure the activations one block saves for the backward, per token, in fp32 and bf16 (saved_activations;
    docs/performance.md's "Scale beyond one GPU"), and exit"""


# =====================================================================================================
#                                       models, built offline
# =====================================================================================================


def transformer_config(model, heads=None, layers=None):
    """The preset's transformer config at `heads` x 64 width and `layers` depth (None: the preset's own)."""
    cfg = dict(SD3_CONFIGS[model])
    if heads is not None:
        cfg["num_attention_heads"] = heads
        cfg["caption_projection_dim"] = heads * cfg["attention_head_dim"]  # the text stream has the image stream's width
    if layers is not None:
        cfg["num_layers"] = layers
    if "dual_attention_layers" in cfg:
        cfg["dual_attention_layers"] = tuple(i for i in cfg["dual_attention_layers"] if i < cfg["num_layers"])
    return cfg


def build_pipeline(path, model, heads, layers, vae, dtype, device, seed=0):
    """A StableDiffusion3Pipeline folder: the transformer at the chosen width and depth (random weights, initialised on
    `device` and saved in `dtype`), the VAE (fp32), tiny text encoders whose outputs have the real sizes."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from t2i.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    torch.manual_seed(seed)
    cfg = transformer_config(model, heads, layers)
    with torch.device(device):  # 2e9 random weights are drawn in seconds on a GPU
        transformer = SD3Transformer2DModel(**cfg)
    transformer = transformer.to("cpu", dtype)
    tok, tok2, t5_tok = tiny_clip_tokenizer(77), tiny_clip_tokenizer(77), tiny_t5_tokenizer(256)

    def clip(projection):  # 77 tokens, hidden 32 (the CLIP hidden states are zero-padded to 4096 by the pipeline)
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1))

    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=cfg["joint_attention_dim"], d_kv=8, d_ff=37,
                                 num_layers=1, num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT[model]),
        vae=AutoencoderKL(**(SD3_VAE if vae == "real" else LIGHT_VAE)),
        text_encoder=clip(POOLED[0]), tokenizer=tok, text_encoder_2=clip(POOLED[1]), tokenizer_2=tok2,
        text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(path)
    return Path(path)


def build_clip_reward(path, vision, seed=0):
    """A CLIPModel folder (random weights) with the vision tower `vision` (VISION) at 224 px and a tiny text tower
    (the text features are computed once, at construction), its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    from t2i.tiny import tiny_clip_tokenizer

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(77)
    v = VISION[vision]
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=v["projection_dim"],
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=CLIPVisionConfig(**v).to_dict(),
                                 projection_dim=v["projection_dim"]))
    model.save_pretrained(path)
    size = v["image_size"]
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
                  tokenizer=tok).save_pretrained(path)
    return Path(path)


def cached(path, spec, build):
    """path, built by build(path) unless a previous build with the same spec is there (spec.json is written last)."""
    path = Path(path)
    marker = path / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    build(path)
    marker.write_text(json.dumps(spec))
    return path


def prompt_files(root):
    """A small prompt set (8 training, 2 held-out prompts from t2i/prompts): the embedding cache stays small (SD3:
    2.7 MB a prompt in bf16) and prompts do not change the cost of an iteration."""
    from t2i.world import PROMPTS_DIR, read_prompts

    root.mkdir(parents=True, exist_ok=True)
    train, held_out = root / "train.txt", root / "eval.txt"
    train.write_text("\n".join(read_prompts(PROMPTS_DIR / "train.txt")[:8]) + "\n")
    held_out.write_text("\n".join(read_prompts(PROMPTS_DIR / "eval.txt")[:2]) + "\n")
    return str(train), str(held_out)


def reward_spec(spec):
    """The method's reward spec with each term's model replaced by its stand-in (REWARD_STANDINS), weights and caps kept."""
    terms = []
    for term in spec.split(","):
        name, *rest = term.strip().split(":")
        if name not in REWARD_STANDINS:
            raise ValueError(f"reward {name!r} has no benchmark stand-in (known: {', '.join(REWARD_STANDINS)})")
        terms.append(":".join([REWARD_STANDINS[name], *rest]))
    return ",".join(terms)


# =====================================================================================================
#                                 each method's iteration, through its own API
# =====================================================================================================


def coerce(text, current):
    """FIELD=VALUE's value, typed like the field's current value."""
    if isinstance(current, bool) or text.lower() in ("true", "false"):
        return text.lower() in ("1", "true", "yes")
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_args(method, base, overrides):
    """(module, Args, applied, not applicable) of a method: its Args on the benchmark's model, its MODEL_DEFAULTS,
    the rewards' stand-ins, then the overrides where its Args has the field, the defaults that follow from them
    (resolve_stage2, where the method has one), then its own validate()."""
    mod = importlib.import_module(MODULE[method])
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    args = mod.Args(model=base["model"], model_path=base["model_path"], prompts=base["prompts"],
                    eval_prompts=base["eval_prompts"], resolution=base["resolution"], device=base["device"],
                    progress=False)
    mod.resolve_defaults(args)
    if hasattr(mod, "derive_cold_start"):
        mod.derive_cold_start(args)
    args.t2i_reward = reward_spec(args.t2i_reward)
    args.reward_checkpoints = base["reward_checkpoints"]
    applied, absent = {}, []
    for key, value in overrides.items():
        scope, _, name = key.rpartition(".")
        if scope and scope != mod.__name__:
            continue
        if name in fields:
            setattr(args, name, value if not isinstance(value, str) else coerce(value, getattr(args, name)))
            applied[name] = getattr(args, name)
        else:
            absent.append(name)
    if hasattr(mod, "resolve_stage2"):  # the defaults that follow from other options (rtdmd: its stage 2 recipe's)
        mod.resolve_stage2(args)
    mod.validate(args)
    return mod, args, applied, absent


def make_world(mod, args):
    """The world as the method's main() builds it (n_fakes: one per fake role, where the method has several)."""
    n_fakes = len(mod.fake_roles(args.fake_tracks, args.student_steps)) if hasattr(mod, "fake_roles") else 1
    if "n_fakes" in inspect.signature(mod.make_world).parameters:
        return mod.make_world(args, args.device, n_fakes=n_fakes)
    return mod.make_world(args, args.device)


def iteration(method, mod, args, world):
    """A function running one training iteration of `method`, with the optimisers its main() builds."""
    opt_generator = torch.optim.AdamW(world.params("generator"), args.lr_generator,
                                      weight_decay=args.weight_decay_generator)
    if method in ("dmd", "gdmd"):
        sigmas = mod.student_sigmas(world, args.student_steps)
        opt_fakes = {role: torch.optim.AdamW(world.params(role), args.lr_fake, weight_decay=0.0)
                     for role in mod.fake_roles(args.fake_tracks, args.student_steps)}
        if method == "dmd":
            return lambda: mod.train_step(world, args, sigmas, opt_generator, opt_fakes)
        snapshots = mod.FakeSnapshots(args.group_size - 1 if args.group_source != "levels" and args.group_size > 1 else 0)
        return lambda: mod.train_step(world, args, sigmas, opt_generator, opt_fakes, snapshots, True)  # GDMD on
    opt_fake = torch.optim.AdamW(world.params("fake"), args.lr_fake, weight_decay=0.0)
    if method == "dmdr-stage1":  # generator step 0: DynaDG's real score is teacher + 0.5 x fake adapter
        sigmas = mod.student_sigmas(world, args.student_steps)
        return lambda: mod.stage1_step(world, args, sigmas, 0, opt_generator, opt_fake)
    if method == "dmdr-stage2":  # the first step of stage 2, with DPO's frozen reference as main() takes it
        sigmas = mod.student_sigmas(world, args.student_steps)
        ref_values = [p.detach().clone() for p in world.params("generator")]
        return lambda: mod.stage2_step(world, args, sigmas, args.stage1_steps, opt_generator, opt_fake, ref_values)
    schedule = mod.student_schedule(world, args.student_steps)
    if method == "rtdmd-cold":
        return lambda: mod.train_step(world, args, schedule, 1, opt_generator, opt_fake)
    for group in opt_generator.param_groups:  # main() switches to the RL rate at stage 2
        group["lr"] = args.lr_generator_rl
    return lambda: mod.train_step(world, args, schedule, 2, opt_generator, opt_fake)


@contextlib.contextmanager
def phase_timer(mod, name, device, sink):
    """Within the block, mod.<name> (the method's fake-update function, looked up as a module global by train_step)
    adds its wall time to sink[0]."""
    original = getattr(mod, name)

    def timed_phase(*a, **k):
        sync(device)
        start = CLOCK["fn"]()
        try:
            return original(*a, **k)
        finally:
            sync(device)
            sink[0] += CLOCK["fn"]() - start

    setattr(mod, name, timed_phase)
    try:
        yield
    finally:
        setattr(mod, name, original)


# =====================================================================================================
#                                   the passes: recorded, then replayed alone
# =====================================================================================================


class PassRecorder:
    """Within the block, every world.x0 / reward / reward_terms call of `world` is recorded (shapes, role, CFG, grad
    mode) and a hook on its output marks whether a backward went through it. Instance attributes shadow the methods
    of this one world; nothing of T2IWorld changes."""

    def __init__(self, world):
        self.world = world
        self.records = []

    def __enter__(self):
        world, records = self.world, self.records
        x0, reward, reward_terms = world.x0, world.reward, world.reward_terms

        def watch(out, rec):
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(lambda grad: rec.__setitem__("backward", True))

        def x0_recorded(role, x, sigma, cond, cfg=1.0, adapter_scale=1.0):
            rec = dict(kind="x0", role=role, shape=tuple(x.shape), x_grad=x.requires_grad,
                       sigma=sigma.detach().clone() if torch.is_tensor(sigma) else sigma, cond=cond.detach().clone(),
                       cfg=cfg, adapter_scale=adapter_scale, grad=torch.is_grad_enabled(), backward=False)
            records.append(rec)
            out = x0(role, x, sigma, cond, cfg=cfg, adapter_scale=adapter_scale)
            watch(out, rec)
            return out

        def reward_recorded(x, cond):
            rec = dict(kind="reward", shape=tuple(x.shape), cond=cond.detach().clone(),
                       grad=torch.is_grad_enabled() and x.requires_grad, backward=False)
            records.append(rec)
            out = reward(x, cond)
            watch(out, rec)
            return out

        def reward_terms_recorded(x, cond):
            rec = dict(kind="reward", shape=tuple(x.shape), cond=cond.detach().clone(), grad=False, backward=False)
            records.append(rec)
            return reward_terms(x, cond)

        world.x0, world.reward, world.reward_terms = x0_recorded, reward_recorded, reward_terms_recorded
        return self

    def __exit__(self, *exc):
        for name in ("x0", "reward", "reward_terms"):
            delattr(self.world, name)  # the class's methods again


def signature(records):
    """What makes two iterations the same work: each pass's kind, role, shape, CFG, grad mode and backward."""
    return [(r["kind"], r.get("role"), r["shape"], r.get("cfg"), r["grad"], r["backward"]) for r in records]


def pass_kind(rec):
    """The breakdown's kind of a recorded x0 pass."""
    if rec["role"] == "generator":
        return "generator" if rec["backward"] else "rollout"
    return "teacher" if rec["role"] == "teacher" else "fake"


def largest_grad_batch(records):
    """The largest batch a forward with grad had (CFG counts twice: both branches run in one batch)."""
    sizes = [rec["shape"][0] * (2 if rec["kind"] == "x0" and rec["cfg"] != 1.0 else 1)
             for rec in records if rec["grad"]]
    return max(sizes, default=0)


def replay(world, records, device, flops=None):
    """Each recorded pass alone, on random inputs of its shapes: [(kind, "forward" / "backward", seconds, flops)].
    A reward pass is replayed as the world runs it, chunk by chunk (decode_chunk), its decode and its reward model
    each checkpointed when the world checkpoints a chunk with grad; a backward starts from a gradient of ones."""
    from torch.utils.checkpoint import checkpoint

    out = []

    def run(kind, phase, fn):
        before = flops.get_total_flops() if flops is not None else 0
        result, seconds = timed(fn, device)
        out.append((kind, phase, seconds, (flops.get_total_flops() - before) if flops is not None else 0))
        return result

    params = [p for role in world.adapter_roles for p in world.params(role)]
    for rec in records:
        with torch.set_grad_enabled(rec["grad"]):
            if rec["kind"] == "x0":
                kind = pass_kind(rec)
                x = torch.randn(rec["shape"], device=world.device).requires_grad_(rec["x_grad"])
                y = run(kind, "forward", lambda: world.x0(rec["role"], x, rec["sigma"], rec["cond"], cfg=rec["cfg"],
                                                          adapter_scale=rec["adapter_scale"]))
                if rec["backward"]:
                    run(kind, "backward", lambda: y.backward(torch.ones_like(y)))
            else:
                step = world.decode_chunk or rec["shape"][0]
                wrap = world.decode_checkpointing and rec["backward"]
                for i in range(0, rec["shape"][0], step):
                    x = torch.randn((min(step, rec["shape"][0] - i), *rec["shape"][1:]), device=world.device)
                    x.requires_grad_(rec["backward"])
                    c = rec["cond"][i : i + step]

                    def call(fn, *a):
                        return checkpoint(fn, *a, use_reentrant=False) if wrap else fn(*a)

                    images = run("decode", "forward", lambda: call(world.decode, x))
                    leaf = images.detach().requires_grad_(rec["backward"])
                    score = run("reward", "forward", lambda: call(world.reward_fn, leaf, c))
                    if rec["backward"]:
                        run("reward", "backward", lambda: score.backward(torch.ones_like(score)))
                        run("decode", "backward", lambda: images.backward(leaf.grad))
        for p in params:
            p.grad = None
    return out


# =====================================================================================================
#                                          clocks and memory
# =====================================================================================================


CLOCK = {"fn": time.perf_counter, "what": "wall"}  # main() picks the clock (see clock_for)


def clock_for(device):
    """The clock of every timing: wall time on CUDA (synchronised); on a CPU with one torch thread this process's CPU
    time, which another process's load on the machine hardly changes (its wall time here doubled under load); with
    several threads wall time again (idle OpenMP workers spin, which CPU time would count)."""
    if torch.device(device).type == "cpu" and torch.get_num_threads() == 1:
        return {"fn": time.process_time, "what": "CPU"}
    return {"fn": time.perf_counter, "what": "wall"}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn(), seconds on CLOCK), the device synchronised before and after."""
    sync(device)
    start = CLOCK["fn"]()
    out = fn()
    sync(device)
    return out, CLOCK["fn"]() - start


class Memory:
    """Current and peak memory of this process on its device. CUDA: allocated bytes (and the reserved peak); CPU:
    resident set size, its peak (VmHWM) reset by writing 5 to /proc/self/clear_refs, glibc asked to return freed
    memory (malloc_trim) so that the floor is what is held, not what the allocator kept."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.libc = None
        if not self.cuda:
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self.libc = None

    @staticmethod
    def _status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    def settle(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        elif self.libc is not None:
            self.libc.malloc_trim(0)

    def current(self):
        return torch.cuda.memory_allocated(self.device) if self.cuda else self._status("VmRSS")

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self):
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else self._status("VmHWM")

    def reserved_peak(self):
        return torch.cuda.max_memory_reserved(self.device) if self.cuda else None


def forward_backward_memory(world, n, memory):
    """Peak memory above the current of one generator forward + backward of the base at batch n, alone."""
    cond = world.sample_cond(n)
    x = torch.randn(n, *world.data_shape, device=world.device)
    memory.settle()
    before = memory.current()
    memory.reset_peak()
    y = world.x0("generator", x, 0.5, cond)
    y.backward(torch.ones_like(y))
    peak = memory.peak()
    for p in world.params("generator"):
        p.grad = None
    del y
    memory.settle()
    return peak - before


# =====================================================================================================
#                                             measurements
# =====================================================================================================


def iteration_batch(method, args):
    """The samples one iteration of `method` trains on: dmdr's stage 2 its stage2_batch_size, RTDMD's RL stage its
    groups x group_size, every other its batch_size."""
    if method == "dmdr-stage2" and args.stage2_batch_size:
        return args.stage2_batch_size
    if method == "rtdmd-rl":
        return args.groups * args.group_size
    return args.batch_size


def measure(method, base, overrides, bench, memory, full=True, world_hook=None):
    """One row: the method's iteration timed, its passes replayed (full), its memory. world_hook(world) may change the
    world the method built (the autocast row). Errors (out of memory, a non-finite loss) are a row's status."""
    row = dict(method=method, status="ok")
    world = None
    try:
        mod, args, applied, absent = method_args(method, base, overrides)
        row.update(module=mod.__name__, batch_size=iteration_batch(method, args), applied=applied, not_applicable=absent)
        memory.settle()
        world, row["world_s"] = timed(lambda: make_world(mod, args), bench.device)
        if world_hook is not None:
            world_hook(world)
        row.update(gradient_checkpointing=world.gradient_checkpointing, autocast=world.autocast,
                   decode_chunk=world.decode_chunk, decode_checkpointing=world.decode_checkpointing)
        step = iteration(method, mod, args, world)
        # every iteration starts from the same RNG state, so that it draws the same student step, renoise levels and
        # prompts as the recorded one (which the replay replays): the methods draw k at random (dmdr, gdmd's mixture
        # fakes, rtdmd), and iterations of different k are not the same work
        torch.manual_seed(bench.seed)
        recorder = PassRecorder(world)
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False) if bench.count_flops and full else contextlib.nullcontext()
        with recorder, counter:
            step()  # the first warm-up iteration: recorded (and its FLOPs counted)
        records = recorder.records
        row["flops_iteration"] = counter.get_total_flops() if bench.count_flops and full else None
        row["largest_grad_batch"] = largest_grad_batch(records)
        row["passes"] = len(records)
        row["backward_passes"] = sum(rec["backward"] for rec in records)
        row["pass_counts"] = {kind: sum(1 for rec in records if rec["kind"] == "x0" and pass_kind(rec) == kind)
                              for kind in PASS_KINDS[:4]}
        row["pass_counts"].update(decode=sum(rec["kind"] == "reward" for rec in records),
                                  reward=sum(rec["kind"] == "reward" for rec in records))
        for _ in range(bench.warmup - 1):
            torch.manual_seed(bench.seed)
            step()
        memory.settle()
        row["floor"] = memory.current()
        # timed iterations and replays of the recorded passes, interleaved (iteration i, then replay i), so that a
        # change of the machine's load hits both alike; the peak is read around each iteration alone
        fake_s, times, fake_times, peaks, reserved, reps, same = [0.0], [], [], [], [], [], True
        for i in range(max(bench.iterations, bench.pass_repeats if full else 0)):
            if i < bench.iterations:
                memory.reset_peak()
                torch.manual_seed(bench.seed)
                with phase_timer(mod, FAKE_PHASE[mod.__name__], bench.device, fake_s), PassRecorder(world) as again:
                    fake_s[0] = 0.0
                    times.append(timed(step, bench.device)[1])
                same &= signature(again.records) == signature(records)
                fake_times.append(fake_s[0])
                peaks.append(memory.peak())
                reserved.append(memory.reserved_peak())
            if full and i < bench.pass_repeats:
                reps.append(replay(world, records, bench.device))
        row["same_passes"] = same  # every timed iteration made the recorded iteration's passes
        row["peak"] = max(peaks)
        row["reserved_peak"] = max(reserved) if reserved[0] is not None else None
        row["iteration_samples"] = times
        row["iteration_s"] = statistics.median(times)
        row["fake_phase_s"] = statistics.median(fake_times)
        row["tokens"] = tokens_per_sample(world)
        row["params"] = {"base": sum(p.numel() for n, p in world.net.named_parameters() if ".lora_" not in n),
                         **{role: sum(p.numel() for p in world.params(role)) for role in world.adapter_roles},
                         "vae": sum(p.numel() for p in world.vae.parameters())}
        row["fb_batch"] = row["largest_grad_batch"] or args.batch_size
        try:
            row["fb"] = forward_backward_memory(world, row["fb_batch"], memory)
        except torch.OutOfMemoryError:
            row["fb"] = None
        if full:
            if bench.count_flops:
                counter = FlopCounterMode(display=False)
                with counter:
                    row["flops_passes"] = sum(p[3] for p in replay(world, records, bench.device, counter))
            per_pass = [statistics.median(r[i][2] for r in reps) for i in range(len(reps[0]))]
            row["passes_s"] = sum(per_pass)
            row["pass_totals"] = [sum(p[2] for p in r) for r in reps]
            row["breakdown"] = {kind: sum(s for (k, _, _, _), s in zip(reps[0], per_pass) if k == kind)
                                for kind in PASS_KINDS}
            row["backward_s"] = sum(s for (_, phase, _, _), s in zip(reps[0], per_pass) if phase == "backward")
            row["other_s"] = row["iteration_s"] - row["passes_s"]
    except (torch.OutOfMemoryError, FloatingPointError, RuntimeError, ValueError) as err:
        row["status"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        row["peak"] = memory.peak()
    finally:
        del world
        memory.settle()
    return row


def tokens_per_sample(world):
    """Image tokens (latent patches) and text tokens of one sample (the cache's sequence length)."""
    patch = getattr(world.net.config, "patch_size", 1) or 1
    image = (world.data_shape[1] // patch) * (world.data_shape[2] // patch)
    text = world.text.rows(torch.tensor([0]))["embeds"].shape[1]
    return {"image": image, "text": text}


def measure_sampling(base, bench, memory):
    """Seconds per image of the K-step student (dmd.sample_student) and of the teacher's stock sampler with CFG
    (eval.sample_teacher, eval.TEACHER_STEPS), denoising loops only, and of the VAE decode alone."""
    import dmd
    import eval as evaluation

    mod, args, _, _ = method_args("dmd", base, {})
    world = make_world(mod, args)
    n = bench.sample_batch
    gen = torch.Generator().manual_seed(bench.seed)
    cond = world.sample_cond(n, split="eval")
    noise = world.noise(cond, gen)
    sigmas = dmd.student_sigmas(world, bench.student_steps)
    steps = evaluation.TEACHER_STEPS[world.family]
    cfg = args.guidance_scale
    with torch.no_grad():
        student = lambda: dmd.sample_student(world, cond, sigmas, noise, generator=gen)  # noqa: E731
        teacher = lambda: evaluation.sample_teacher(world, cond, noise, steps, cfg)  # noqa: E731
        x0 = student()  # warm-up: both batch shapes (n, and 2n for CFG)
        evaluation.sample_teacher(world, cond, noise, 2, cfg)
        t_student = statistics.median(timed(student, bench.device)[1] for _ in range(bench.sample_repeats))
        t_teacher = statistics.median(timed(teacher, bench.device)[1] for _ in range(bench.sample_repeats))
        world.decode(x0)
        t_decode = statistics.median(timed(lambda: world.decode(x0), bench.device)[1] for _ in range(bench.sample_repeats))
    guided = cfg != 1.0
    out = dict(batch=n, student_steps=bench.student_steps, teacher_steps=steps, cfg=cfg,
               nfe_student=bench.student_steps, nfe_teacher=steps * (2 if guided else 1),
               student_s=t_student / n, teacher_s=t_teacher / n, decode_s=t_decode / n)
    out["speedup"] = out["teacher_s"] / out["student_s"]
    out["nfe_ratio"] = out["nfe_teacher"] / out["nfe_student"]
    out["speedup_with_decode"] = (out["teacher_s"] + out["decode_s"]) / (out["student_s"] + out["decode_s"])
    del world
    memory.settle()
    return out


def option_rows(base, overrides, bench, memory, base_rows):
    """Each option against the method's default row: measured where it applies, said where it does not."""
    rows = []
    for method in bench.option_methods:
        ref = base_rows.get(method)
        if ref is None or ref["status"] != "ok":
            continue
        mod = importlib.import_module(MODULE[method])
        fields = {f.name for f in dataclasses.fields(mod.Args)}
        for option in bench.options:
            row = dict(method=method, option=option)
            if option == "micro-batch":
                micro = bench.micro_batch_size or max(1, ref["batch_size"] // 2)
                row["setting"] = f"micro_batch_size={micro}"
                if "micro_batch_size" not in fields:
                    rows.append({**row, "applies": False, "note": f"{mod.__name__}.Args has no micro_batch_size"})
                    continue
                if micro >= ref["largest_grad_batch"]:
                    rows.append({**row, "applies": False, "note": f"the largest forward with grad is already "
                                 f"{ref['largest_grad_batch']}: nothing to split (raise --batch-size)"})
                    continue
                got = measure(method, base, {**overrides, "micro_batch_size": micro}, bench, memory, full=False)
                acted = got.get("largest_grad_batch", 0) < ref["largest_grad_batch"]
                note = (f"largest forward with grad {ref['largest_grad_batch']} -> {got.get('largest_grad_batch')}"
                        + ("" if acted else f": {mod.__name__} does not micro-batch its forwards (decode_chunk "
                           f"{ref['decode_chunk']} -> {got.get('decode_chunk')} only)"))
            elif option == "gradient-checkpointing":
                flip = not ref["gradient_checkpointing"]
                row["setting"] = f"gradient_checkpointing={flip}"
                if "gradient_checkpointing" not in fields:
                    rows.append({**row, "applies": False, "note": f"{mod.__name__}.Args has no gradient_checkpointing "
                                 f"(its world keeps T2IWorld's default, {ref['gradient_checkpointing']} here)"})
                    continue
                got = measure(method, base, {**overrides, "gradient_checkpointing": flip}, bench, memory, full=False)
                acted = got.get("gradient_checkpointing") == flip
                note = f"world.gradient_checkpointing {ref['gradient_checkpointing']} -> {got.get('gradient_checkpointing')}"
            else:
                flip = not ref["autocast"]
                row["setting"] = f"world.autocast={flip}"
                got = measure(method, base, overrides, bench, memory, full=False,
                              world_hook=lambda world, flip=flip: setattr(world, "autocast", flip))
                acted = got.get("autocast") == flip
                note = "a T2IWorld attribute (no method has an option for it), set on the world the method built"
            rows.append({**row, "applies": True, "acted": acted, "note": note, "status": got["status"],
                         "iteration_s": got.get("iteration_s"), "peak": got.get("peak"), "floor": got.get("floor"),
                         "fb": got.get("fb"), "base_iteration_s": ref["iteration_s"], "base_peak": ref["peak"],
                         "base_fb": ref["fb"], "fb_batch": got.get("fb_batch"),
                         "largest_grad_batch": got.get("largest_grad_batch")})
    return rows


# =====================================================================================================
#                                               report
# =====================================================================================================


def gib(b):
    return "-" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def goal(ok):
    return "yes" if ok else "**no**"


def machine(device):
    """The machine in words: device, CPU, threads, package versions."""
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    where = f"{os.cpu_count()} x {cpu}, {torch.get_num_threads()} torch threads"
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}; host {where}"
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("torch", "diffusers", "transformers", "peft"))
    return f"{where}; {versions}"


def render(result):
    """The markdown section of one device."""
    r, cfg = result, result["config"]
    lines = [MARK.format(r["device_key"], "begin"), f"### {r['device_title']}", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
             f"Commit {r['commit']}, {r['date']}; load average (1 min) {r['load_before']:.2f} before, "
             f"{r['load_after']:.2f} after; {r['wall_s'] / 60:.1f} min wall, {r['cpu_s'] / 60:.1f} min CPU.  ",
             f"Model: {cfg['what']}; {cfg['tokens']['image']} image + {cfg['tokens']['text']} text tokens a sample. "
             f"Method overrides: {cfg['overrides'] or 'none (each method its recipe)'}.  ",
             f"Times: {r['clock']} seconds" + (" of this process (one torch thread), steadier than wall time on a shared "
                                               "machine" if r["clock"] == "CPU" else ", the device synchronised") + ".", ""]
    rows = [x for x in r["rows"]]
    lines += ["#### Cost per iteration", "",
              "| iteration | batch | s / iteration | its passes alone, s | iteration / passes | <= 1.3 | GFLOP iteration / passes |",
              "|---|---|---|---|---|---|---|"]
    for x in rows:
        if x["status"] != "ok":
            lines.append(f"| {x['method']} | {x.get('batch_size', '-')} | {x['status']} | | | | |")
            continue
        ratio = x["iteration_s"] / x["passes_s"]
        flops = (f"{x['flops_iteration'] / 1e9:.1f} / {x['flops_passes'] / 1e9:.1f}"
                 if x.get("flops_iteration") is not None else "-")
        spread = f" ({min(x['iteration_samples']):.3g}-{max(x['iteration_samples']):.3g})" if len(x["iteration_samples"]) > 1 else ""
        lines.append(f"| {x['method']} | {x['batch_size']} | {x['iteration_s']:.3g}{spread} | {x['passes_s']:.3g} "
                     f"({x['passes']} passes) | {ratio:.2f} | {goal(ratio <= GOALS['overhead'])} | {flops} |")
    lines += ["", "#### Where the time goes (s per iteration: passes alone, by kind; other = iteration - passes)", "",
              "| iteration | rollouts (no grad) | teacher | fake score | generator (grad) | decode | reward | "
              "other | of which backward | fake-update phase |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        if x["status"] != "ok":
            continue
        b = x["breakdown"]
        cells = [f"{b[k]:.3g}" for k in PASS_KINDS]
        share = x["fake_phase_s"] / x["iteration_s"]
        lines.append(f"| {x['method']} | {' | '.join(cells)} | {x['other_s']:.3g} | {x['backward_s']:.3g} | "
                     f"{x['fake_phase_s']:.3g} ({share:.0%}) |")
    cuda = r["device_key"].startswith("cuda")
    lines += ["", "#### Peak memory" + (" (allocated; reserved in brackets)" if cuda else " (resident set size)"), "",
              "| iteration | peak | floor | fwd/bwd of the base alone (batch) | per token per block | "
              "peak / (floor + fwd/bwd) | <= 1.3 |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        if "floor" not in x:
            continue
        if x["fb"] is None:
            lines.append(f"| {x['method']} | {gib(x['peak'])} | {gib(x['floor'])} | out of memory alone | | | |")
            continue
        denom = x["floor"] + x["fb"]
        per_token = x["fb"] / (x["fb_batch"] * (x["tokens"]["image"] + x["tokens"]["text"]) * cfg["layers"])
        reserved = f" ({gib(x['reserved_peak'])})" if x.get("reserved_peak") else ""
        lines.append(f"| {x['method']} | {gib(x['peak'])}{reserved} | {gib(x['floor'])} | {gib(x['fb'])} "
                     f"({x['fb_batch']}) | {per_token / 1024:.1f} KiB | {x['peak'] / denom:.2f} | "
                     f"{goal(x['peak'] <= GOALS['memory'] * denom)} |")
    s = r.get("sampling")
    if s:
        lines += ["", f"#### Sampling (batch {s['batch']}, denoising loop; the VAE decode, the same for both, apart)", "",
                  "| sampler | steps | NFE | s / image | speed-up | NFE ratio | speed-up / NFE ratio | >= 0.8 | "
                  "s / image with decode |", "|---|---|---|---|---|---|---|---|---|",
                  f"| teacher, stock scheduler, CFG {s['cfg']:g} | {s['teacher_steps']} | {s['nfe_teacher']} | "
                  f"{s['teacher_s']:.3g} | | | | | {s['teacher_s'] + s['decode_s']:.3g} |",
                  f"| student (dmd.sample_student) | {s['student_steps']} | {s['nfe_student']} | {s['student_s']:.3g} | "
                  f"{s['speedup']:.2f}x | {s['nfe_ratio']:.0f}x | {s['speedup'] / s['nfe_ratio']:.2f} | "
                  f"{goal(s['speedup'] >= GOALS['speedup'] * s['nfe_ratio'])} | {s['student_s'] + s['decode_s']:.3g} "
                  f"({s['speedup_with_decode']:.2f}x) |"]
    if r.get("options"):
        lines += ["", "#### Options (each against the method's default row above)", "",
                  "| iteration | option | applies | acted | s / iteration | peak | fwd/bwd of the base alone | "
                  "how it is known |", "|---|---|---|---|---|---|---|---|"]
        for o in r["options"]:
            if not o["applies"]:
                lines.append(f"| {o['method']} | {o['setting']} | no | - | - | - | - | {o['note']} |")
            elif o["status"] != "ok":
                lines.append(f"| {o['method']} | {o['setting']} | yes | - | {o['status']} | {gib(o['peak'])} | - | "
                             f"{o['note']} |")
            else:
                lines.append(f"| {o['method']} | {o['setting']} | yes | {'yes' if o['acted'] else '**no**'} | "
                             f"{o['base_iteration_s']:.3g} -> {o['iteration_s']:.3g} "
                             f"({o['iteration_s'] / o['base_iteration_s']:.2f}x) | {gib(o['base_peak'])} -> "
                             f"{gib(o['peak'])} ({o['peak'] / o['base_peak']:.2f}x) | {gib(o['base_fb'])} -> "
                             f"{gib(o['fb'])} (batch {o['fb_batch']}) | {o['note']} |")
    lines += ["", MARK.format(r["device_key"], "end")]
    return "\n".join(lines)


def write_docs(path, section, key):
    """Replace this device's section of the markdown file (or append it), keeping everything else."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Performance of the text-to-image path\n"
    begin, end = MARK.format(key, "begin"), MARK.format(key, "end")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


# =====================================================================================================
#                                                main
# =====================================================================================================


def device_type(device):
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        "cpu" if device == "auto" else device).type


def resolve(bench, check_device=True):
    """Device-dependent defaults (CUDA: the real config and the recipes; CPU: minutes). check_device=False resolves a
    CUDA command on a machine without a GPU (the test of the defaults)."""
    bench = dataclasses.replace(bench)
    if bench.device == "auto":
        bench.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.device(bench.device).type == "cuda"
    if cuda and check_device and not torch.cuda.is_available():
        raise ValueError(f"--device {bench.device}: no GPU is visible")
    preset = SD3_CONFIGS[bench.model]
    bench.heads = bench.heads or preset["num_attention_heads"]
    bench.layers = bench.layers or (preset["num_layers"] if cuda else 1)
    if bench.resolution is None and bench.model_path is None:
        bench.resolution = 512 if cuda else 128  # a given --model-path keeps the preset's (the world's default)
    bench.batch_size = bench.batch_size or (None if cuda else 2)
    bench.reward_models = bench.reward_models or ("real" if cuda else "tiny")
    bench.set = bench.set if bench.set is not None else (() if cuda else CPU_SET)
    bench.iterations = bench.iterations or (5 if cuda else 2)
    bench.pass_repeats = bench.pass_repeats or (3 if cuda else 1)
    bench.sample_repeats = bench.sample_repeats or (3 if cuda else 1)
    bench.sample_batch = bench.sample_batch or (bench.batch_size or 8 if cuda else 1)
    if bench.option_methods is None:
        bench.option_methods = tuple(bench.methods) if cuda else tuple(m for m in ("dmd",) if m in bench.methods)
    bench.option_methods = tuple(bench.option_methods)
    unknown = [m for m in bench.option_methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown --option-methods {unknown}; valid: {', '.join(METHODS)}")
    if bench.warmup < 1 or bench.iterations < 1:
        raise ValueError("--warmup and --iterations must be >= 1 (the first warm-up iteration is the recorded one)")
    return bench


def saved_activations(model, heads, resolution, dtype, seed=0, text_tokens=333):
    """Bytes one full transformer block saves for the backward per token, with the generator LoRA (r64 on the attention
    projections, as T2IWorld adds it) trainable and the base frozen: the tensors packed by saved_tensors_hooks over one
    forward (parameters excluded, each storage once) of 2 blocks minus those of 1 (the last block of SD3 is
    context_pre_only, lighter than the others, so the difference is one full block). Allocator-independent."""
    import warnings

    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from t2i.world import LORA_TARGETS

    saved = {}
    for layers in (1, 2):
        torch.manual_seed(seed)
        net = SD3Transformer2DModel(**transformer_config(model, heads, layers)).to(dtype).requires_grad_(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net.add_adapter(LoraConfig(r=64, lora_alpha=128, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS["sd3"]), adapter_name="generator")
        for name, p in net.named_parameters():
            p.requires_grad_(".lora_" in name)
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        size = resolution // 8
        cfg = net.config
        x = torch.randn(1, cfg.in_channels, size, size, dtype=dtype)
        text = torch.randn(1, text_tokens, cfg.joint_attention_dim, dtype=dtype)
        pooled = torch.randn(1, cfg.pooled_projection_dim, dtype=dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, pooled_projections=pooled)
        saved[layers] = sum(storages.values())
    tokens = (size // cfg.patch_size) ** 2 + text_tokens
    return (saved[2] - saved[1]) / tokens


def main(bench, command=None):
    """Build, measure, report. Returns the result dict (also written as JSON)."""
    bench = resolve(bench)
    if bench.threads or device_type(bench.device) == "cpu":
        torch.set_num_threads(bench.threads or 1)
    if bench.activations:
        out = {str(dt): saved_activations(bench.model, bench.heads, bench.resolution, dt, bench.seed)
               for dt in (torch.float32, torch.bfloat16)}
        for dt, per_token in out.items():
            print(f"{bench.model} at {bench.heads} heads x 64, {bench.resolution} px, {dt}: one block saves "
                  f"{per_token / 1024:.1f} KiB a token for the backward ({per_token / (bench.heads * 64):.1f} B a channel)")
        return out
    CLOCK.update(clock_for(bench.device))
    start_wall, start_cpu, load_before = time.time(), time.process_time(), os.getloadavg()[0]
    device = torch.device(bench.device)
    key = device.type + (f"-{bench.label}" if bench.label else "")
    work = Path(bench.work_dir or Path(tempfile.gettempdir()) / "bench_t2i")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("T2I_CACHE_DIR", str(work / "prompt-cache"))
    dtype = torch.bfloat16 if key == "cuda" else torch.float32
    if bench.model_path is not None:
        model_path = Path(bench.model_path)
        layers = json.loads((model_path / "transformer" / "config.json").read_text())["num_layers"]
        what = f"the pipeline in {model_path}"
    else:
        spec = dict(model=bench.model, heads=bench.heads, layers=bench.layers, vae=bench.vae, dtype=str(dtype),
                    seed=bench.seed, config=transformer_config(bench.model, bench.heads, bench.layers))
        name = f"{bench.model}_h{bench.heads}_l{bench.layers}_{bench.vae}_{str(dtype).split('.')[-1]}"
        model_path = cached(work / name, json.loads(json.dumps(spec)),
                            lambda p: build_pipeline(p, bench.model, bench.heads, bench.layers, bench.vae, dtype,
                                                     bench.device, bench.seed))
        layers = bench.layers
        full = SD3_CONFIGS[bench.model]
        what = (f"{bench.model} transformer config at {bench.heads} heads x 64 = {bench.heads * 64} wide (the preset: "
                f"{full['num_attention_heads']}), {bench.layers} of {full['num_layers']} blocks, random weights; "
                f"{'the SD3 VAE config' if bench.vae == 'real' else 'a light VAE (8 channels a level)'} in fp32; "
                f"{bench.resolution} px")
    if bench.reward_models == "real":
        clip_l = cached(work / "reward_clip_L14", {"vision": VISION["L14"]}, lambda p: build_clip_reward(p, "L14"))
        clip_h = cached(work / "reward_clip_H14", {"vision": VISION["H14"]}, lambda p: build_clip_reward(p, "H14"))
    else:
        from t2i.tiny import build_tiny_clip

        clip_l = clip_h = cached(work / "reward_clip_tiny", {"tiny": 1}, lambda p: build_tiny_clip(p))
    what += (f"; rewards on random CLIP towers ({'ViT-L/14 for clip, ViT-H/14 for pickscore and hpsv2' if bench.reward_models == 'real' else 't2i.tiny, 32 px'})")
    prompts, eval_prompts = prompt_files(work / "prompts")
    base = dict(model=bench.model, model_path=str(model_path), prompts=prompts, eval_prompts=eval_prompts,
                resolution=bench.resolution, device=bench.device,
                reward_checkpoints=f"clip={clip_l},pickscore={clip_h},pickscore-processor={clip_h}")
    overrides = {}
    if bench.batch_size is not None:  # every iteration's batch: dmdr's stage 2 has its own (the authors': 4 on SD3-M)
        overrides["batch_size"] = bench.batch_size
        overrides["dmdr.stage2_batch_size"] = bench.batch_size
    for item in bench.set:
        field, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        overrides[field.replace("-", "_")] = value
        scope = field.rpartition(".")[0]
        if scope and scope not in set(MODULE.values()):
            raise ValueError(f"--set {item!r}: unknown module {scope!r} (valid: {', '.join(sorted(set(MODULE.values())))})")
    memory = Memory(bench.device)
    rows = {}
    for method in bench.methods:
        torch.manual_seed(bench.seed)
        rows[method] = measure(method, base, overrides, bench, memory)
        print(f"bench_t2i: {method}: {summary(rows[method])}", file=sys.stderr)
    sampling = measure_sampling(base, bench, memory) if bench.sampling else None
    options = option_rows(base, overrides, bench, memory, rows) if bench.options else []
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    tokens = next((x["tokens"] for x in rows.values() if "tokens" in x), {"image": 0, "text": 0})
    result = dict(
        device_key=key, device_title=(("GPU: " + torch.cuda.get_device_name(device)) if device.type == "cuda" else "CPU")
        + (f", {bench.label}" if bench.label else ""),
        command=command or "python bench_t2i.py", machine=machine(device), commit=commit,
        date=time.strftime("%Y-%m-%d"), load_before=load_before, load_after=os.getloadavg()[0],
        wall_s=time.time() - start_wall, cpu_s=time.process_time() - start_cpu, clock=CLOCK["what"],
        config=dict(what=what, layers=layers, tokens=tokens, overrides=", ".join(f"{k}={v}" for k, v in overrides.items()),
                    bench={k: v for k, v in dataclasses.asdict(bench).items()}),
        rows=[rows[m] for m in bench.methods], sampling=sampling, options=options)
    (work / f"results_{key}.json").write_text(json.dumps(result, indent=1, default=str))
    section = render(result)
    print(section)
    if bench.docs:
        write_docs(bench.docs, section, key)
    return result


def summary(row):
    if row["status"] != "ok":
        return row["status"]
    return (f"{row['iteration_s']:.3g} s / iteration, passes {row['passes_s']:.3g} s "
            f"({row['iteration_s'] / row['passes_s']:.2f}x), peak {gib(row['peak'])}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        resolve(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    main(args, command="python bench_t2i.py " + shlex.join(sys.argv[1:]))
