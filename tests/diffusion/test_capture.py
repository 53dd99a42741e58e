"""Attention capture: unchanged images, class maps and head-wise features equal to the
reference's slow offline computation, batch invariance, and the loader's error message."""
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from pccfast.diffusion.capture import (
    AttentionCapture,
    ClassAttentionProcessor,
    HeadFeatureProcessor,
    assemble_class_attention,
    cross_attention_layers,
    generate_with_capture,
    self_attention_layers,
)
from pccfast.core.config import PCCConfig
from pccfast.data.labelsets import get_label_set
from pccfast.core.pca import headwise_features
from pccfast.diffusion.pipeline import ModelNotFoundError, load_pipeline
from pccfast.diffusion.tiny import build_tiny_pipeline
from pccfast.diffusion.tokens import class_text

VOC = get_label_set("voc")
PROMPTS = ["a cat on a sofa", "a pot plant next to a motorbike", "a dog and a dog"]
CLASSES = [["cat", "sofa"], ["pottedplant", "motorbike"], ["dog", "dog"]]
SEEDS = [11, 12, 13]
STEPS = 2  # PNDM makes 3 UNet calls
SIZE = 128  # latent 16: up-block attention at 4x4, 8x8, 16x16
EXACT = PCCConfig(pca_method="eigh")


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _run(pipe, prompts, seeds, size=SIZE, steps=STEPS, **kw):
    return pipe(list(prompts), height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                generator=_gens(seeds), output_type="pt", **kw).images


# --- a recording processor: stores what the reference stores, computes nothing clever --------


class _Recorder:
    """Every call's unconditional attn2 queries; the last call's attn1 per-head outputs (float64)."""

    def __init__(self, unet, batch):
        self.unet, self.batch = unet, batch
        self.queries = defaultdict(list)  # name -> [(B, N, inner) per step]
        self.heads = {}  # name -> (2B, heads, N, d) of the latest call

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
        b = self.rec.batch
        if self.kind == "cross":
            self.rec.queries[self.name].append(attn.to_q(hidden_states[:b]).double())
        else:
            h = hidden_states.double()
            q, k, v = (h @ m.weight.double().T for m in (attn.to_q, attn.to_k, attn.to_v))  # (2B, N, inner)
            n_b, n, inner = q.shape
            q, k, v = (t.view(n_b, n, attn.heads, -1).transpose(1, 2) for t in (q, k, v))  # (2B, heads, N, d)
            self.rec.heads[self.name] = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@pytest.fixture(scope="module")
def online(pipe):
    return generate_with_capture(pipe, PROMPTS, CLASSES, VOC, SEEDS, steps=STEPS, guidance=7.5,
                                 height=SIZE, width=SIZE, cfg=EXACT)


@pytest.fixture(scope="module")
def recorded(pipe):
    rec = _Recorder(pipe.unet, len(PROMPTS))
    saved = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(rec.processors())
    try:
        images = _run(pipe, PROMPTS, SEEDS)
    finally:
        pipe.unet.set_attn_processor(saved)
    return rec, images


# --- (a) the capture changes nothing ------------------------------------------------------------


def test_capture_leaves_images_unchanged(pipe, online, recorded):
    plain = _run(pipe, PROMPTS, SEEDS)
    before = dict(pipe.unet.attn_processors)
    with torch.no_grad():
        emb = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    cap = AttentionCapture(pipe.unet, emb, torch.ones(3, 4, dtype=torch.bool), STEPS + 1, (SIZE // 8, SIZE // 8), EXACT)
    with cap:
        assert isinstance(pipe.unet.attn_processors[cap.self_layers[0]], HeadFeatureProcessor)
        captured = _run(pipe, PROMPTS, SEEDS, callback_on_step_end=cap.on_step_end)
    assert cap.step == STEPS + 1 and len(cap.head_features) == 9 and len(cap.class_maps) == 15
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    torch.testing.assert_close(captured, plain, rtol=0, atol=1e-5)
    # generate_with_capture's uint8 images are the plain images rounded
    assert torch.equal(online.images, (plain * 255).round().to(torch.uint8))
    torch.testing.assert_close(recorded[1], plain, rtol=0, atol=1e-5)


# --- (b) class maps = the reference's offline computation ---------------------------------------


def _offline_class_maps(pipe, rec, i, classes, size):
    """The reference's way for image i: unpadded text, per-step softmax over its tokens, sums,
    per-layer bilinear resize to the grid, sum, resize to the image, 8x8 sum-pool, max per class."""
    grid = size // 8
    enc = pipe.tokenizer(class_text(classes, VOC))
    with torch.no_grad():
        emb = pipe.text_encoder(torch.tensor([enc["input_ids"]]))[0].double()  # (1, T_i, C)
        total = 0
        for name in cross_attention_layers(pipe.unet):
            attn = pipe.unet.get_submodule(name[: -len(".processor")])
            key = (emb[0] @ attn.to_k.weight.double().T).view(-1, attn.heads, attn.to_k.out_features // attn.heads)
            key = key.transpose(0, 1)  # (heads, T_i, d)
            acc = 0
            for q in rec.queries[name]:  # (B, N, inner) per step
                qi = q[i].view(q.shape[1], attn.heads, -1).transpose(0, 1)  # (heads, N, d)
                acc = acc + torch.softmax(qi @ key.transpose(-1, -2) * attn.scale, dim=-1)  # (heads, N, T_i)
            side = math.isqrt(acc.shape[1])
            m = acc.sum(0).T.reshape(1, -1, side, side)  # (1, T_i, side, side)
            total = total + F.interpolate(m, size=(grid, grid), mode="bilinear", align_corners=False)
        up = F.interpolate(total, size=(size, size), mode="bilinear", align_corners=False)
        pooled = F.avg_pool2d(up, 8)[0] * 64  # (T_i, grid, grid)
    word_class = [VOC.index(c) for c in classes for _ in VOC.text_of(c).split()]
    out = torch.zeros(VOC.num_classes, grid, grid, dtype=torch.float64)
    for t, w in enumerate(enc.word_ids()):
        if t > 0 and w is None:
            continue  # EoT
        c = 0 if t == 0 else word_class[w]
        out[c] = torch.maximum(out[c], pooled[t])
    return out


def test_class_maps_equal_offline_reference(pipe, online, recorded):
    rec, _ = recorded
    assert all(len(v) == STEPS + 1 for v in rec.queries.values()) and len(rec.queries) == 15
    for i, classes in enumerate(CLASSES):
        ref = _offline_class_maps(pipe, rec, i, classes, SIZE)
        got = online.class_attention[i].double()
        present = {0} | {VOC.index(c) for c in classes}
        assert all(bool(ref[k].any()) == (k in present) for k in range(VOC.num_classes))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert online.class_attention.shape == (3, 21, SIZE // 8, SIZE // 8) and online.class_attention.dtype == torch.float32


# --- (c) features = exact head-wise PCA of the stored last-step outputs --------------------------


def test_features_equal_exact_headwise_pca(pipe, online, recorded):
    rec, _ = recorded
    b, grid = len(PROMPTS), SIZE // 8
    feats = online.features
    offset = 0
    checked = 0
    for name in self_attention_layers(pipe.unet):
        x = rec.heads[name]  # (2B, heads, N, d), float64
        two_b, heads, n, d = x.shape
        x = x.view(2, b, heads, n, d).transpose(0, 1).reshape(b, 2 * heads, n, d)  # uncond heads first
        xc = x - x.mean(dim=2, keepdim=True)
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)  # vh: (B, 2h, d, d)
        axes = vh[..., :3, :]  # (B, 2h, 3, d)
        pick = axes.abs().argmax(dim=-1, keepdim=True)
        axes = axes * torch.sign(torch.gather(axes, -1, pick))  # largest-|loading| coordinate positive
        exact = xc @ axes.transpose(-1, -2)  # (B, 2h, N, 3)
        block = feats[:, offset : offset + 2 * heads * 3]  # (B, 2h*3, grid, grid)
        offset += 2 * heads * 3
        side = math.isqrt(n)
        step = grid // side
        small = block[:, :, ::step, ::step]  # (B, 2h*3, side, side)
        up = small.repeat_interleave(step, -1).repeat_interleave(step, -2)
        assert torch.equal(block, up)  # nearest-neighbour upsampling
        got = small.reshape(b, 2 * heads, 3, n).transpose(-1, -2).double()  # (B, 2h, N, 3)
        var = s**2
        gap = torch.minimum(var[..., :3] - var[..., 1:4], torch.cat([var[..., :1], var[..., :2] - var[..., 1:3]], -1))
        clear = gap / var[..., :1] > 1e-2  # (B, 2h, 3): well-separated components
        err = (got - exact).norm(dim=2) / exact.norm(dim=2)
        assert float(err[clear].max()) < 1e-4, name
        checked += int(clear.sum())
        # whatever the gaps, the 3-D subspaces agree
        proj = exact @ torch.linalg.pinv(exact)  # (B, 2h, N, N)
        torch.testing.assert_close(proj @ got, got, rtol=0, atol=1e-3 * float(got.abs().max()))
    assert offset == feats.shape[1] == 3 * 2 * 3 * (20 + 10 + 5)
    assert checked > 0.8 * feats.shape[0] * feats.shape[1]


# --- (d) batch invariance -----------------------------------------------------------------------


def test_batch_invariance(pipe):
    three = _run(pipe, PROMPTS, SEEDS, size=64)
    one = _run(pipe, PROMPTS[1:2], SEEDS[1:2], size=64)
    torch.testing.assert_close(three[1:2], one, rtol=0, atol=1e-4)
    full = generate_with_capture(pipe, PROMPTS, CLASSES, VOC, SEEDS, steps=STEPS, height=64, width=64)
    alone = generate_with_capture(pipe, PROMPTS[1:2], CLASSES[1:2], VOC, SEEDS[1:2], steps=STEPS, height=64, width=64)
    assert int((full.images[1].int() - alone.images[0].int()).abs().max()) <= 1
    ca, cb = full.class_attention[1], alone.class_attention[0]
    torch.testing.assert_close(ca, cb, rtol=1e-4, atol=1e-5 * float(cb.abs().max()))
    fa, fb = full.features[1], alone.features[0]
    assert float((fa - fb).abs().max()) < 1e-3 * float(fb.abs().max())


# --- processors on a single Attention layer ------------------------------------------------------


class _NoLayers:
    attn_processors = {}


def test_class_processor_masks_padding_and_accumulates():
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
        hidden = torch.randn(4, 16, 16, generator=gen)  # 2B = 4 (B = 2), 4x4 pixels
        prompt = torch.randn(4, 5, 8, generator=gen)
        emb = torch.randn(2, 6, 8, generator=gen)
        emb[0, 3:] = 100.0  # padding of image 0: must not matter
        mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
        cap = AttentionCapture(_NoLayers(), emb, mask, num_steps=2, latent_hw=(4, 4))
        proc = ClassAttentionProcessor(cap, "layer")
        out = proc(attn, hidden, prompt)
        torch.testing.assert_close(out, AttnProcessor2_0()(attn, hidden, prompt), rtol=0, atol=0)
        maps = cap.class_maps["layer"].clone()  # (B, T, 4, 4)
        assert maps.shape == (2, 6, 4, 4)
        torch.testing.assert_close(maps.sum(1), torch.full((2, 4, 4), 2.0))  # softmax per head sums to 1; 2 heads
        assert torch.equal(maps[0, 3:], torch.zeros(3, 4, 4))
        alone = AttentionCapture(_NoLayers(), emb[:1, :3], mask[:1, :3], num_steps=2, latent_hw=(4, 4))
        ClassAttentionProcessor(alone, "layer")(attn, hidden[[0, 2]], prompt[[0, 2]])
        torch.testing.assert_close(alone.class_maps["layer"][0], maps[0, :3], rtol=1e-5, atol=1e-6)
        proc(attn, hidden, prompt)  # a second step adds up
        torch.testing.assert_close(cap.class_maps["layer"], 2 * maps)
        with pytest.raises(RuntimeError, match="UNet batch of 2 \\* 2"):
            proc(attn, hidden[:2], prompt[:2])


def test_head_processor_last_step_only():
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        attn = Attention(query_dim=16, heads=2, dim_head=8)
        hidden = torch.randn(4, 64, 16, generator=gen)  # 2B = 4, 8x8 pixels
        cap = AttentionCapture(_NoLayers(), torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.bool),
                               num_steps=2, latent_hw=(16, 16))
        proc = HeadFeatureProcessor(cap, "layer")
        out = proc(attn, hidden)
        torch.testing.assert_close(out, AttnProcessor2_0()(attn, hidden), rtol=0, atol=0)
        assert cap.head_features == {}
        cap.on_step_end(None, 0, None, {})
        proc(attn, hidden)
        got = cap.head_features["layer"]
        q, k, v = (m(hidden).view(4, 64, 2, 8).transpose(1, 2) for m in (attn.to_q, attn.to_k, attn.to_v))
        per_head = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v  # (2B, heads, N, d)
        x = torch.stack([torch.cat([per_head[i], per_head[2 + i]]) for i in range(2)])  # (B, 2*heads, N, d)
        torch.testing.assert_close(got, headwise_features(x, 16), rtol=1e-4, atol=1e-4)
        assert got.shape == (2, 12, 16, 16)


def test_assemble_class_attention_value():
    ones = torch.ones(1, 2, 2, 2)  # (B, T, h_l, w_l)
    out = assemble_class_attention([ones, ones], torch.tensor([[0, 3]]), 4, (4, 4), (32, 32))
    assert out.shape == (1, 4, 4, 4)
    assert torch.equal(out[0, 0], torch.full((4, 4), 128.0)) and torch.equal(out[0, 3], torch.full((4, 4), 128.0))
    assert torch.equal(out[0, 1:3], torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="multiple of `grid_hw`"):
        assemble_class_attention([ones], torch.tensor([[0, 3]]), 4, (4, 4), (30, 30))


def test_generate_with_capture_exceptions(pipe):
    args = (pipe, PROMPTS[:1], CLASSES[:1], VOC, SEEDS[:1])
    with pytest.raises(ValueError, match="`guidance` has to be greater than 1"):
        generate_with_capture(*args, steps=1, guidance=1.0, height=64, width=64)
    with pytest.raises(ValueError, match="`height` and `width` have to be equal .* 64 and 128"):
        generate_with_capture(*args, steps=1, height=64, width=128)
    with pytest.raises(ValueError, match="same length but have 1, 1 and 2"):
        generate_with_capture(pipe, PROMPTS[:1], CLASSES[:1], VOC, SEEDS[:2], steps=1, height=64, width=64)
    with pytest.raises(ValueError, match="'unicorn' is not in label set"):
        generate_with_capture(pipe, PROMPTS[:1], [["unicorn"]], VOC, SEEDS[:1], steps=1, height=64, width=64)


# --- (f) the loader ------------------------------------------------------------------------------


def test_load_pipeline_errors(tmp_path):
    hint = "pass --model PATH to a local diffusers Stable Diffusion folder, or --model tiny for the offline test model"
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(missing)
    assert str(info.value) == f"model {missing!r} could not be loaded (no such folder): {hint}"
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(str(tmp_path))  # a folder, but no model_index.json
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"model {str(tmp_path)!r} could not be loaded (") and msg.endswith(hint)
    with pytest.raises(ValueError, match="`name_or_path` has to be a non-empty string"):
        load_pipeline("")


def test_load_pipeline_tiny_and_local_folder(tmp_path):
    tiny = load_pipeline("tiny")
    assert type(tiny.unet.attn_processors[self_attention_layers(tiny.unet)[0]]).__name__ == "AttnProcessor2_0"
    tiny.save_pretrained(tmp_path / "sd")
    again = load_pipeline(str(tmp_path / "sd"))
    a, b = tiny.unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer("a pot plant")["input_ids"] == tiny.tokenizer("a pot plant")["input_ids"]
