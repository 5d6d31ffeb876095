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
    hpsv2        HPSv2.1 (optional: the hpsv2 package, which pulls open-clip-torch and torchvision; never a core requirement)
    imagereward  ImageReward v1.0 (optional: the image-reward package, same caveat)

A reward spec combines several: "clip:0.3:0.7,hpsv2:0.3:0.7" is 0.3 min(clip, 0.7) + 0.3 min(hpsv2, 0.7): the
optional third field caps a term, so that maximising the sum is DMDR's hinge loss relu(0.7 - s) per reward.
Checkpoints: each reward has a default hub id; `checkpoints` maps a reward name to a local path instead
(clip, pickscore, pickscore-processor, aesthetic (the head's .pth), aesthetic-clip, hpsv2 (.pt), imagereward).
"""

import math

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
    "imagereward": "ImageReward-v1.0",
}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _missing(name, checkpoint, err):
    return RuntimeError(
        f"reward {name!r}: could not load {checkpoint!r} ({type(err).__name__}: {err}). Download it where you have "
        f"network (huggingface-cli download ...) and pass a local copy with --reward-checkpoints {name}=PATH."
    )


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


class CLIPScorer(nn.Module):
    """A frozen transformers CLIPModel with cached, L2-normalised text features of the prompt table.
    kind: "cosine" (CLIP score), "pickscore" (logit_scale.exp() * cosine), "embedding" (the normalised image embedding)."""

    def __init__(self, name, checkpoint, prompts, device, kind="cosine", processor_checkpoint=None):
        super().__init__()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:
            model = CLIPModel.from_pretrained(checkpoint)
            proc_src = processor_checkpoint or checkpoint
            tokenizer = AutoTokenizer.from_pretrained(proc_src)
            image_processor = CLIPImageProcessor.from_pretrained(proc_src)
        except Exception as err:  # noqa: BLE001 (missing files, gated or unreachable hub: one clear message)
            raise _missing(name, checkpoint, err) from err
        self.kind = kind
        self.model = model.to(device).eval().requires_grad_(False)
        crop = image_processor.crop_size
        self.size = int(crop["height"]) if crop is not None and not isinstance(crop, int) else int(crop)
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        self.logit_scale = float(self.model.logit_scale.exp())
        max_len = min(tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        with torch.no_grad():
            feats = []
            for i in range(0, len(prompts), 64):
                tok = tokenizer(prompts[i : i + 64], padding="max_length", truncation=True, max_length=max_len,
                                return_tensors="pt").to(device)
                feats.append(_features(self.model.get_text_features(**tok)).float())
            text = torch.cat(feats)
        self.register_buffer("text", F.normalize(text, dim=-1))  # (P, D)
        self.model.text_model = None  # the text tower is not needed any more: free it

    def image_embedding(self, images):
        pixels = preprocess(images, self.size, self.mean, self.std).to(self.model.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)  # (n, D)

    def forward(self, images, idx):
        img = self.image_embedding(images)
        if self.kind == "embedding":
            return img
        cos = (img * self.text[idx]).sum(-1)  # (n,)
        return self.logit_scale * cos if self.kind == "pickscore" else cos


def clip_score(prompts, device, checkpoint=None):
    return CLIPScorer("clip", checkpoint or DEFAULT_CHECKPOINTS["clip"], prompts, device)


def pick_score(prompts, device, checkpoint=None, processor_checkpoint=None):
    """PickScore (Kirstain et al. 2023): the processor comes from the laion ViT-H-14 repository unless a local
    checkpoint is given (then from the checkpoint's own folder)."""
    proc = processor_checkpoint or (None if checkpoint else DEFAULT_CHECKPOINTS["pickscore-processor"])
    return CLIPScorer("pickscore", checkpoint or DEFAULT_CHECKPOINTS["pickscore"], prompts, device, "pickscore", proc)


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
    def __init__(self, prompts, device, checkpoint=None, clip_checkpoint=None):
        super().__init__()
        self.clip = CLIPScorer("aesthetic-clip", clip_checkpoint or DEFAULT_CHECKPOINTS["aesthetic-clip"], prompts, device,
                               "embedding")
        head = checkpoint or DEFAULT_CHECKPOINTS["aesthetic"]
        try:
            if not _is_local(head):
                from huggingface_hub import hf_hub_download

                repo, filename = head.rsplit("/", 1)
                head = hf_hub_download(repo, filename)
            state = torch.load(head, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise _missing("aesthetic", head, err) from err
        self.head = AestheticHead(state["layers.0.weight"].shape[1])
        self.head.load_state_dict(state)
        self.head.to(device).eval().requires_grad_(False)

    def forward(self, images, idx):
        return self.head(self.clip(images, idx))  # the prompt is not used: aesthetics are prompt-free


def aesthetic_score(prompts, device, checkpoint=None, clip_checkpoint=None):
    return AestheticScorer(prompts, device, checkpoint, clip_checkpoint)


def _is_local(path):
    from pathlib import Path

    return Path(path).exists()


class HPSv2Scorer(nn.Module):
    """HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preferences; score = cos(image, text)."""

    def __init__(self, prompts, device, checkpoint=None):
        super().__init__()
        try:
            from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        except ImportError as err:
            raise ImportError(
                "reward 'hpsv2' needs the optional package hpsv2 (pip install hpsv2; it pulls open-clip-torch and "
                "torchvision, which is why it is not in requirements.txt: install it with a torchvision that matches "
                f"your torch) and the checkpoint HPS_v2.1_compressed.pt (hub: xswu/HPSv2; or --reward-checkpoints "
                f"hpsv2=PATH). Without it use e.g. --t2i-reward clip or pickscore. ({err})"
            ) from err
        ckpt = checkpoint or DEFAULT_CHECKPOINTS["hpsv2"]
        try:
            if not _is_local(ckpt):
                from huggingface_hub import hf_hub_download

                repo, filename = ckpt.rsplit("/", 1)
                ckpt = hf_hub_download(repo, filename)
            model, _, _ = create_model_and_transforms("ViT-H-14", None, precision="fp32", device=device, jit=False,
                                                      output_dict=True)
            state = torch.load(ckpt, map_location="cpu")
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


def hpsv2_score(prompts, device, checkpoint=None):
    return HPSv2Scorer(prompts, device, checkpoint)


class ImageRewardScorer(nn.Module):
    """ImageReward v1.0 (Xu et al. 2023): BLIP image-text encoder + MLP head, normalised by its mean / std.
    Differentiable through the model's own score_gard (sic) method."""

    def __init__(self, prompts, device, checkpoint=None):
        super().__init__()
        try:
            import ImageReward as RM
        except ImportError as err:
            raise ImportError(
                "reward 'imagereward' needs the optional package image-reward (pip install image-reward; it pulls "
                "torchvision and timm, which is why it is not in requirements.txt) and its checkpoint ImageReward-v1.0 "
                f"(downloaded by the package, or --reward-checkpoints imagereward=PATH). ({err})"
            ) from err
        ckpt = checkpoint or DEFAULT_CHECKPOINTS["imagereward"]
        try:
            model = RM.load(ckpt, device=device)
        except Exception as err:  # noqa: BLE001
            raise _missing("imagereward", ckpt, err) from err
        self.model = model.eval().requires_grad_(False)
        tok = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        self.register_buffer("ids", tok.input_ids.to(device))
        self.register_buffer("mask", tok.attention_mask.to(device))

    def forward(self, images, idx):
        pixels = preprocess(images, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        return self.model.score_gard(self.ids[idx], self.mask[idx], pixels).reshape(-1).float()


def image_reward(prompts, device, checkpoint=None):
    return ImageRewardScorer(prompts, device, checkpoint)


REWARDS = {
    "clip": clip_score,
    "pickscore": pick_score,
    "aesthetic": aesthetic_score,
    "hpsv2": hpsv2_score,
    "imagereward": image_reward,
}


def make_reward(name, prompts, device, checkpoints):
    """The scorer `name` with its local weights from checkpoints (name -> path; pickscore's processor and the
    aesthetic head's CLIP have their own keys, "pickscore-processor" and "aesthetic-clip"); None: the hub default."""
    kwargs = {"checkpoint": checkpoints.get(name)}
    if name == "pickscore":
        kwargs["processor_checkpoint"] = checkpoints.get("pickscore-processor")
    if name == "aesthetic":
        kwargs["clip_checkpoint"] = checkpoints.get("aesthetic-clip")
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


OPTIONAL_PACKAGES = {"hpsv2": ("hpsv2", "hpsv2"), "imagereward": ("ImageReward", "image-reward")}  # reward: (module, pip name)


def check_packages(terms):
    """Fail early (before any model loads) when a reward of the spec needs an optional package that is not installed."""
    import importlib.util

    for name, _, _ in terms:
        if name in OPTIONAL_PACKAGES and importlib.util.find_spec(OPTIONAL_PACKAGES[name][0]) is None:
            module, pip_name = OPTIONAL_PACKAGES[name]
            raise ImportError(
                f"reward {name!r} needs the optional package {pip_name} (pip install {pip_name}; it pulls torchvision, "
                f"which is why it is not in requirements.txt: install it with a torchvision that matches your torch). "
                f"Or choose other rewards, e.g. --t2i-reward clip:0.3:0.7 or pickscore."
            )
    return terms


def parse_checkpoints(text):
    """"clip=/models/clip,aesthetic=/models/head.pth" -> dict (None or "" -> {})."""
    out = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        if "=" not in part:
            raise ValueError(f"reward checkpoint {part!r}: expected name=PATH")
        name, path = part.split("=", 1)
        out[name.strip()] = path.strip()
    return out


class WeightedReward(nn.Module):
    """sum_i w_i min(s_i, cap_i) over the spec's terms; .scores() gives each raw term (for evaluation)."""

    def __init__(self, spec, prompts, device, checkpoints=None):
        super().__init__()
        checkpoints = dict(checkpoints or {})
        self.terms = parse_spec(spec)
        self.models = nn.ModuleDict()
        for name, _, _ in self.terms:
            if name in self.models:
                continue
            self.models[name] = make_reward(name, prompts, device, checkpoints)

    def scores(self, images, idx):
        return {name: model(images, idx) for name, model in self.models.items()}

    def combine(self, scores):
        total = 0.0
        for name, weight, cap in self.terms:
            s = scores[name]
            total = total + weight * (s.clamp(max=cap) if cap is not None else s)
        return total

    def forward(self, images, idx):
        return self.combine(self.scores(images, idx))
