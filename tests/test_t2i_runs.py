"""The text-to-image world for long real runs, on the tiny offline pipelines (t2i/tiny.py). What is asserted:
  * prompt embeddings: the on-disk cache holds exactly what the stock pipeline's encode_prompt gives (the null row: its
    negative branch), is built once (a second world loads no text encoder), is keyed by model and prompt content
    (a changed prompt file builds one new entry, the others are reused), and non-builder ranks read the builder's
    entries or report its failure;
  * a batch's embeddings are gathered and moved to the device once, however many forwards (roles, CFG) use them;
  * the VAE is the fp32 weights on disk, bit for bit, in a bf16 world;
  * bf16 autocast changes the forward (it is on), keeps the LoRA parameters and their gradients fp32 and close to the
    fp32 ones, and survives gradient checkpointing (the recompute re-enters autocast: identical gradients);
  * the chunked reward decode (with and without checkpointing) equals the unchunked one, values and gradients, in
    float64; checkpointing keeps a fraction of the activations;
  * real weights with the default smoke-test prompts (48 in t2i/prompts/train.txt) warn.
"""

import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

FAMILIES = ["sd3-medium", "sdxl"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from t2i.tiny import build_tiny_clip, build_tiny_sd3, build_tiny_sdxl

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_runs")
    build_tiny_sd3(root / "sd3")
    build_tiny_sdxl(root / "sdxl")
    build_tiny_clip(root / "clip")
    return {"sd3-medium": root / "sd3", "sdxl": root / "sdxl", "clip": root / "clip", "root": root}


def make_world(tiny, model, cache, **kw):
    from t2i import T2IWorld

    args = dict(model_path=str(tiny[model]), resolution=32, reward="clip", reward_checkpoints={"clip": str(tiny["clip"])},
                lora_rank=4, lora_alpha=8, fake_lora_rank=2, fake_lora_alpha=2, seed=0, device="cpu",
                prompt_cache_dir=str(cache))
    return T2IWorld(model, **{**args, **kw})


def perturb(world, role, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in world.params(role):
            p.add_(scale * torch.randn(p.shape, generator=gen))


# ------------------------------------------------------------------------------------------ prompt-embedding cache


@pytest.mark.parametrize("model", FAMILIES)
def test_prompt_cache_holds_the_pipelines_embeddings_and_is_built_once(tiny, model, tmp_path, monkeypatch):
    from t2i import world as world_module
    from t2i.world import pipeline_class

    cache = tmp_path / "cache"
    loads = []
    real_load = world_module.load_pipeline
    monkeypatch.setattr(world_module, "load_pipeline", lambda *a, **k: loads.append(k["text_encoders"]) or real_load(*a, **k))
    world = make_world(tiny, model, cache)
    assert loads == [True] and len([d for d in cache.iterdir() if d.is_dir()]) == 3  # train, eval, null entries

    pipe = pipeline_class(world.family).from_pretrained(tiny[model])
    extra = dict(prompt_2=None, prompt_3=None, max_sequence_length=256) if world.is_flow else {}
    train, held_out = world.prompts[:16], world.prompts[world.n_train : world.n_train + 16]  # the cache's first batches
    with torch.no_grad():  # (same batches: float32 matmuls round differently with the batch's composition)
        e, _, p, _ = pipe.encode_prompt(train, device="cpu", do_classifier_free_guidance=False, **extra)
        ee, _, pe, _ = pipe.encode_prompt(held_out, device="cpu", do_classifier_free_guidance=False, **extra)
        _, e0, _, p0 = pipe.encode_prompt([""], device="cpu", do_classifier_free_guidance=True, **extra)
    rows = world.text.rows(torch.tensor(list(range(16)) + list(range(world.n_train, world.n_train + 16)) + [world.null_label]))
    torch.testing.assert_close(rows["embeds"], torch.cat([e, ee, e0]), rtol=0, atol=0)
    torch.testing.assert_close(rows["pooled"], torch.cat([p, pe, p0]), rtol=0, atol=0)
    if not world.is_flow:  # SDXL zeroes the empty negative prompt (force_zeros_for_empty_prompt): not the encoding of ""
        assert rows["embeds"][-1].abs().max() == 0

    again = make_world(tiny, model, cache)  # same model, same prompt files: no text encoder is loaded
    assert loads == [True, False]
    idx = torch.arange(len(world.prompts))
    for k in ("embeds", "pooled"):
        torch.testing.assert_close(again.text.rows(idx)[k], world.text.rows(idx)[k], rtol=0, atol=0)

    new_prompts = tmp_path / "train.txt"
    new_prompts.write_text("a red house\na blue boat on a lake\n")
    changed = make_world(tiny, model, cache, prompts=str(new_prompts))  # one new entry: the eval and null ones reused
    assert loads == [True, False, True] and len([d for d in cache.iterdir() if d.is_dir()]) == 4
    assert changed.n_train == 2
    torch.testing.assert_close(changed.text.rows(torch.tensor([2]))["embeds"], rows["embeds"][16:17], rtol=0, atol=0)


def test_non_builder_ranks_read_the_builders_cache_or_its_failure(tiny, tmp_path, monkeypatch):
    """LOCAL_RANK != 0 never builds: with the entries present it loads no text encoder and reads them; when the builder
    failed (its <key>.failed marker), it raises the builder's reason instead of waiting forever."""
    from t2i import embeddings
    from t2i import world as world_module

    cache = tmp_path / "cache"
    builder = make_world(tiny, "sd3-medium", cache)
    monkeypatch.setenv("LOCAL_RANK", "1")
    loads = []
    real_load = world_module.load_pipeline
    monkeypatch.setattr(world_module, "load_pipeline", lambda *a, **k: loads.append(k["text_encoders"]) or real_load(*a, **k))
    reader = make_world(tiny, "sd3-medium", cache)
    assert loads == [False]
    idx = torch.arange(len(builder.prompts))
    torch.testing.assert_close(reader.text.rows(idx)["embeds"], builder.text.rows(idx)["embeds"], rtol=0, atol=0)

    directory = tmp_path / "missing"
    directory.with_name("missing.failed").write_text("OSError: disk full")
    with pytest.raises(RuntimeError, match="failed to build on the builder process: OSError: disk full"):
        embeddings.wait_for_entry(directory, poll_seconds=0.01)


def test_cache_refuses_a_disk_too_small(tmp_path, monkeypatch):
    """The cache's size is checked against the free space before anything is written, with a message that says both."""
    import shutil

    from t2i import embeddings

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 10))
    key, spec = embeddings.entry_key({"hub": "x"}, "prompts", ["a", "b"], torch.float32, 8, "sd3")
    with pytest.raises(OSError, match=r"needs 0\.0 GB \(2 prompts x 0\.00 MB\), 0\.0 GB are free"):
        embeddings.build_entry(tmp_path / key, spec, ["a", "b"],
                               lambda b: {"embeds": torch.zeros(len(b), 4, 8), "pooled": torch.zeros(len(b), 8)})
    assert not (tmp_path / key).exists() and (tmp_path / f"{key}.failed").exists()


def test_a_batch_is_moved_to_the_device_once(tiny, tmp_path):
    """Four x0 calls of one batch (generator, fake, teacher with CFG, DynaDG's scaled fake with CFG) gather from the
    cache twice: the batch's indices and the CFG batch [null, cond]; each output equals that of a forward that gathers
    afresh."""
    world = make_world(tiny, "sd3-medium", tmp_path)
    perturb(world, "generator", seed=1)
    perturb(world, "fake", seed=2)
    gathers = []
    rows = world.text.rows
    world.text.rows = lambda idx: gathers.append(tuple(idx.tolist())) or rows(idx)
    cond = world.sample_cond(3, split="eval")
    x = world.noise(cond, torch.Generator().manual_seed(0))

    calls = [lambda: world.x0("generator", x, 0.7, cond), lambda: world.x0("fake", x, 0.5, cond),
             lambda: world.x0("teacher", x, 0.5, cond, cfg=4.0),
             lambda: world.x0("fake", x, 0.3, cond, cfg=4.0, adapter_scale=0.5)]
    with torch.no_grad():
        cached = [call() for call in calls]
        assert len(gathers) == 2
        assert set(gathers) == {tuple(cond.tolist()), tuple(world.null_cond(cond).tolist() + cond.tolist())}
        for call, out in zip(calls, cached):
            world._device_text.clear()  # forget the batch: this forward gathers and moves its rows itself
            torch.testing.assert_close(call(), out, rtol=0, atol=0)
    assert len(gathers) == 2 + len(calls)


# ----------------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("model", FAMILIES)
def test_the_vae_is_the_fp32_weights_on_disk(tiny, model, tmp_path):
    """A bf16 world's VAE equals AutoencoderKL.from_pretrained in fp32 exactly; bf16 rounding of the same weights would
    not (so this test can fail: a bf16 load then upcast differs)."""
    from diffusers import AutoencoderKL

    world = make_world(tiny, model, tmp_path, dtype=torch.bfloat16)
    disk = AutoencoderKL.from_pretrained(tiny[model], subfolder="vae", dtype=torch.float32).state_dict()
    mine = world.vae.state_dict()
    assert next(world.net.parameters()).dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in mine.values())
    assert all(torch.equal(mine[k], disk[k]) for k in disk)
    assert any(not torch.equal(v.bfloat16().float(), v) for v in disk.values() if v.is_floating_point())


@pytest.mark.parametrize("model", FAMILIES)
def test_bf16_autocast_is_on_keeps_fp32_masters_and_survives_checkpointing(tiny, model, tmp_path):
    """autocast=True (CPU autocast here, CUDA's on a GPU) changes the forward by bf16 round-off (not 0, below 10 % of
    the signal: bf16 has 8 mantissa bits, 0.4 % per rounding, over a few layers); the LoRA parameters and their
    gradients stay fp32, within 10 % of the fp32 gradients; with gradient checkpointing the blocks are recomputed under
    autocast again, giving identical gradients."""
    plain = make_world(tiny, model, tmp_path)
    auto = make_world(tiny, model, tmp_path, autocast=True)
    ckpt = make_world(tiny, model, tmp_path, autocast=True, gradient_checkpointing=True)
    out = []
    for world in (plain, auto, ckpt):
        perturb(world, "generator", scale=0.2)
        cond = world.sample_cond(2, split="eval")
        x = world.noise(cond, torch.Generator().manual_seed(0))
        x0 = world.x0("generator", x, 0.5, cond, cfg=3.0)
        x0.square().mean().backward()
        out.append((x0.detach(), torch.cat([p.grad.flatten() for p in world.params("generator")])))
    assert out[1][0].dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in auto.params("generator"))
    diff = (out[1][0] - out[0][0]).abs().mean()
    assert 0 < diff < 0.1 * out[0][0].abs().mean(), diff
    assert (out[1][1] - out[0][1]).norm() < 0.1 * out[0][1].norm()
    torch.testing.assert_close(out[2][1], out[1][1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ chunked decoding


@pytest.mark.parametrize("model", FAMILIES)
def test_chunked_reward_decode_equals_the_unchunked_one(tiny, model, tmp_path):
    """reward() with decode_chunk 1 or 2 (odd batch of 3: a ragged last chunk), with and without checkpointing, gives
    the unchunked values and gradients (w.r.t. the latents and the generator's LoRA through x0) in float64, to 1e-10
    (float64 round-off of a few hundred operations is ~1e-13; a wrong chunk boundary or a lost gradient is O(1)).
    Checkpointing stores the chunk inputs, not the decoder's activations: under 10 % of the saved bytes."""
    world = make_world(tiny, model, tmp_path, dtype=torch.float64)
    world.vae.double()
    world.reward_fn.double()
    for p in world.params("generator"):
        p.data = p.data.double()
    perturb(world, "generator", scale=0.2)
    cond = world.sample_cond(3)
    noise = world.noise(cond, torch.Generator().manual_seed(0)).double()

    def run(chunk, checkpointing):
        world.decode_chunk, world.decode_checkpointing = chunk, checkpointing
        for p in world.params("generator"):
            p.grad = None
        latents = world.x0("generator", noise, 0.8, cond).double().detach().requires_grad_(True)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            r = world.reward(latents, cond)
        (g,) = torch.autograd.grad(r.sum(), latents)
        x0 = world.x0("generator", noise, 0.8, cond)  # and through the generator
        world.reward(x0.double(), cond).sum().backward()
        return r.detach(), g, torch.cat([p.grad.flatten() for p in world.params("generator")]), sum(saved)

    ref = run(None, False)
    assert ref[1].abs().max() > 0 and ref[2].abs().max() > 0
    for chunk, checkpointing in ((1, False), (2, False), (1, True), (2, True), (None, True)):
        out = run(chunk, checkpointing)
        for a, b in zip(out[:3], ref[:3]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        if checkpointing:
            assert out[3] < 0.1 * ref[3], (out[3], ref[3])


def test_decode_chunk_must_be_positive(tiny, tmp_path):
    with pytest.raises(ValueError, match="decode_chunk must be a positive integer, got 0"):
        make_world(tiny, "sd3-medium", tmp_path, decode_chunk=0)


# ------------------------------------------------------------------------------------------------------- warnings


def test_real_weights_with_the_smoke_test_prompts_warn(tiny, tmp_path, monkeypatch):
    """The tiny model (1e5 parameters) does not count as real weights; above the threshold the default prompt file
    warns, and a prompt file of one's own does not."""
    from t2i import world as world_module

    prompts = tmp_path / "mine.txt"
    prompts.write_text("a cat\na dog\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_world(tiny, "sd3-medium", tmp_path)
    monkeypatch.setattr(world_module, "REAL_MODEL_PARAMETERS", 10)
    with pytest.warns(UserWarning, match=r"real weights with the default prompt file .*train.txt, 48 smoke-test prompts.*--prompts FILE"):
        make_world(tiny, "sd3-medium", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_world(tiny, "sd3-medium", tmp_path, prompts=str(prompts))


# ------------------------------------------------------------------------------------------- evaluation's teacher


@pytest.mark.parametrize("model", FAMILIES)
def test_eval_teacher_is_the_stock_pipeline(tiny, model, tmp_path):
    """eval.py's teacher (its default steps: SD3 28, SDXL 50; CFG 3) gives the stock pipeline's latents from the same
    seed: levels from the pipeline's own scheduler (SD3 ending at sigma 3 s / (1 + 2 s), s = 3 / 1002, ~0.009; SDXL
    at timestep 1), guidance on the same null condition. Tolerance: float32 round-off of two algebraically equal step
    formulas, accumulated over the steps (1e-4 relative)."""
    import eval as evaluation
    from t2i.world import pipeline_class

    world = make_world(tiny, model, tmp_path)
    steps = evaluation.TEACHER_STEPS[world.family]
    levels = evaluation.teacher_sigmas(world, steps)
    assert len(levels) == steps
    if world.is_flow:
        assert levels[0] == 1.0 and abs(levels[-1] - 3 * (3 / 1002) / (1 + 2 * (3 / 1002))) < 1e-6  # 0.00893
    else:
        torch.testing.assert_close(world.timestep(torch.tensor(levels)), torch.arange(981, 0, -20).float())
    cond = world.sample_cond(2, split="eval")
    prompts = [world.prompts[i] for i in cond.tolist()]
    pipe = pipeline_class(world.family).from_pretrained(tiny[model])
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompts, height=32, width=32, num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
                 generator=torch.Generator().manual_seed(5)).images
    ours = evaluation.sample_teacher(world, cond, world.noise(cond, torch.Generator().manual_seed(5)), steps, 3.0)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4 * float(stock.abs().max()))
