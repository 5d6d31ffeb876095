"""The text-to-image world on tiny SD3 / SDXL pipelines built offline (t2i/tiny.py: random weights, tokenizers from
in-memory vocabularies), saved to a temporary directory and loaded back through the real from_pretrained path.
No hub access anywhere. What is asserted is what the pieces mean:
  * roles: each role's gradient reaches its own adapter and nothing else, even when other roles run between the
    forward pass and backward() (the peft requires_grad pitfall), with and without gradient checkpointing;
  * conventions: fed the exact native target (velocity / eps), world.x0 returns the clean latents and world.loss_weight
    turns the x0 error into the native loss; SDXL's levels are DMD2's timesteps 999 / 749 / 499 / 249;
  * DynaDG's adapter scale is base + s * LoRA; CFG is uncond + w (cond - uncond);
  * rewards: the CLIP score equals transformers' own CLIPModel logits / logit_scale; caps and weights combine as stated;
    one gradient step on the reward through the generator raises it;
  * every method runs both stages end to end on both families (rtdmd: SD3 only) with finite losses, trains the adapters
    it should and leaves the base untouched;
  * the saved LoRA round-trips, and a stock diffusers pipeline with load_lora_weights reproduces the script's K-step
    sampler exactly (same seed), on SD3 and SDXL.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dmd
import dmdr
import gdmd
import rtdmd

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("diffusers")
pytest.importorskip("peft")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny pipelines and reward, built once per session and saved with save_pretrained."""
    from t2i.tiny import build_tiny_clip, build_tiny_sd3, build_tiny_sdxl

    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than they save (as dmd.py does for the toy)
    root = tmp_path_factory.mktemp("tiny_models")
    build_tiny_sd3(root / "sd3")
    build_tiny_sdxl(root / "sdxl")
    build_tiny_clip(root / "clip", head_path=root / "aesthetic_head.pth")
    return {"sd3-medium": root / "sd3", "sdxl": root / "sdxl", "clip": root / "clip",
            "head": root / "aesthetic_head.pth", "cache": root / "prompt_cache"}


def make_world(tiny, model, reward="clip", **kw):
    from t2i import T2IWorld

    ckpts = {"clip": str(tiny["clip"]), "pickscore": str(tiny["clip"]), "aesthetic": str(tiny["head"]),
             "aesthetic-clip": str(tiny["clip"])}
    args = dict(model_path=str(tiny[model]), resolution=32, reward=reward, reward_checkpoints=ckpts, lora_rank=4,
                lora_alpha=8, fake_lora_rank=2, fake_lora_alpha=2, seed=0, device="cpu",
                prompt_cache_dir=str(tiny["cache"]))
    return T2IWorld(model, **{**args, **kw})


def perturb(world, role, scale=0.3, seed=0):
    """Give an adapter non-zero weights (at init B = 0, so the adapter is off and A gets no gradient)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in world.params(role):
            p.add_(scale * torch.randn(p.shape, generator=gen))


def grads(world, role):
    return [p.grad for p in world.params(role)]


def base_params(world):
    return [p for n, p in world.net.named_parameters() if ".lora_" not in n]


FAMILIES = ["sd3-medium", "sdxl"]


# ---------------------------------------------------------------------------------------------- roles and adapters


@pytest.mark.parametrize("model", FAMILIES)
def test_each_role_gradient_reaches_only_its_adapter(tiny, model):
    """A generator graph is built, then the fake, the teacher and the DynaDG real score run (switching adapters), then
    backward(): the generator's gradients equal those of an undisturbed backward, the fake adapter gets none, the
    frozen base none; and the fake-score loss reaches the fake adapter only. requires_grad never changes."""
    world = make_world(tiny, model)
    perturb(world, "generator", seed=1)
    perturb(world, "fake", seed=2)
    flags = [p.requires_grad for p in world.net.parameters()]
    cond = world.sample_cond(2)
    x = world.noise(cond, torch.Generator().manual_seed(0))

    def generator_loss(disturb):
        for p in world.params("generator") + world.params("fake"):
            p.grad = None
        loss = world.x0("generator", x, 0.6, cond).square().mean()
        if disturb:  # what a DMD step does between the generator's forward pass and backward()
            with torch.no_grad():
                world.x0("fake", x, 0.3, cond)
                world.x0("teacher", x, 0.3, cond, cfg=4.0)
                world.x0("fake", x, 0.3, cond, cfg=4.0, adapter_scale=0.5)
        loss.backward()
        return [g.clone() for g in grads(world, "generator")]

    reference = generator_loss(disturb=False)
    disturbed = generator_loss(disturb=True)
    # every generator LoRA tensor gets a gradient; all but SD3's last-block add_q_proj (its context queries feed only
    # the context stream, which the last block discards) a non-zero one
    assert all(g is not None for g in reference)
    assert sum(bool(g.abs().sum() > 0) for g in reference) >= len(reference) - 2
    for a, b in zip(reference, disturbed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(g is None for g in grads(world, "fake"))
    assert all(p.grad is None for p in base_params(world))

    for p in world.params("generator"):
        p.grad = None
    dmd.fake_score_loss(world, x, cond, torch.full((2,), 0.5)).backward()
    assert all(g is not None for g in grads(world, "fake")) and sum(float(g.abs().sum()) for g in grads(world, "fake")) > 0
    assert all(g is None for g in grads(world, "generator"))
    assert [p.requires_grad for p in world.net.parameters()] == flags
    assert all(p.dtype == torch.float32 for p in world.params("generator") + world.params("fake"))

    # gradient checkpointing recomputes blocks during backward(), after the roles switched: same gradients
    world.net.enable_gradient_checkpointing(gradient_checkpointing_func=world._checkpoint)
    world.net.train()
    for a, b in zip(reference, generator_loss(disturb=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model", FAMILIES)
def test_bf16_base_with_fp32_adapters(tiny, model):
    """The GPU precision layout on CPU: base in bf16, adapters (and so the optimiser state) in fp32, x0 returned in fp32;
    the generator's fp32 gradients are finite and close to those of an all-fp32 world (bf16 round-off only)."""
    worlds = [make_world(tiny, model, dtype=dtype) for dtype in (torch.bfloat16, torch.float32)]
    out = []
    for world in worlds:
        perturb(world, "generator", scale=0.2)
        cond = world.sample_cond(2, split="eval")
        x = world.noise(cond, torch.Generator().manual_seed(0))
        x0 = world.x0("generator", x, 0.5, cond, cfg=3.0)
        x0.square().mean().backward()
        out.append((x0.detach(), torch.cat([p.grad.flatten() for p in world.params("generator")])))
    bf16 = worlds[0]
    assert next(bf16.net.parameters()).dtype == torch.bfloat16 and out[0][0].dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in bf16.params("generator"))
    assert torch.isfinite(out[0][1]).all()
    rel = (out[0][1] - out[1][1]).norm() / out[1][1].norm()
    assert rel < 0.1, rel  # bf16 has 8 mantissa bits: a few percent, not a different gradient
    assert (out[0][0] - out[1][0]).abs().mean() < 0.05 * out[1][0].abs().mean()


@pytest.mark.parametrize("model", FAMILIES)
def test_adapter_scale_cfg_and_teacher(tiny, model):
    """x0("fake", scale s) is base + s * LoRA (= the fake adapter with s times its B matrices at scale 1); scale 0 and
    the untrained adapters are the teacher; CFG is uncond + w (cond - uncond) with the empty prompt as uncond."""
    world = make_world(tiny, model)
    cond = world.sample_cond(2)
    x = world.noise(cond, torch.Generator().manual_seed(0))
    teacher = world.x0("teacher", x, 0.5, cond)
    torch.testing.assert_close(world.x0("generator", x, 0.5, cond), teacher, rtol=0, atol=0)  # B = 0 at init
    perturb(world, "fake")
    with torch.no_grad():
        scaled = world.x0("fake", x, 0.5, cond, adapter_scale=0.5)
        torch.testing.assert_close(world.x0("fake", x, 0.5, cond, adapter_scale=0.0), teacher)
        assert (world.x0("fake", x, 0.5, cond) - teacher).abs().max() > 1e-3
        b_params = [p for n, p in zip(world._param_names["fake"], world.params("fake")) if ".lora_B." in n]
        for p in b_params:
            p.mul_(0.5)
        torch.testing.assert_close(scaled, world.x0("fake", x, 0.5, cond), rtol=1e-5, atol=1e-5)
        guided = world.x0("teacher", x, 0.5, cond, cfg=5.0)
        uncond = world.x0("teacher", x, 0.5, world.null_cond(cond))
        torch.testing.assert_close(guided, uncond + 5.0 * (teacher - uncond), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", FAMILIES)
def test_noise_conventions(tiny, model):
    """Fed the exact native target (SD3: velocity eps - x0; SDXL: eps), world.x0 returns x0 at every level; an error
    delta in the native output costs world.loss_weight(sigma) * |x0 error|^2 = |delta|^2 (the native loss)."""
    world = make_world(tiny, model)
    gen = torch.Generator().manual_seed(0)
    cond = world.sample_cond(3)
    x0, eps = world.noise(cond, gen), world.noise(cond, gen)
    sigma = torch.tensor([0.9, 0.5, 0.1])
    x = world.renoise(x0, sigma, eps)
    target = eps - x0 if world.is_flow else eps
    delta = 0.1 * world.noise(cond, gen)
    world._forward = lambda x_, s_, c_: target + delta  # the network replaced by the exact target plus an error
    pred = world.x0("teacher", x, sigma, cond)
    native = delta.flatten(1).pow(2).mean(1)
    torch.testing.assert_close(world.loss_weight(sigma) * (pred - x0).flatten(1).pow(2).mean(1), native, rtol=1e-4, atol=0)
    world._forward = lambda x_, s_, c_: target
    torch.testing.assert_close(world.x0("teacher", x, sigma, cond), x0, rtol=1e-4, atol=1e-4)


def test_schedules_match_the_pipelines():
    """SD3: sigma = 3t / (1 + 2t), timestep 1000 sigma (FlowMatchEulerDiscreteScheduler with sigmas = [1, .75, .5, .25]);
    SDXL: sigma(t) = sqrt(1 - alphas_cumprod[1000 t - 1]), i.e. DMD2's 999 / 749 / 499 / 249, and back."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    from t2i import T2IWorld

    flow = T2IWorld.__new__(T2IWorld)
    flow.is_flow, flow.shift, flow.num_train_timesteps = True, 3.0, 1000
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    ours = torch.tensor([dmd.student_sigmas(flow, 4)])
    torch.testing.assert_close(ours[0], sched.sigmas[:4].float())
    torch.testing.assert_close(flow.timestep(ours[0]), sched.timesteps.float())

    lcm = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    vp = T2IWorld.__new__(T2IWorld)
    vp.is_flow, vp.num_train_timesteps, vp.device = False, 1000, torch.device("cpu")
    vp._vp_sigmas = (1 - lcm.alphas_cumprod.double()).sqrt()
    sig = torch.tensor(dmd.student_sigmas(vp, 4))
    torch.testing.assert_close(sig, (1 - lcm.alphas_cumprod[[999, 749, 499, 249]]).sqrt(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vp.timestep(sig), torch.tensor([999.0, 749.0, 499.0, 249.0]), rtol=0, atol=0)
    assert abs(vp.sigma(1.0) - 0.9977) < 1e-4  # the toy vp path's top level


# --------------------------------------------------------------------------------------------------------- rewards


def test_clip_reward_is_clip_and_weights_combine(tiny):
    """The CLIP score equals transformers' CLIPModel logits_per_image / logit_scale on the same (32 px, no resize)
    image; PickScore is the logit itself; "clip:w:cap" is w min(clip, cap) with no gradient above the cap."""
    from transformers import AutoTokenizer, CLIPModel

    from t2i.rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, WeightedReward

    prompts = ["a photo of a cat", "a red car on a street", ""]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    idx = torch.tensor([0, 1])
    ckpt = {"clip": str(tiny["clip"]), "pickscore": str(tiny["clip"]), "aesthetic": str(tiny["head"]),
            "aesthetic-clip": str(tiny["clip"])}
    reward = WeightedReward("clip:2,pickscore:0.5,aesthetic:1", prompts, "cpu", ckpt)
    scores = reward.scores(images, idx)

    model = CLIPModel.from_pretrained(tiny["clip"])
    tok = AutoTokenizer.from_pretrained(tiny["clip"])(prompts[:2], padding="max_length", max_length=16, truncation=True,
                                                      return_tensors="pt")
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    with torch.no_grad():
        logits = model(**tok, pixel_values=(images - mean) / std).logits_per_image.diagonal()
    torch.testing.assert_close(scores["clip"].detach(), logits / model.logit_scale.exp(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores["pickscore"].detach(), logits, rtol=1e-4, atol=1e-4)
    total = reward.combine(scores)
    torch.testing.assert_close(total, 2 * scores["clip"] + 0.5 * scores["pickscore"] + scores["aesthetic"])

    capped = WeightedReward("clip:0.3:-2", prompts, "cpu", ckpt)  # cosine >= -1 > -2: always capped
    out = capped(images, idx)
    torch.testing.assert_close(out, torch.full((2,), -0.6))
    assert not out.requires_grad or torch.autograd.grad(out.sum(), images, allow_unused=True)[0].abs().sum() == 0


def test_reward_errors_are_clear(tiny, tmp_path):
    from t2i.rewards import WeightedReward, parse_spec

    with pytest.raises(ValueError, match="valid rewards: clip, pickscore, aesthetic, hpsv2, imagereward"):
        parse_spec("clip,beauty")
    with pytest.raises(RuntimeError, match="--reward-checkpoints clip=PATH"):
        WeightedReward("clip", ["a"], "cpu", {"clip": str(tmp_path)})
    try:
        import hpsv2.src.open_clip  # noqa: F401
    except Exception:  # noqa: BLE001 (not installed, or the broken PyPI wheel)
        with pytest.raises(ImportError, match="pip install --no-deps hpsv2x.*not in requirements.txt"):
            WeightedReward("hpsv2", ["a"], "cpu")


@pytest.mark.parametrize("model", FAMILIES)
def test_reward_gradient_reaches_the_generator(tiny, model):
    """ReFL (dmdr.refl_loss) and RTDMD's L_det differentiate the reward through the fp32 VAE decode into the generator
    adapter only, and one small gradient step on the ReFL loss raises the batch's reward."""
    world = make_world(tiny, model, reward="clip,aesthetic:0.5")
    perturb(world, "generator", scale=0.1)
    cond = world.sample_cond(2)
    noise = world.noise(cond, torch.Generator().manual_seed(0))
    sigmas = dmd.student_sigmas(world, 2)

    def refl():
        return dmdr.refl_loss(world, world.x0("generator", noise, sigmas[0], cond), cond)

    loss = refl()
    loss.backward()
    g = grads(world, "generator")
    assert all(x is not None for x in g) and sum(float(x.abs().sum()) for x in g) > 0
    assert all(x is None for x in grads(world, "fake")) and all(p.grad is None for p in base_params(world))
    with torch.no_grad():
        norm = math.sqrt(sum(float(x.pow(2).sum()) for x in g))
        for p, x in zip(world.params("generator"), g):
            p.sub_(1e-2 / norm * x)
        assert refl().item() < loss.item()  # -reward fell: the reward rose

    for p in world.params("generator"):
        p.grad = None
    if world.is_flow:
        schedule = rtdmd.student_schedule(world, 2)
        states = [noise, noise]
        mask = torch.zeros(2, 1, dtype=torch.bool)
        _, det = rtdmd.hybrid_policy_objective(world, cond, schedule, 0.9, states, mask, torch.zeros(2), 1e-5)
        det.backward()
        assert sum(float(x.abs().sum()) for x in grads(world, "generator")) > 0
        assert all(x is None for x in grads(world, "fake"))


# ------------------------------------------------------------------------------------------------ LoRA and pipelines


@pytest.mark.parametrize("model", FAMILIES)
def test_saved_lora_round_trips_and_a_stock_pipeline_samples_like_the_script(tiny, model, tmp_path):
    """world.save writes a diffusers LoRA; a fresh world's load restores it exactly; a stock pipeline with
    load_lora_weights and the few-step scheduler of the student (SD3: FlowMatchEulerDiscreteScheduler with
    stochastic_sampling at sigmas [1, .75, .5, .25]; SDXL: LCMScheduler at DMD2's timesteps [999, 749, 499, 249]) gives
    the script's own K-step samples from the same seed; SD3's deterministic Euler equals RTDMD's CPS sampler at eta 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    from t2i.world import pipeline_class

    world = make_world(tiny, model)
    perturb(world, "generator", scale=0.2)  # changes the samples by ~1/6 of their range (at 0.5 the random tiny UNet is
    world.save("generator", tmp_path)      # chaotic enough that float32 round-off differences grow to 1e-2 in 4 steps)
    assert (tmp_path / "generator" / "pytorch_lora_weights.safetensors").exists()
    other = make_world(tiny, model, seed=1)
    other.load("generator", tmp_path)
    for a, b in zip(world.params("generator"), other.params("generator")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match the fake adapter"):
        _load_as(other, tmp_path)

    prompts = [world.prompts[i] for i in world.sample_cond(2, split="eval").tolist()]
    cond = world.sample_cond(2, split="eval")
    pipe = pipeline_class(world.family).from_pretrained(tiny[model])
    pipe.load_lora_weights(tmp_path / "generator")
    pipe.set_progress_bar_config(disable=True)
    sigmas = dmd.student_sigmas(world, 4)
    if world.is_flow:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
        call = dict(sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1.0)
    else:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        call = dict(timesteps=[999, 749, 499, 249], guidance_scale=0.0)
    # The SD3 pipeline draws the initial latents from `generator` but does not pass it to scheduler.step, whose renoise
    # draws then come from the global RNG; the SDXL pipeline passes it to LCMScheduler.step.
    torch.manual_seed(11)
    stock = pipe(prompts, height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(7),
                 **call).images
    gen = torch.Generator().manual_seed(7)
    step_gen = torch.Generator().manual_seed(11) if world.is_flow else gen
    with torch.no_grad():
        ours = dmd.sample_student(world, cond, sigmas, world.noise(cond, gen), generator=step_gen)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-5 * float(ours.abs().max()))

    if world.is_flow:  # the deterministic case: Euler ODE == CPS with eta 0
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=False)
        stock = pipe(prompts, height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(3),
                     **call).images
        with torch.no_grad():
            ours = rtdmd.sample_student(world, cond, rtdmd.student_schedule(world, 4), 0.0,
                                        world.noise(cond, torch.Generator().manual_seed(3)))
        torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-4)


def _load_as(world, directory):
    """Load the generator's LoRA (rank 4) as the fake adapter (rank 2): must fail with a clear message."""
    import shutil

    shutil.copytree(Path(directory) / "generator", Path(directory) / "fake")
    world.load("fake", directory)


# ---------------------------------------------------------------------------------------------- methods end to end

COMMON = dict(resolution=32, eval_samples=2, log_every=1, eval_every=100, progress=False, lora_rank=4, lora_alpha=8,
              fake_lora_rank=2, fake_lora_alpha=2, fake_updates_per_step=1, batch_size=2)


def snapshot(world):
    return {role: [p.detach().clone() for p in world.params(role)] for role in ("generator", "fake")}, \
        [p.detach().clone() for p in base_params(world)]


def changed(before, params):
    return any(not torch.equal(a, b) for a, b in zip(before, params))


def run_method(module, tiny, model, tmp_path, reward="clip", **kw):
    """Run a method's main() on a tiny world; returns (result, world, adapters before, base before)."""
    world = make_world(tiny, model, reward=reward)
    adapters, base = snapshot(world)
    args = module.Args(model=model, model_path=str(tiny[model]), output_dir=str(tmp_path), t2i_reward=reward,
                       **{**COMMON, **kw})
    out = module.main(args, world=world)
    assert all(torch.equal(a, b) for a, b in zip(base, base_params(world))), "the frozen base changed"
    losses = [v for r in out["history"] for k, v in r.items() if k.endswith("loss") or k.endswith("reward")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert (out["run_dir"] / "checkpoint" / "generator" / "pytorch_lora_weights.safetensors").exists()
    return out, world, adapters


@pytest.mark.parametrize("model", FAMILIES)
def test_dmd_end_to_end(tiny, model, tmp_path):
    out, world, before = run_method(dmd, tiny, model, tmp_path, num_steps=2, lr_generator=1e-3, lr_fake=1e-3)
    assert changed(before["generator"], world.params("generator")) and changed(before["fake"], world.params("fake"))
    assert "mean_reward" in out["final"] and "reward_clip" in out["final"]


@pytest.mark.parametrize("model", FAMILIES)
def test_dmdr_end_to_end(tiny, model, tmp_path):
    """Stage 1 (RT-DM, DynaDG, DynaRS) and stage 2 (DMD + ReFL) train both adapters; an RL-only stage 2 (--no-dmd)
    trains the generator and leaves the fake adapter exactly as it was."""
    out, world, before = run_method(dmdr, tiny, model, tmp_path, stage1_steps=2, stage2_steps=2, dynamic_steps=2,
                                    lr_generator=1e-3, lr_fake=1e-3)
    assert {r.get("stage") for r in out["history"]} >= {1, 2}
    assert any("rl_loss" in r for r in out["history"]) and any("rt_dm_weight_max" in r for r in out["history"])
    assert changed(before["generator"], world.params("generator")) and changed(before["fake"], world.params("fake"))

    out, world, before = run_method(dmdr, tiny, model, tmp_path / "rl_only", stage1_steps=0, stage2_steps=2,
                                    dynamic_steps=2, dmd=False, lr_generator=1e-3, lr_fake=1e-3)
    assert changed(before["generator"], world.params("generator"))
    assert not changed(before["fake"], world.params("fake"))


@pytest.mark.parametrize("rl", ["dpo", "grpo"])
def test_dmdr_dpo_and_grpo_run_on_latents(tiny, rl, tmp_path):
    """DMDR's other RL losses on image latents: DPO (the stage-2 reference swapped into the LoRA weights and back) and
    GRPO (Gaussian log-probabilities of the renoise transitions over C x h x w): finite, and they move the generator."""
    out, world, before = run_method(dmdr, tiny, "sd3-medium", tmp_path, stage1_steps=0, stage2_steps=2, dynamic_steps=2,
                                    rl=rl, group_size=2, batch_size=4, lr_generator=1e-3, lr_fake=1e-3)
    assert [r for r in out["history"] if "rl_loss" in r]
    assert changed(before["generator"], world.params("generator"))


@pytest.mark.parametrize("model,source", [("sd3-medium", "levels"), ("sdxl", "snapshots")])
def test_gdmd_end_to_end(tiny, model, source, tmp_path):
    out, world, before = run_method(gdmd, tiny, model, tmp_path, num_steps=3, cold_start_steps=1, group_size=2,
                                    group_source=source, snapshot_every=1, lr_generator=1e-3, lr_fake=1e-3)
    gd = [r for r in out["history"] if r.get("gdmd") == 1]
    assert gd and all(math.isfinite(r["nft_loss"]) and math.isfinite(r["target_reward"]) for r in gd)
    assert changed(before["generator"], world.params("generator")) and changed(before["fake"], world.params("fake"))


def test_rtdmd_end_to_end_on_sd3(tiny, tmp_path):
    out, world, before = run_method(rtdmd, tiny, "sd3-medium", tmp_path, cold_steps=2, rl_steps=2, groups=1,
                                    group_size=2, student_steps=3, lr_generator=1e-3, lr_fake=1e-3, lr_generator_rl=1e-3)
    rl = [r for r in out["history"] if r.get("stage") == 2 and "det" in r]
    assert rl and all(math.isfinite(r["det"]) and math.isfinite(r["stoc"]) for r in rl)
    assert changed(before["generator"], world.params("generator")) and changed(before["fake"], world.params("fake"))


# ------------------------------------------------------------------------------------------------------ bad input


def test_bad_input_fails_before_loading(tiny, tmp_path):
    with pytest.raises(ValueError, match="valid models: toy2d, sd3-medium, sd3.5-medium, sd3.5-large, sdxl"):
        dmd.validate(dmd.resolve_defaults(dmd.Args(model="sd4")))
    with pytest.raises(ValueError, match="needs a flow model.*sdxl is a VP"):
        rtdmd.validate(rtdmd.resolve_defaults(rtdmd.Args(model="sdxl")))
    with pytest.raises(ValueError, match="unknown reward"):
        dmdr.validate(dmdr.resolve_defaults(dmdr.Args(model="sd3-medium", t2i_reward="clip,nope")))
    import importlib.util

    if importlib.util.find_spec("hpsv2") is None:  # DMDR's default reward (CLIP + HPSv2.1) on a machine without hpsv2
        with pytest.raises(ImportError, match="pip install --no-deps hpsv2x.*--t2i-reward clip:0.3:0.7"):
            dmdr.validate(dmdr.resolve_defaults(dmdr.Args(model="sd3-medium")))
    # --fake-ema with unequal generator / fake LoRA ranks is no longer refused: the EMA blends the weight deltas B A and
    # refits them to the fake's rank (tests/test_fake_tracking.py), which works for any pair of ranks
    dmd.validate(dmd.resolve_defaults(dmd.Args(model="sd3-medium", fake_ema=0.9)))
    from t2i import T2IWorld

    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError) as err:
        T2IWorld("sd3-medium", model_path=str(tmp_path / "empty"))
    msg = str(err.value)
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in msg and "licence" in msg and "--model-path" in msg


def test_toy_path_does_not_import_diffusers():
    """The default (toy) runs and validating a text-to-image preset import neither diffusers nor transformers."""
    code = ("import sys, dmd, dmdr, gdmd, rtdmd, t2i; dmd.validate(dmd.resolve_defaults(dmd.Args(model='sd3-medium'))); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'peft')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
