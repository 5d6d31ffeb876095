"""Differentiable reward models for the text-to-image world.

Every factory takes the world's prompt table (a list of strings, indexed by the world's cond) and returns a callable
    score(images, idx) -> (n,)
images (n, 3, H, W) in [0, 1] (float32, WITH grad when the caller wants it), idx (n,) prompt indices. The prompts' text
features are computed once at construction, so a training step runs the image tower only.

    clip         CLIP score: cos(image, text) with transformers' CLIPModel (default openai/clip-vit-large-patch14,
                 RTDMD's CLIPScore; DMDR uses DFN5B ViT-H-14 through open_clip, not available here)
    pickscore    PickScore: logit_scale.exp() * cos, CLIPModel yuvalkirstain/PickScore_v1 (processor: laion ViT-H-14)
    aesthetic    LAION aesthetic predictor v2: MLP head on the L2-normalised CLIP ViT-L/14 image embedding
                 (head weights: trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth)
    hpsv2        HPSv2.1 (optional: the hpsv2x package and torchvision, never core requirements; HPSV2_INSTALL says how)
    imagereward  ImageReward v1.0: its BLIP (ViT-L/16 + a cross-attention BERT) rebuilt from transformers' BLIP modules
                 and its MLP head, loaded from the authors' ImageReward.pt; no package needed (the image-reward
                 package itself cannot import under transformers 5: its BLIP code imports names transformers removed)

A reward spec combines several: "clip:0.3:0.7,hpsv2:0.3:0.7" is 0.3 min(clip, 0.7) + 0.3 min(hpsv2, 0.7): the
optional third field caps a term, so that maximising the sum is DMDR's hinge loss relu(0.7 - s) per reward.
Checkpoints: each reward has a default hub id; `checkpoints` maps a reward name to a local path instead
(clip, pickscore, pickscore-processor, aesthetic (the head's .pth), aesthetic-clip, hpsv2 (.pt), imagereward (.pt),
imagereward-tokenizer (a bert-base-uncased folder)). A local path that does not exist is a "not found" error.
When clip and aesthetic (or any two scorers) use the same CLIP checkpoint, one CLIPModel is loaded and shared.
"""

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHECKPOINTS = {
    "clip": "openai/clip-vit-large-patch14",
    "pickscore": "yuvalkirstain/PickScore_v1",
    "pickscore-processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "aesthetic": "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
    "aesthetic-clip": "openai/clip-vit-large-patch14",
    "hpsv2": "xswu/HPSv2/HPS_v2.1_compressed.pt",
    "imagereward": "THUDM/ImageReward/ImageReward.pt",
    "imagereward-tokenizer": "google-bert/bert-base-uncased",
}
# verified in a scratch venv (README, "Rewards"): the hpsv2 wheel lacks its BPE vocabulary, hpsv2x ships it; with its
# dependencies hpsv2x would pull a CUDA torch 2.14, pytest 7.2 and protobuf 3.20, so: no deps, and only what its
# open_clip imports, with a torchvision built for the installed torch
HPSV2_INSTALL = ("pip install --no-deps hpsv2x==1.2.0 && pip install ftfy clint, plus a torchvision built for your "
                 "torch (torch 2.13.0 with CUDA: pip install --no-deps torchvision==0.28.0; a CPU-only torch: the CPU "
                 "build of torchvision 0.28.0 from PyTorch's CPU wheel index, as the PyPI one fails to import)")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _missing(name, checkpoint, err):
    return RuntimeError(
        f"reward {name!r}: could not load {checkpoint!r} ({type(err).__name__}: {err}). Download it where you have "
        f"network (hf download REPO [FILE] --local-dir DIR) and pass the local copy with --reward-checkpoints {name}=PATH."
    )


def _local(key, path):
    """A user-given checkpoint path, which must exist (a missing one is "not found", never tried as a hub id)."""
    from pathlib import Path

    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"--reward-checkpoints {key}={path}: {path} not found (the option takes local paths; "
                                f"without an entry the default {DEFAULT_CHECKPOINTS.get(key)!r} comes from the hub)")
    return str(Path(path).expanduser())


def _hub_file(spec):
    """"repo/owner/file.pt" -> the cached download of file.pt from the hub repository owner/repo."""
    from huggingface_hub import hf_hub_download

    repo, filename = spec.rsplit("/", 1)
    return hf_hub_download(repo, filename)


def preprocess(images, size, mean, std):
    """Differentiable CLIP preprocessing of square images (n, 3, H, W) in [0, 1]: bicubic resize to size x size
    (= CLIP's shortest-side resize + centre crop for square inputs), then per-channel normalisation."""
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(std, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


def _features(out):
    """transformers 5 returns an output object from get_*_features (.pooler_output); older versions a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_clip(name, checkpoint, processor_checkpoint=None, device="cpu", shared=None):
    """(CLIPModel, tokenizer, image processor) from checkpoint, frozen, on device. shared: a dict that memoises the load
    per (checkpoint, processor, device), so two scorers on the same CLIP (clip and aesthetic) hold one model."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    key = (str(checkpoint), str(processor_checkpoint or checkpoint), str(device))
    if shared is not None and key in shared:
        return shared[key]
    try:
        model = CLIPModel.from_pretrained(checkpoint)
        proc_src = processor_checkpoint or checkpoint
        tokenizer = AutoTokenizer.from_pretrained(proc_src)
        image_processor = CLIPImageProcessor.from_pretrained(proc_src)
    except Exception as err:  # noqa: BLE001 (missing files, gated or unreachable hub: one clear message)
        raise _missing(name, checkpoint, err) from err
    bundle = (model.to(device).eval().requires_grad_(False), tokenizer, image_processor)
    if shared is not None:
        shared[key] = bundle
    return bundle


def release_text_towers(shared):
    """Free the text towers of the shared CLIP models once every scorer has cached its prompts' text features."""
    for model, _, _ in shared.values():
        model.text_model = None


class CLIPScorer(nn.Module):
    """A frozen transformers CLIPModel with cached, L2-normalised text features of the prompt table.
    kind: "cosine" (CLIP score), "pickscore" (logit_scale.exp() * cosine), "embedding" (the normalised image embedding).
    shared: see load_clip (the text tower is then freed by release_text_towers, not here)."""

    def __init__(self, name, checkpoint, prompts, device, kind="cosine", processor_checkpoint=None, shared=None):
        super().__init__()
        model, tokenizer, image_processor = load_clip(name, checkpoint, processor_checkpoint, device, shared)
        self.kind = kind
        self.model = model
        crop = image_processor.crop_size
        self.size = int(crop["height"]) if crop is not None and not isinstance(crop, int) else int(crop)
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        self.logit_scale = float(self.model.logit_scale.exp())
        if kind != "embedding":  # the aesthetic head needs no text features
            max_len = min(tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
            with torch.no_grad():
                feats = []
                for i in range(0, len(prompts), 64):
                    tok = tokenizer(prompts[i : i + 64], padding="max_length", truncation=True, max_length=max_len,
                                    return_tensors="pt").to(device)
                    feats.append(_features(self.model.get_text_features(**tok)).float())
                text = torch.cat(feats)
            self.register_buffer("text", F.normalize(text, dim=-1))  # (P, D)
        if shared is None:
            self.model.text_model = None  # the text tower is not needed any more: free it

    def image_embedding(self, images):
        pixels = preprocess(images, self.size, self.mean, self.std).to(self.model.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)  # (n, D)

    def forward(self, images, idx):
        img = self.image_embedding(images)
        if self.kind == "embedding":
            return img
        cos = (img * self.text[idx].to(img.dtype)).sum(-1)  # (n,)
        return self.logit_scale * cos if self.kind == "pickscore" else cos


def clip_score(prompts, device, checkpoint=None, shared=None):
    return CLIPScorer("clip", checkpoint or DEFAULT_CHECKPOINTS["clip"], prompts, device, shared=shared)


def pick_score(prompts, device, checkpoint=None, processor_checkpoint=None, shared=None):
    """PickScore (Kirstain et al. 2023): the processor comes from the laion ViT-H-14 repository unless a local
    checkpoint is given (then from the checkpoint's own folder)."""
    proc = processor_checkpoint or (None if checkpoint else DEFAULT_CHECKPOINTS["pickscore-processor"])
    return CLIPScorer("pickscore", checkpoint or DEFAULT_CHECKPOINTS["pickscore"], prompts, device, "pickscore", proc,
                      shared=shared)


class AestheticHead(nn.Module):
    """The LAION improved-aesthetic-predictor MLP (same layer names as its released state dict: layers.0 ... layers.7)."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
            nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embedding):
        return self.layers(embedding).squeeze(-1)


class AestheticScorer(nn.Module):
    def __init__(self, prompts, device, checkpoint=None, clip_checkpoint=None, shared=None):
        super().__init__()
        self.clip = CLIPScorer("aesthetic-clip", clip_checkpoint or DEFAULT_CHECKPOINTS["aesthetic-clip"], prompts, device,
                               "embedding", shared=shared)
        head = checkpoint or DEFAULT_CHECKPOINTS["aesthetic"]
        try:
            if checkpoint is None:
                head = _hub_file(head)
            state = torch.load(head, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise _missing("aesthetic", head, err) from err
        self.head = AestheticHead(state["layers.0.weight"].shape[1])
        self.head.load_state_dict(state)
        self.head.to(device).eval().requires_grad_(False)

    def forward(self, images, idx):
        return self.head(self.clip(images, idx))  # the prompt is not used: aesthetics are prompt-free


def aesthetic_score(prompts, device, checkpoint=None, clip_checkpoint=None, shared=None):
    return AestheticScorer(prompts, device, checkpoint, clip_checkpoint, shared)


class HPSv2Scorer(nn.Module):
    """HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preferences; score = cos(image, text)."""

    def __init__(self, prompts, device, checkpoint=None, shared=None):
        super().__init__()
        check_packages([("hpsv2", 1.0, None)])
        from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer

        ckpt = checkpoint or DEFAULT_CHECKPOINTS["hpsv2"]
        try:
            if checkpoint is None:
                ckpt = _hub_file(ckpt)
            model, _, _ = create_model_and_transforms("ViT-H-14", None, precision="fp32", device=device, jit=False,
                                                      output_dict=True)
            state = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
            model.load_state_dict(state["state_dict"] if "state_dict" in state else state)
        except Exception as err:  # noqa: BLE001
            raise _missing("hpsv2", ckpt, err) from err
        self.model = model.to(device).eval().requires_grad_(False)
        self.prompts, self.tokenizer = list(prompts), get_tokenizer("ViT-H-14")
        self.register_buffer("text", self.text_features(self.prompts))

    @torch.no_grad()
    def text_features(self, texts):
        device = next(self.model.parameters()).device
        return torch.cat([self.model.encode_text(self.tokenizer(texts[i : i + 64]).to(device), normalize=True).float()
                          for i in range(0, len(texts), 64)])

    def set_text_prefix(self, prefix):
        """Score against prefix + " " + prompt from now on (DMDR's ReFL: "Realistic photo <prompt>"); "": the prompts."""
        self.text = self.text_features([f"{prefix} {p}" if prefix else p for p in self.prompts])

    def forward(self, images, idx):
        img = self.model.encode_image(preprocess(images, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), normalize=True)
        return (img.float() * self.text[idx]).sum(-1)


def hpsv2_score(prompts, device, checkpoint=None, shared=None):
    return HPSv2Scorer(prompts, device, checkpoint)


IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: the score's normalisation
IMAGEREWARD_MAX_LENGTH = 35  # ImageReward.score(): padding="max_length", truncation, max_length=35
HEAD_DIM = 64  # BLIP's ViT-L/16 (1024 = 16 x 64) and BERT-base (768 = 12 x 64): the head count follows from the width


def imagereward_from_state_dict(state):
    """transformers' BLIP modules and the MLP head, shaped and filled from an ImageReward.pt state dict.

    ImageReward v1.0 = BLIP's timm-style ViT-L/16 at 224 px (LayerNorm eps 1e-6, exact GELU) -> every token of the
    image; a BERT-base text encoder whose every layer cross-attends to them (BLIP's med.py, LayerNorm eps 1e-12);
    an MLP on the [CLS] output. The shapes of the state dict give every size (the tiny test model's too); its keys map
    one to one onto transformers' BlipVisionModel / BlipTextModel (BLIP's own conversion: cls_token ->
    class_embedding, blocks.i.attn.proj -> layers.i.self_attn.projection, norm -> post_layernorm, ...).
    Returns (vision, text, head, image_size)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vis = {k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    txt = {k[len("blip.text_encoder."):]: v for k, v in state.items() if k.startswith("blip.text_encoder.")}
    head_state = {k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.")}
    if not vis or not txt or not head_state:
        raise ValueError("not an ImageReward state dict (expected blip.visual_encoder.*, blip.text_encoder.*, mlp.*)")
    width, patch = vis["cls_token"].shape[-1], vis["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in vis if k.startswith("blocks."))
    image_size = patch * round((vis["pos_embed"].shape[1] - 1) ** 0.5)
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=width, intermediate_size=vis["blocks.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
        num_attention_heads=max(1, width // HEAD_DIM), image_size=image_size, patch_size=patch, hidden_act="gelu",
        layer_norm_eps=1e-6))
    vision.load_state_dict({_blip_vit_key(k): v for k, v in vis.items()}, strict=True)

    hidden = txt["embeddings.word_embeddings.weight"].shape[1]
    text = BlipTextModel(BlipTextConfig(
        vocab_size=txt["embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden, encoder_hidden_size=width,
        intermediate_size=txt["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in txt if k.startswith("encoder.layer.")),
        num_attention_heads=max(1, hidden // HEAD_DIM),
        max_position_embeddings=txt["embeddings.position_embeddings.weight"].shape[0], hidden_act="gelu",
        layer_norm_eps=1e-12, is_decoder=True, pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None),
        add_pooling_layer=False)  # is_decoder: builds the cross-attention (the forward stays bidirectional)
    text.load_state_dict({k: v for k, v in txt.items() if not k.endswith("position_ids")}, strict=True)
    head = AestheticHead(head_state["layers.0.weight"].shape[1])  # the same 5-linear MLP (ImageReward.py's MLP)
    head.load_state_dict(head_state)
    return vision, text, head, image_size


def _blip_vit_key(k):
    """BLIP's timm-style ViT parameter name -> transformers' BlipVisionModel name."""
    k = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}.get(k, k)
    k = re.sub(r"^patch_embed\.proj\.", "embeddings.patch_embedding.", k)
    k = re.sub(r"^norm\.", "post_layernorm.", k)
    k = re.sub(r"^blocks\.", "encoder.layers.", k)
    for old, new in ((".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
                     (".attn.proj.", ".self_attn.projection.")):
        k = k.replace(old, new)
    return k


def imagereward_tokenizer(source):
    """BLIP's tokenizer: bert-base-uncased plus [DEC] (bos) and [ENC] (BLIP's init_tokenizer; ids 30522, 30523)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(source)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardScorer(nn.Module):
    """ImageReward v1.0 (Xu et al. 2023), differentiable: (MLP(BERT_cross(prompt, ViT(image))[CLS]) - mean) / std, as
    ImageReward.score_gard computes it, on transformers' BLIP modules (imagereward_from_state_dict)."""

    def __init__(self, prompts, device, checkpoint=None, tokenizer_checkpoint=None, shared=None):
        super().__init__()
        ckpt = checkpoint or DEFAULT_CHECKPOINTS["imagereward"]
        try:
            if checkpoint is None:
                ckpt = _hub_file(ckpt)
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            tokenizer = imagereward_tokenizer(tokenizer_checkpoint or DEFAULT_CHECKPOINTS["imagereward-tokenizer"])
        except Exception as err:  # noqa: BLE001
            raise _missing("imagereward", ckpt, err) from err
        vision, text, head, self.size = imagereward_from_state_dict(state.get("state_dict", state))
        self.vision = vision.to(device).eval().requires_grad_(False)
        self.text_encoder = text.to(device).eval().requires_grad_(False)
        self.head = head.to(device).eval().requires_grad_(False)
        tok = tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH,
                        return_tensors="pt")
        self.register_buffer("ids", tok.input_ids.to(device))
        self.register_buffer("mask", tok.attention_mask.to(device))

    def forward(self, images, idx):
        pixels = preprocess(images, self.size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # BLIP's normalisation (= CLIP's)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # (n, 1 + patches, D_vision)
        out = self.text_encoder(input_ids=self.ids[idx], attention_mask=self.mask[idx],
                                encoder_hidden_states=image_tokens)  # every image token attended (all-ones mask)
        return ((self.head(out.last_hidden_state[:, 0].float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).reshape(-1)


def image_reward(prompts, device, checkpoint=None, tokenizer_checkpoint=None, shared=None):
    return ImageRewardScorer(prompts, device, checkpoint, tokenizer_checkpoint)


REWARDS = {
    "clip": clip_score,
    "pickscore": pick_score,
    "aesthetic": aesthetic_score,
    "hpsv2": hpsv2_score,
    "imagereward": image_reward,
}


CHECKPOINT_KEYS = tuple(DEFAULT_CHECKPOINTS)


def make_reward(name, prompts, device, checkpoints, shared=None):
    """The scorer `name` with its local weights from checkpoints (name -> path; pickscore's processor, the aesthetic
    head's CLIP and ImageReward's tokenizer have their own keys); None: the hub default. A given path that does not
    exist is a FileNotFoundError naming it. shared: a dict in which CLIP models are shared across scorers."""
    def given(key):  # only this scorer's own entries are checked: another reward's missing weights are not its error
        return _local(key, checkpoints[key]) if checkpoints.get(key) else None

    kwargs = {"checkpoint": given(name), "shared": shared}
    if name == "pickscore":
        kwargs["processor_checkpoint"] = given("pickscore-processor")
    if name == "aesthetic":
        kwargs["clip_checkpoint"] = given("aesthetic-clip")
    if name == "imagereward":
        kwargs["tokenizer_checkpoint"] = given("imagereward-tokenizer")
    return REWARDS[name](prompts, device, **kwargs)


def parse_spec(spec):
    """"clip:0.3:0.7,pickscore" -> [("clip", 0.3, 0.7), ("pickscore", 1.0, None)] (name, weight, cap)."""
    terms = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        fields = part.split(":")
        name = fields[0].strip()
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; valid rewards: {', '.join(REWARDS)}")
        if len(fields) > 3:
            raise ValueError(f"reward term {part!r}: expected name[:weight[:cap]]")
        try:
            weight = float(fields[1]) if len(fields) > 1 else 1.0
            cap = float(fields[2]) if len(fields) > 2 else None
        except ValueError:
            raise ValueError(f"reward term {part!r}: weight and cap must be numbers") from None
        if not math.isfinite(weight):
            raise ValueError(f"reward term {part!r}: weight must be finite")
        terms.append((name, weight, cap))
    if not terms:
        raise ValueError(f"empty reward spec {spec!r}; e.g. clip, or clip:0.3:0.7,pickscore:1")
    return terms


OPTIONAL_PACKAGES = {"hpsv2": ("hpsv2.src.open_clip", "hpsv2x")}  # reward: (the module its scorer imports, pip name)


def check_packages(terms):
    """Fail early (before any model loads) when a reward of the spec needs an optional package that does not import.
    The module is imported, not only found: the hpsv2 wheel installs but fails at import (FileNotFoundError, its BPE
    vocabulary is missing), and a torchvision built for another torch fails there too."""
    import importlib

    for name in sorted({t[0] for t in terms} & set(OPTIONAL_PACKAGES)):
        module, pip_name = OPTIONAL_PACKAGES[name]
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 (ImportError, FileNotFoundError, a torchvision RuntimeError: all say why)
            hint = ""
            if isinstance(err, FileNotFoundError) and "bpe" in str(err).lower():
                hint = " This is the hpsv2 wheel from PyPI, which lacks its BPE vocabulary: pip uninstall hpsv2."
            raise ImportError(
                f"reward {name!r} needs the optional package {pip_name}, and `import {module}` failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).{hint} Install it as: "
                f"{HPSV2_INSTALL} (it is not in requirements.txt: with its dependencies it pulls a CUDA torch and "
                f"downgrades pytest and protobuf). Or choose other rewards, e.g. --t2i-reward clip:0.3:0.7 or pickscore."
            ) from err
    return terms


def parse_checkpoints(text):
    """"clip=/models/clip,aesthetic=/models/head.pth" -> dict (None or "" -> {}); names must be checkpoint keys. Paths are
    checked where they are used (make_reward: a missing one is a "not found" error naming it, which eval.py reports as
    a skipped metric) or up front with check_checkpoints."""
    out = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        if "=" not in part:
            raise ValueError(f"reward checkpoint {part!r}: expected name=PATH")
        name, path = (x.strip() for x in part.split("=", 1))
        if name not in CHECKPOINT_KEYS:
            raise ValueError(f"reward checkpoint {name!r}: unknown name; valid names: {', '.join(CHECKPOINT_KEYS)}")
        out[name] = path
    return out


def check_checkpoints(checkpoints):
    """Before any model loads: every given path exists (`clip=/nope` -> FileNotFoundError naming /nope)."""
    return {k: _local(k, v) for k, v in checkpoints.items()}


class WeightedReward(nn.Module):
    """sum_i w_i min(s_i, cap_i) over the spec's terms; .scores() gives each raw term (for evaluation)."""

    def __init__(self, spec, prompts, device, checkpoints=None):
        super().__init__()
        checkpoints = dict(checkpoints or {})
        self.terms = parse_spec(spec)
        self.models = nn.ModuleDict()
        shared = {}  # one CLIPModel per checkpoint (clip and aesthetic both default to CLIP ViT-L/14)
        for name, _, _ in self.terms:
            if name in self.models:
                continue
            self.models[name] = make_reward(name, prompts, device, checkpoints, shared)
        release_text_towers(shared)

    def scores(self, images, idx):
        return {name: model(images, idx) for name, model in self.models.items()}

    def combine(self, scores):
        total = 0.0
        for name, weight, cap in self.terms:
            s = scores[name]
            total = total + weight * (s.clamp(max=cap) if cap is not None else s)
        return total

    def weighted_terms(self, images, idx):
        """{key: (weight, capped score (n,))} of every term of the spec, in order (key: the reward's name, with #i from
        the second term of a reward named twice): forward() is their weighted sum."""
        scores, out = self.scores(images, idx), {}
        for i, (name, weight, cap) in enumerate(self.terms):
            out[name if name not in out else f"{name}#{i}"] = (weight, scores[name].clamp(max=cap) if cap is not None
                                                                 else scores[name])
        return out

    def forward(self, images, idx):
        return self.combine(self.scores(images, idx))
