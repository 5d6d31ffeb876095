"""Tiny SD3 / SDXL pipelines and a tiny CLIP reward, built offline from configs (random weights, tokenizers from
in-memory vocabularies) and written with save_pretrained, so that tests and demos go through the real from_pretrained
path without the hub. 32 x 32 pixels, 1-2 layers, hidden sizes of 8-64: seconds on a CPU.

    python -m t2i.tiny /tmp/tiny          # writes /tmp/tiny/sd3, /tmp/tiny/sdxl, /tmp/tiny/clip
    python dmd.py --model sd3-medium --model-path /tmp/tiny/sd3 --resolution 32 \
        --t2i-reward clip --reward-checkpoints clip=/tmp/tiny/clip --num-steps 2 --batch-size 2
"""

import sys
from pathlib import Path

import torch

WORDS = ("a photo of an the cat dog red blue green tree house car on in with sky city painting portrait "
         "mountain lake river flower bird horse boat street night sun").split()


def _byte_chars():
    """GPT-2 / CLIP byte -> unicode table (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(max_length=16):
    """A CLIP byte-level BPE tokenizer from an in-memory vocabulary: the 256 byte symbols (with and without the
    end-of-word mark) and merges that spell a few whole words."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:  # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_t5_tokenizer(max_length=16):
    """A T5 (unigram) tokenizer from an in-memory vocabulary: specials, the words above and single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0) for w in WORDS] + [("\u2581", -3.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text_config(vocab_size, with_projection=True):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, projection_dim=32, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1, hidden_act="gelu")


def _tiny_vae(latent_channels, shift_factor=None, scaling_factor=0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 8], layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        shift_factor=shift_factor, scaling_factor=scaling_factor, use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )  # vae_scale_factor 2: 32 px images <-> 16 x 16 latents


def build_tiny_sd3(path, seed=0):
    """A StableDiffusion3Pipeline (MMDiT, 1 block, hidden 32, two CLIP + a T5 text encoder) saved to path."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    t5_tok = tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(len(tok))),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(tok))),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_sdxl(path, seed=0):
    """A StableDiffusionXLPipeline (UNet with 2 levels, channels 8/16, text_time conditioning) saved to path."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=4,
    )  # 80 = 6 time ids x 8 + the 32-d pooled text embedding; 64 = 32 + 32 hidden of the two text encoders
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        vae=_tiny_vae(4, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_clip_text_config(len(tok))),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(tok))),
        tokenizer_2=tiny_clip_tokenizer(),
    )
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_clip(path, seed=0, head_path=None):
    """A CLIPModel (text and vision hidden 32, 32 px images) with its tokenizer and image processor, saved to path;
    with head_path also a random aesthetic MLP head on its 32-d embedding (torch.save'd state dict)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from .rewards import AestheticHead

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    model = CLIPModel(CLIPConfig(text_config=_clip_text_config(len(tok)).to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=32))
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    if head_path is not None:
        torch.save(AestheticHead(32).state_dict(), head_path)
    return Path(path)


def tiny_bert_tokenizer_dir(path):
    """A bert-base-uncased-style WordPiece tokenizer (the words above and single characters), saved to path."""
    from transformers import BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(WORDS) + list("abcdefghijklmnopqrstuvwxyz")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    (path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=512).save_pretrained(path)
    return path


def tiny_imagereward_state(vocab_size, seed=0, width=64, depth=2, patch=16, image=32, hidden=64, layers=2):
    """A random state dict in ImageReward.pt's own key layout (BLIP ViT blip.visual_encoder.*, the cross-attention
    BERT blip.text_encoder.*, the MLP head mlp.*), 64-wide so that the 64-wide heads of the real model give 1 head.
    Weights ~ N(0, 1 / fan_in) (so the score varies with image and prompt at every depth), LayerNorms near 1."""
    gen = torch.Generator().manual_seed(seed)

    def lin(prefix, fan_out, fan_in):
        return {f"{prefix}.weight": torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5,
                f"{prefix}.bias": 0.1 * torch.randn(fan_out, generator=gen)}

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(dim, generator=gen), f"{prefix}.bias": 0.1 * torch.randn(dim, generator=gen)}

    v = "blip.visual_encoder."
    n_tokens = (image // patch) ** 2 + 1
    state = {f"{v}cls_token": torch.randn(1, 1, width, generator=gen), f"{v}pos_embed": torch.randn(1, n_tokens, width, generator=gen),
             f"{v}patch_embed.proj.weight": torch.randn(width, 3, patch, patch, generator=gen) / (3 * patch * patch) ** 0.5,
             f"{v}patch_embed.proj.bias": 0.1 * torch.randn(width, generator=gen)}
    for i in range(depth):
        b = f"{v}blocks.{i}."
        state |= norm(b + "norm1", width) | lin(b + "attn.qkv", 3 * width, width) | lin(b + "attn.proj", width, width)
        state |= norm(b + "norm2", width) | lin(b + "mlp.fc1", 4 * width, width) | lin(b + "mlp.fc2", width, 4 * width)
    state |= norm(f"{v}norm", width)
    t = "blip.text_encoder."
    state |= {f"{t}embeddings.word_embeddings.weight": torch.randn(vocab_size, hidden, generator=gen),
              f"{t}embeddings.position_embeddings.weight": torch.randn(40, hidden, generator=gen)}
    state |= norm(f"{t}embeddings.LayerNorm", hidden)
    for i in range(layers):
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", hidden), ("crossattention", width)):
            state |= lin(b + f"{att}.self.query", hidden, hidden) | lin(b + f"{att}.self.key", hidden, kv_width)
            state |= lin(b + f"{att}.self.value", hidden, kv_width) | lin(b + f"{att}.output.dense", hidden, hidden)
            state |= norm(b + f"{att}.output.LayerNorm", hidden)
        state |= lin(b + "intermediate.dense", 2 * hidden, hidden) | lin(b + "output.dense", hidden, 2 * hidden)
        state |= norm(b + "output.LayerNorm", hidden)
    for j, (o, i_) in zip((0, 2, 4, 6, 7), ((1024, hidden), (128, 1024), (64, 128), (16, 64), (1, 16))):  # the real head
        state |= lin(f"mlp.layers.{j}", o, i_)
    state |= lin("blip.vision_proj", 16, width) | lin("blip.text_proj", 16, hidden)  # in the real file too; unused
    return state


def build_tiny_imagereward(path, seed=0):
    """path/ImageReward.pt (a tiny random ImageReward state dict, tiny_imagereward_state) and path/tokenizer (BLIP's
    tokenizer over a tiny WordPiece vocabulary). Returns (checkpoint, tokenizer folder)."""
    from .rewards import imagereward_tokenizer

    path = Path(path)
    tok_dir = tiny_bert_tokenizer_dir(path / "tokenizer")
    state = tiny_imagereward_state(len(imagereward_tokenizer(str(tok_dir))), seed)
    torch.save(state, path / "ImageReward.pt")
    return path / "ImageReward.pt", tok_dir


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_models")
    build_tiny_sd3(root / "sd3")
    build_tiny_sdxl(root / "sdxl")
    build_tiny_clip(root / "clip", head_path=root / "aesthetic_head.pth")
    print(f"tiny pipelines and reward written to {root}")
