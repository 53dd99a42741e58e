"""Every UNet family's tiny model through the capture: SDXL (tiny-sdxl, non-square and
guidance-free), SD-Turbo (tiny-turbo, guidance 0, one step), a guidance-distilled UNet
(tiny-lcm: one half whatever the guidance) and the SD model at a non-square size (tiny).

Per case: images with the capture == images with diffusers' default processors (1e-5); class
maps == a slow float64 recomputation from the stored queries and the class text encoded
offline; features == a float64 SVD of the stored per-head outputs; the labelling grid is the
finest attention level; batch 1 and batch 4 give the same images (1e-4) and blocky masks."""
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from pccfast.core.config import PCCConfig
from pccfast.core.labeller import label_images
from pccfast.data.labelsets import get_label_set
from pccfast.diffusion.adapters import StableDiffusionAdapter, StableDiffusionXLAdapter, adapter_for
from pccfast.diffusion.generation import generate_with_capture
from pccfast.diffusion.layers import cross_attention_layers, self_attention_layers
from pccfast.diffusion.pipeline import load_pipeline
from pccfast.diffusion.tokens import class_text

VOC = get_label_set("voc")
PROMPTS = ["a cat on a sofa", "a pot plant next to a motorbike", "a dog and a dog", "a bus"]
CLASSES = [["cat", "sofa"], ["pottedplant", "motorbike"], ["dog", "dog"], ["bus"]]
SEEDS = [11, 12, 13, 14]
EXACT = PCCConfig(pca_method="eigh")

# id -> (model, settings, adapter class, halves)
CASES = {
    "sdxl-64x96": ("tiny-sdxl", dict(height=64, width=96, guidance=7.5, steps=2), StableDiffusionXLAdapter, 2),
    "sdxl-turbo-like": ("tiny-sdxl", dict(height=64, width=64, guidance=0.0, steps=1), StableDiffusionXLAdapter, 1),
    "turbo": ("tiny-turbo", dict(height=64, width=64, guidance=0.0, steps=1), StableDiffusionAdapter, 1),
    "lcm-distilled": ("tiny-lcm", dict(height=64, width=64, guidance=7.5, steps=2), StableDiffusionAdapter, 1),
    "sd-64x96": ("tiny", dict(height=64, width=96, guidance=7.5, steps=2), StableDiffusionAdapter, 2),
    "sd1-like": ("sd1-like", dict(height=64, width=64, guidance=7.5, steps=2), StableDiffusionAdapter, 2),
}

_PIPES: dict = {}


def _sd1_like():
    """SD 1.x's UNet shape in miniature: the same heads (8) at every level (SD 1's
    ``attention_head_dim=8``) and convolutional projections around the transformers."""
    from pccfast.diffusion.tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, build_tiny_tokenizer, \
        random_sd_pipeline

    tok = build_tiny_tokenizer()
    unet = dict(TINY_UNET_CONFIG, attention_head_dim=8, use_linear_projection=False)
    return random_sd_pipeline(unet, TINY_VAE_CONFIG, dict(TINY_TEXT_CONFIG, vocab_size=len(tok)), tok, seed=1)


def _pipe(model):
    if model not in _PIPES:
        _PIPES[model] = _sd1_like() if model == "sd1-like" else load_pipeline(model)
        _PIPES[model].set_progress_bar_config(disable=True)
    return _PIPES[model]


class _Recorder:
    """Stores what the reference stores and computes nothing clever: every call's class-map
    queries of the first B rows (the unconditional half with guidance, the batch without), and
    the last call's per-head self-attention outputs, both in float64."""

    def __init__(self, unet, batch):
        self.unet, self.batch = unet, batch
        self.queries = defaultdict(list)  # name -> [(B, N, inner) per call]
        self.heads = {}  # name -> (halves*B, heads, N, d) of the latest call

    def processors(self):
        procs = dict(self.unet.attn_processors)
        for n in cross_attention_layers(self.unet):
            procs[n] = _RecordProcessor(self, n, "cross")
        for n in self_attention_layers(self.unet):
            procs[n] = _RecordProcessor(self, n, "self")
        return procs


class _RecordProcessor:
    def __init__(self, rec, name, kind):
        self.rec, self.name, self.kind = rec, name, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if self.kind == "cross":
            self.rec.queries[self.name].append(attn.to_q(hidden_states[: self.rec.batch]).double())
        else:
            h = hidden_states.double()
            q, k, v = (h @ m.weight.double().T for m in (attn.to_q, attn.to_k, attn.to_v))  # (N_b, N, inner)
            n_b, n, _ = q.shape
            q, k, v = (t.view(n_b, n, attn.heads, -1).transpose(1, 2) for t in (q, k, v))  # (N_b, heads, N, d)
            self.rec.heads[self.name] = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _plain(pipe, settings, prompts, seeds, processors=None):
    saved = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(processors if processors is not None else AttnProcessor2_0())
    try:
        return pipe(list(prompts), height=settings["height"], width=settings["width"],
                    num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                    generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images
    finally:
        pipe.unet.set_attn_processor(saved)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, settings, adapter_cls, halves = CASES[request.param]
    pipe = _pipe(model)
    b = 3
    online = generate_with_capture(pipe, PROMPTS[:b], CLASSES[:b], VOC, SEEDS[:b], cfg=EXACT, **settings)
    rec = _Recorder(pipe.unet, b)
    recorded = _plain(pipe, settings, PROMPTS[:b], SEEDS[:b], rec.processors())
    return dict(id=request.param, pipe=pipe, settings=settings, adapter_cls=adapter_cls, halves=halves, b=b,
                online=online, rec=rec, recorded=recorded)


def _level_hw(n, latent_hw):
    h, w = latent_hw
    f = 1
    while math.ceil(h / f) * math.ceil(w / f) != n:
        f *= 2
        assert f <= max(h, w), n
    return math.ceil(h / f), math.ceil(w / f)


def _offline_embeddings(pipe, text):
    """The class text encoded as the pipeline encodes prompts for cross-attention, unpadded:
    SD: the text encoder's last hidden states; SDXL: both encoders' penultimate ones, concatenated."""
    ids = pipe.tokenizer(text)["input_ids"]
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is None:
            return pipe.text_encoder(torch.tensor([ids]))[0][0].double(), pipe.tokenizer(text)
        parts = [enc(torch.tensor([tok(text)["input_ids"]]), output_hidden_states=True).hidden_states[-2][0]
                 for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))]
    return torch.cat(parts, -1).double(), pipe.tokenizer(text)


def _offline_class_maps(pipe, rec, i, classes, image_hw, latent_hw):
    emb, enc = _offline_embeddings(pipe, class_text(classes, VOC))  # (T_i, C)
    layers = cross_attention_layers(pipe.unet)
    sizes = {n: _level_hw(rec.queries[n][0].shape[1], latent_hw) for n in layers}
    grid = max(sizes.values())  # the finest attention level
    total = 0
    with torch.no_grad():
        for name in layers:
            attn = pipe.unet.get_submodule(name[: -len(".processor")])
            key = (emb @ attn.to_k.weight.double().T).view(-1, attn.heads, attn.to_k.out_features // attn.heads)
            key = key.transpose(0, 1)  # (heads, T_i, d)
            acc = 0
            for q in rec.queries[name]:  # (B, N, inner) per call
                qi = q[i].view(q.shape[1], attn.heads, -1).transpose(0, 1)  # (heads, N, d)
                acc = acc + torch.softmax(qi @ key.transpose(-1, -2) * attn.scale, dim=-1)  # (heads, N, T_i)
            m = acc.sum(0).T.reshape(1, -1, *sizes[name])  # (1, T_i, h_l, w_l)
            total = total + F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        up = F.interpolate(total, size=image_hw, mode="bilinear", align_corners=False)
        f = image_hw[0] // grid[0]
        assert image_hw[1] // grid[1] == f
        pooled = F.avg_pool2d(up, f)[0] * f * f  # (T_i, h, w)
    word_class = [VOC.index(c) for c in classes for _ in VOC.text_of(c).split()]
    out = torch.zeros(VOC.num_classes, *grid, dtype=torch.float64)
    for t, w in enumerate(enc.word_ids()):
        if t > 0 and w is None:
            continue  # EoT
        c = 0 if t == 0 else word_class[w]
        out[c] = torch.maximum(out[c], pooled[t])
    return out, grid


def test_adapter_and_halves(case):
    a = adapter_for(case["pipe"])
    assert type(a) is case["adapter_cls"]
    assert a.halves(case["settings"]["guidance"]) == case["halves"] == case["online"].halves
    rec = case["rec"]
    first = next(iter(rec.heads.values()))
    assert first.shape[0] == case["halves"] * case["b"]  # the UNet batch: 2B with guidance, B without


def test_images_unchanged(case):
    """The capture computes every attention output as diffusers' default processors do."""
    plain = _plain(case["pipe"], case["settings"], PROMPTS[: case["b"]], SEEDS[: case["b"]])
    torch.testing.assert_close(case["recorded"], plain, rtol=0, atol=1e-5)
    got = case["online"].images
    assert got.shape == (case["b"], 3, case["settings"]["height"], case["settings"]["width"])
    assert int((got.int() - (plain * 255).round().clamp(0, 255).int()).abs().max()) == 0


def test_class_maps_equal_float64_recomputation(case):
    pipe, rec, s = case["pipe"], case["rec"], case["settings"]
    adapter = adapter_for(pipe)
    image_hw = (s["height"], s["width"])
    latent_hw = adapter.latent_hw(*image_hw)
    steps = len(next(iter(rec.queries.values())))
    assert all(len(v) == steps for v in rec.queries.values())
    for i, classes in enumerate(CLASSES[: case["b"]]):
        ref, grid = _offline_class_maps(pipe, rec, i, classes, image_hw, latent_hw)
        assert grid == adapter.grid_hw(*image_hw)  # the grid is the finest attention level
        got = case["online"].class_attention[i].double()
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_features_equal_float64_svd(case):
    pipe, rec, b, halves = case["pipe"], case["rec"], case["b"], case["halves"]
    adapter = adapter_for(pipe)
    s = case["settings"]
    latent_hw, (gh, gw) = adapter.latent_hw(s["height"], s["width"]), adapter.grid_hw(s["height"], s["width"])
    feats = case["online"].features
    assert feats.shape[-2:] == (gh, gw)
    offset = checked = 0
    for name in self_attention_layers(pipe.unet):
        x = rec.heads[name]  # (halves*B, heads, N, d), float64
        _, heads, n, d = x.shape
        x = x.view(halves, b, heads, n, d).transpose(0, 1).reshape(b, halves * heads, n, d)  # uncond heads first
        xc = x - x.mean(dim=2, keepdim=True)
        _, sv, vh = torch.linalg.svd(xc, full_matrices=False)
        axes = vh[..., :3, :]  # (B, H, 3, d)
        pick = axes.abs().argmax(dim=-1, keepdim=True)
        axes = axes * torch.sign(torch.gather(axes, -1, pick))  # largest-|loading| coordinate positive
        exact = xc @ axes.transpose(-1, -2)  # (B, H, N, 3)
        width = halves * heads * 3
        block = feats[:, offset: offset + width]  # (B, H*3, h, w)
        offset += width
        hl, wl = _level_hw(n, latent_hw)
        small = F.interpolate(exact.transpose(-1, -2).reshape(b, width, hl, wl).float(), size=(gh, gw), mode="nearest")
        assert small.shape == block.shape
        got = block[:, :, :: gh // hl, :: gw // wl].reshape(b, halves * heads, 3, n).transpose(-1, -2).double()
        assert torch.equal(F.interpolate(got.transpose(-1, -2).reshape(b, width, hl, wl).float(), size=(gh, gw),
                                         mode="nearest"), block)  # nearest-neighbour upsampling
        var = sv**2
        gap = torch.minimum(var[..., :3] - var[..., 1:4], torch.cat([var[..., :1], var[..., :2] - var[..., 1:3]], -1))
        clear = gap / var[..., :1] > 1e-2  # well-separated components
        err = (got - exact).norm(dim=2) / exact.norm(dim=2)
        assert float(err[clear].max()) < 1e-4, name
        checked += int(clear.sum())
    assert offset == feats.shape[1]
    if case["id"] == "sd1-like":  # 3 levels x 3 up-block layers x 8 heads, both halves: SD 1.x's D = 432
        assert feats.shape[1] == 3 * 2 * 72 == 432
    assert checked > 0.8 * b * feats.shape[1] / 3


def test_batch_1_and_4_same_images_and_blocky_masks(case):
    pipe, s = case["pipe"], case["settings"]
    four = generate_with_capture(pipe, PROMPTS, CLASSES, VOC, SEEDS, **s)
    one = generate_with_capture(pipe, PROMPTS[2:3], CLASSES[2:3], VOC, SEEDS[2:3], **s)
    plain4 = _plain(pipe, s, PROMPTS, SEEDS)
    plain1 = _plain(pipe, s, PROMPTS[2:3], SEEDS[2:3])
    torch.testing.assert_close(plain4[2:3], plain1, rtol=0, atol=1e-4)
    assert int((four.images[2].int() - one.images[0].int()).abs().max()) <= 1
    cfg = PCCConfig(refine=False)
    m4 = label_images(four.features[2:3], four.class_attention[2:3], four.images[2:3], cfg).blocky
    m1 = label_images(one.features, one.class_attention, one.images, cfg).blocky
    assert torch.equal(m4, m1)


def test_sdxl_class_texts_encoded_as_prompts():
    """The SDXL class-text embeddings are the pipeline's own prompt embeddings of that text
    (both encoders' penultimate states, 2 x 32 channels) on its real tokens: unpadded, with SoT
    and EoT (CLIP's causal attention: the padding changes nothing before it)."""
    pipe = _pipe("tiny-sdxl")
    names = [["pottedplant", "motorbike"], ["cat"]]
    embeds, mask, tok = adapter_for(pipe).encode_class_texts(names, VOC)
    assert embeds.shape[-1] == pipe.unet.config.cross_attention_dim == 64
    for i, classes in enumerate(names):
        with torch.no_grad():
            prompt_embeds = pipe.encode_prompt(class_text(classes, VOC), do_classifier_free_guidance=False)[0]
        n = int(mask[i].sum())
        torch.testing.assert_close(embeds[i, :n], prompt_embeds[0, :n], rtol=1e-5, atol=1e-6)
        assert torch.equal(embeds[i, n:], torch.zeros_like(embeds[i, n:]))
        assert tok.ids[i, 0] == pipe.tokenizer.bos_token_id and tok.ids[i, n - 1] == pipe.tokenizer.eos_token_id


@pytest.mark.parametrize("model, guidance", [("tiny-sdxl", 7.5), ("tiny-turbo", 0.0)])
def test_capture_memory_flat_in_steps(model, guidance):
    """The capture's buffers (class maps summed over steps, last-step features) do not grow
    with the number of UNet calls."""
    from pccfast.diffusion.capture import AttentionCapture
    from pccfast.diffusion.schedulers import unet_calls

    pipe = _pipe(model)
    adapter = adapter_for(pipe)
    embeds, mask, _ = adapter.encode_class_texts([["cat"]], VOC)
    held = []
    for steps in (1, 3):
        cap = AttentionCapture(adapter.denoiser, embeds, mask, unet_calls(pipe.scheduler, steps), adapter.latent_hw(64, 64),
                               adapter=adapter, halves=adapter.halves(guidance), grid_hw=adapter.grid_hw(64, 64))
        with cap:
            pipe(["a cat"], height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                 generator=[torch.Generator().manual_seed(1)], output_type="pt", callback_on_step_end=cap.on_step_end)
        cap.features()
        held.append(sum(t.numel() * t.element_size() for t in [*cap.class_maps.values(), *cap.head_features.values()]))
        assert not cap.head_inputs  # the per-head outputs are released after the PCA
    assert held[0] == held[1] > 0
