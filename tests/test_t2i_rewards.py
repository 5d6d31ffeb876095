"""Reward models on first real use, offline (tiny random models from t2i/tiny.py). What is asserted:
  * ImageReward: our loader (transformers' BLIP modules + the MLP head, from an ImageReward.pt state dict) gives the
    scores that the authors' own BLIP code gives on the same tiny random checkpoint and inputs, and is differentiable;
  * clip + aesthetic on one CLIP checkpoint load one CLIPModel, with the scores of separately loaded scorers;
  * --reward-checkpoints: a path that does not exist is a "not found" error naming it (check_checkpoints up front,
    make_reward where it is used), an unknown name lists the valid ones;
  * hpsv2: check_packages imports the module its scorer imports, so the PyPI wheel's import-time FileNotFoundError
    (its missing BPE vocabulary) is caught before any model loads, with the install line that works.
"""

import sys

import pytest
import torch

pytest.importorskip("transformers")

# ImageReward.score_gard's formula evaluated by the authors' own modules (THUDM/ImageReward ImageReward/models/BLIP
# med.py BertModel and vit.py VisionTransformer, under transformers 4.30.2 and timm 0.6.13, in a scratch venv) on
# t2i.tiny.build_tiny_imagereward(seed=0) and the inputs below (ids from imagereward_tokenizer, pixels from
# rewards.preprocess), printed to 7 decimals. Our loader agreed to the last printed digit (float32 round-off of two
# implementations of the same ops is ~1e-6 here: atol 1e-5).
AUTHORS_SCORES = [1.5452746, 0.6798828, 0.7991066, 0.3645739]
PROMPTS = ["a photo of a cat", "a red car on a street", "a painting of a mountain lake at night", ""]


def test_imagereward_loader_matches_the_authors_model(tmp_path):
    from t2i.rewards import WeightedReward
    from t2i.tiny import build_tiny_imagereward

    torch.set_num_threads(1)
    ckpt, tok = build_tiny_imagereward(tmp_path)
    reward = WeightedReward("imagereward", PROMPTS, "cpu", {"imagereward": str(ckpt), "imagereward-tokenizer": str(tok)})
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    scores = reward.scores(images, torch.arange(4))["imagereward"]
    torch.testing.assert_close(scores.detach(), torch.tensor(AUTHORS_SCORES), rtol=0, atol=1e-5)
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    other = reward.scores(images.detach(), torch.tensor([1, 0, 3, 2]))["imagereward"]  # the prompt matters
    assert (other - scores.detach()).abs().min() > 1e-3


def test_imagereward_refuses_another_state_dict(tmp_path):
    from t2i.rewards import imagereward_from_state_dict

    with pytest.raises(ValueError, match="not an ImageReward state dict"):
        imagereward_from_state_dict({"visual.proj": torch.zeros(2)})


def test_clip_and_aesthetic_share_one_clip_model(tmp_path, monkeypatch):
    from transformers import CLIPModel

    from t2i.rewards import WeightedReward
    from t2i.tiny import build_tiny_clip

    build_tiny_clip(tmp_path / "clip", head_path=tmp_path / "head.pth")
    ckpt = {"clip": str(tmp_path / "clip"), "aesthetic-clip": str(tmp_path / "clip"), "aesthetic": str(tmp_path / "head.pth")}
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 1])
    alone = {name: WeightedReward(name, PROMPTS, "cpu", ckpt).scores(images, idx)[name] for name in ("clip", "aesthetic")}

    loads = []
    real = CLIPModel.from_pretrained.__func__
    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    both = WeightedReward("clip:0.5,aesthetic", PROMPTS, "cpu", ckpt)
    assert len(loads) == 1
    assert both.models["clip"].model is both.models["aesthetic"].clip.model
    assert both.models["clip"].model.text_model is None  # the text tower is freed once both scorers are built
    scores = both.scores(images, idx)
    for name in ("clip", "aesthetic"):
        torch.testing.assert_close(scores[name], alone[name], rtol=0, atol=0)


def test_reward_checkpoints_that_do_not_exist_are_not_found(tmp_path):
    from t2i.rewards import check_checkpoints, make_reward, parse_checkpoints

    with pytest.raises(FileNotFoundError, match="--reward-checkpoints clip=/nope: /nope not found"):
        check_checkpoints(parse_checkpoints("clip=/nope"))
    with pytest.raises(FileNotFoundError, match="/nope not found"):
        make_reward("clip", PROMPTS, "cpu", {"clip": "/nope"})
    with pytest.raises(ValueError, match="unknown name; valid names: clip, pickscore, .*imagereward-tokenizer"):
        parse_checkpoints(f"clp={tmp_path}")
    given = parse_checkpoints(f"clip={tmp_path}, hpsv2={tmp_path}")
    assert check_checkpoints(given) == given == {"clip": str(tmp_path), "hpsv2": str(tmp_path)}


def test_hpsv2_check_imports_the_module_and_catches_its_real_failure(tmp_path, monkeypatch):
    """A stand-in for the PyPI hpsv2 wheel: installed (find_spec succeeds), but importing hpsv2.src.open_clip raises
    FileNotFoundError for its BPE vocabulary, as the real wheel does. The check says so and gives the install line."""
    from t2i.rewards import check_packages

    pkg = tmp_path / "hpsv2" / "src" / "open_clip"
    pkg.mkdir(parents=True)
    (tmp_path / "hpsv2" / "__init__.py").write_text("")
    (tmp_path / "hpsv2" / "src" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(
        "raise FileNotFoundError(2, 'No such file or directory', '/site-packages/hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz')")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.split(".")[0] == "hpsv2"]:
        monkeypatch.delitem(sys.modules, name)
    try:
        with pytest.raises(ImportError) as err:
            check_packages([("clip", 1.0, None), ("hpsv2", 0.3, 0.7)])
    finally:  # forget the stand-in's half-imported packages
        for name in [m for m in sys.modules if m.split(".")[0] == "hpsv2"]:
            del sys.modules[name]
    msg = str(err.value)
    assert "`import hpsv2.src.open_clip` failed (FileNotFoundError" in msg and "bpe_simple_vocab_16e6" in msg
    assert "lacks its BPE vocabulary: pip uninstall hpsv2." in msg and "pip install --no-deps hpsv2x==1.2.0" in msg
    assert "--t2i-reward clip:0.3:0.7" in msg
    check_packages([("clip", 1.0, None)])  # no optional reward, nothing imported


def test_hpsv2_missing_says_how_to_install(monkeypatch):
    from t2i.rewards import check_packages

    monkeypatch.setitem(sys.modules, "hpsv2", None)  # import hpsv2 -> ModuleNotFoundError, as when not installed
    with pytest.raises(ImportError, match=r"needs the optional package hpsv2x, and `import hpsv2.src.open_clip` failed "
                                          r"\((ModuleNotFoundError|ImportError).*pip install --no-deps hpsv2x"):
        check_packages([("hpsv2", 1.0, None)])
