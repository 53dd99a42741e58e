"""A tiny, seeded, offline Stable Diffusion pipeline for tests and demos.

Same topology as Stable Diffusion 2.1-base (UNet: 3 CrossAttnDownBlock2D + DownBlock2D, then
UpBlock2D + 3 CrossAttnUpBlock2D, 2 layers per block, linear projections, 5/10/20 heads at
the three attention resolutions; VAE with a downsampling factor of 8; PNDM scheduler with
SD 2.1-base's configuration) but with tiny widths (head dim 8) and random weights. On one
CPU core a UNet call takes about 0.1 s at 128x128 and a few seconds at 512x512 (attention
over 4096 tokens with 5 heads dominates there). Nothing is downloaded:
the CLIP tokenizer's ``vocab.json`` and ``merges.txt`` are generated here (byte-level
symbols plus whole-word merges for class names and common prompt words; a few words
deliberately split into several tokens) and loaded from a temporary folder.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

__all__ = [
    "build_tiny_pipeline",
    "random_sd_pipeline",
    "build_tiny_tokenizer",
    "tiny_vocab_and_merges",
    "TINY_UNET_CONFIG",
    "TINY_SPLIT_WORDS",
]

# SD 2.1-base's UNet shape with tiny widths: heads (5, 10, 20, 20) as SD 2.1 (its config calls
# them `attention_head_dim`), channels 8 * heads, so every head has 8 dimensions.
TINY_UNET_CONFIG = dict(
    sample_size=64,  # latent side of a 512x512 image
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(40, 80, 160, 160),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),  # number of heads per level (SD 2's naming)
    cross_attention_dim=32,  # = the tiny text encoder's hidden size
    use_linear_projection=True,
    norm_num_groups=8,
    upcast_attention=False,
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplers: factor 8 like SD
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=512,
    scaling_factor=0.18215,
)

# stabilityai/stable-diffusion-2-1-base scheduler/scheduler_config.json (its `clip_sample`
# false is not a PNDMScheduler argument and is left out)
SD21_BASE_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
)

TINY_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
)

# Words that deliberately become several tokens (merges are made for the parts, none for the
# whole word), so the token-to-class mapping sees multi-token words: VOC's "airplane",
# "motorbike" and "sofa" (which ends up as "s" "of" "a", as "of" is merged first).
TINY_SPLIT_WORDS = {
    "airplane": ("air", "plane"),
    "motorbike": ("motor", "bike"),
    "sofa": ("so", "fa"),
    "television": ("tele", "vision"),
}

# Common words of the VOC prompts (most frequent first) that become single tokens.
_PROMPT_WORDS = """
a on in the of with sitting man and woman standing is couch riding table dog white train group cat
parked horse bus room people potted motorcycle field sheep car at bottle chair road bike tracks bird
plane laying two boat red cow water living down black small person to next street grass holding
flying blue plant it walking front ground desk are computer side sky playing pot dirt floor cows baby
beer bed parking flowers over boy girl green large yellow wooden brown jumping wine chairs monitor
horses tree beach grazing plants around wearing flower running branch window sleeping young lot
building little taking picture top sidewalk track food fence tv laptop through looking double decker
driving hill bench child bicycle its bunch eating bikes wall blanket book herd shirt runway pink
display bottles snow cell from pen air women rock perched motorcycles near seat reading ship birds
kitchen out three dining couple men garage race an set background her guitar screen plate dogs his
face talking stand row up station off lamb glass rocky keyboard swimming jump bridge monitors behind
vase cars barn docked jet buses toy forest hand shelf city under children ocean coffee brick head
river long eyes school jacket photo area sign boats hat lake hair dress cats box camera house night
mountain park photograph painting realistic high quality detailed
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the other bytes to
    code points from 256 upwards, so every byte is one visible character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _symbols(word: str, final: bool) -> list[str]:
    """Base symbols of a (lower-case ASCII) word; the last one carries ``</w>`` if ``final``."""
    byte_chars = _bytes_to_unicode()
    syms = [byte_chars[b] for b in word.encode("utf-8")]
    if final:
        syms[-1] = syms[-1] + "</w>"
    return syms


def _apply_bpe(syms: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding as CLIP does it: merge the lowest-ranked adjacent pair (every
    occurrence, left to right) until no listed pair is left."""
    syms = list(syms)
    while len(syms) > 1:
        pairs = {(a, b) for a, b in zip(syms[:-1], syms[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        out, i = [], 0
        while i < len(syms):
            if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                out.append(syms[i] + syms[i + 1])
                i += 2
            else:
                out.append(syms[i])
                i += 1
        syms = out
    return syms


def _label_words(label_set) -> list[str]:
    from pccfast.core.labelset import as_label_set

    ls = as_label_set(label_set)
    words = []
    for text in list(ls.classes) + list(ls.texts):
        words.extend(text.lower().split())
    return words


def tiny_vocab_and_merges(label_set="voc") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny tokenizer's vocabulary and merge list.

    Every VOC and COCO class name and text, the words of ``label_set`` and common prompt words
    become one token each (a word-final token ends in ``</w>``), except the words of
    ``TINY_SPLIT_WORDS``, whose parts are tokens but which stay several tokens. Any other word
    falls back to sub-word and byte tokens. Merges are added one at a time at the lowest
    priority, so a word made whole earlier keeps encoding to one token.
    """
    whole: list[str] = []
    for w in _label_words("voc") + _label_words("coco") + _label_words(label_set) + _PROMPT_WORDS:
        w = w.lower()
        if w.isascii() and w.isalpha() and w not in TINY_SPLIT_WORDS and w not in whole:
            whole.append(w)
    parts = [(p, i == len(ps) - 1) for ps in TINY_SPLIT_WORDS.values() for i, p in enumerate(ps)]
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for word, final in [(w, True) for w in whole] + parts:
        syms = _apply_bpe(_symbols(word, final), ranks)
        while len(syms) > 1:
            pair = (syms[0], syms[1])  # not in ranks, or _apply_bpe would have merged it
            ranks[pair] = len(merges)
            merges.append(pair)
            syms = _apply_bpe(syms, ranks)
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for t in tokens + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_tiny_tokenizer(label_set="voc"):
    """A ``CLIPTokenizer`` over the generated vocabulary (pad token ``!`` as SD 2.1's, 77 tokens)."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges(label_set)
    with tempfile.TemporaryDirectory(prefix="pccfast-tiny-tok-") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in merges)
        tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token="!", model_max_length=77)
    return tokenizer


def build_tiny_pipeline(seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, label_set="voc"):
    """A seeded random-weight ``StableDiffusionPipeline`` with SD 2.1-base's topology.

    Args:
        seed: same seed (and label set) -> identical weights. The global RNG is forked, seeded
            for the construction and restored afterwards, so callers' random state is untouched.
        device, dtype: where the pipeline is moved.
        label_set: name, dict or LabelSet whose words become single tokens (VOC and COCO always do).

    Returns:
        ``StableDiffusionPipeline`` (no safety checker) with a 2-layer, 32-wide CLIP text
        encoder, the tiny UNet (``TINY_UNET_CONFIG``), a tiny VAE (factor 8) and PNDM.
    """
    tokenizer = build_tiny_tokenizer(label_set)
    text = dict(TINY_TEXT_CONFIG, vocab_size=len(tokenizer))
    return random_sd_pipeline(TINY_UNET_CONFIG, TINY_VAE_CONFIG, text, tokenizer, seed=seed, device=device, dtype=dtype)


def random_sd_pipeline(unet_config: dict, vae_config: dict, text_config: dict, tokenizer, *, seed: int = 0,
                       device="cpu", dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` from configs with seeded random weights (no safety checker,
    SD 2.1-base's PNDM scheduler, diffusers' default attention processors).

    The global RNG is forked, seeded for the construction and restored afterwards, so callers'
    random state is untouched. Built in float32, then each model is cast on its own (the
    pipeline's and diffusers' own ``.to(dtype)`` warn about keeping modules in float32 even
    when there is none)."""
    from pccfast.diffusion.quiet import quiet_imports

    with quiet_imports():
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0
        from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **text_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(text)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=PNDMScheduler(**SD21_BASE_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe = pipe.to(device=device)
    if dtype != torch.float32:
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            torch.nn.Module.to(model, dtype)
    return pipe
