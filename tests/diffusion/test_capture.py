"""Attention capture on the tiny pipeline: unchanged images, class maps and head-wise features
equal to the reference's slow offline computation, batch invariance, the class-attention
assembly, and generate_with_capture's argument checks."""
import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import pccfast
import pccfast.diffusion
from pccfast.core.config import PCCConfig
from pccfast.data.labelsets import get_label_set
from pccfast.diffusion.capture import AttentionCapture, assemble_class_attention
from pccfast.diffusion.generation import CaptureOutput, generate_with_capture
from pccfast.diffusion.layers import cross_attention_layers, self_attention_layers
from pccfast.diffusion.processors import ClassAttentionProcessor, HeadFeatureProcessor
from pccfast.diffusion.tokens import class_text, tokens_to_classes

VOC = get_label_set("voc")
PROMPTS = ["a cat on a sofa", "a pot plant next to a motorbike", "a dog and a dog"]
CLASSES = [["cat", "sofa"], ["pottedplant", "motorbike"], ["dog", "dog"]]
SEEDS = [11, 12, 13]
STEPS = 2  # PNDM makes 3 UNet calls
SIZE = 128  # latent 16: up-block attention at 4x4, 8x8, 16x16
EXACT = PCCConfig(pca_method="eigh")


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _run(pipe, prompts, seeds, size=SIZE, steps=STEPS, **kw):
    return pipe(list(prompts), height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                generator=_generators(seeds), output_type="pt", **kw).images


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


def _with_processors(pipe, processor, fn):
    saved = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(processor)
    try:
        return fn()
    finally:
        pipe.unet.set_attn_processor(saved)


def test_capture_leaves_images_unchanged(pipe, online, recorded):
    """The capture processors compute every attention output as diffusers' AttnProcessor2_0
    does: the images are bit-identical to a run with diffusers' own processors."""
    plain = _with_processors(pipe, AttnProcessor2_0(), lambda: _run(pipe, PROMPTS, SEEDS))
    classic = _with_processors(pipe, AttnProcessor(), lambda: _run(pipe, PROMPTS, SEEDS))  # no SDPA
    torch.testing.assert_close(classic, plain, rtol=0, atol=1e-5)  # the images do not hinge on rounding
    before = dict(pipe.unet.attn_processors)
    with torch.no_grad():
        emb = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    cap = AttentionCapture(pipe.unet, emb, torch.ones(3, 4, dtype=torch.bool), STEPS + 1, (SIZE // 8, SIZE // 8), EXACT)
    with cap:
        installed = pipe.unet.attn_processors
        assert all(isinstance(installed[n], HeadFeatureProcessor) for n in cap.self_layers)
        assert all(isinstance(installed[n], ClassAttentionProcessor) for n in cap.cross_layers)
        captured = _run(pipe, PROMPTS, SEEDS, callback_on_step_end=cap.on_step_end)
    assert cap.step == STEPS + 1 and len(cap.head_features) == 9 and len(cap.class_maps) == 15
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the same objects back
    assert torch.equal(captured, plain)
    # generate_with_capture's uint8 images are the plain images rounded
    assert torch.equal(online.images, (plain * 255).round().clamp(0, 255).to(torch.uint8))
    assert torch.equal(recorded[1], plain)


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


# --- assembly and arguments ------------------------------------------------------------------


def test_assemble_class_attention_value():
    ones = torch.ones(1, 2, 2, 2)  # (B, T, h_l, w_l)
    out = assemble_class_attention([ones, ones], torch.tensor([[0, 3]]), 4, (4, 4), (32, 32))
    assert out.shape == (1, 4, 4, 4)
    assert torch.equal(out[0, 0], torch.full((4, 4), 128.0)) and torch.equal(out[0, 3], torch.full((4, 4), 128.0))
    assert torch.equal(out[0, 1:3], torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="multiple of `grid_hw`"):
        assemble_class_attention([ones], torch.tensor([[0, 3]]), 4, (4, 4), (30, 30))


def test_assemble_class_attention_bilinear_bit_identical():
    """Regression: the class-attention assembly resamples through core.resize, which has to give
    exactly the reference's F.interpolate(bilinear, align_corners=False), to the bit."""
    generator = torch.Generator().manual_seed(3)
    maps = [torch.rand(2, 5, s, s, generator=generator) * 7 for s in (4, 8, 16, 16)]  # (B, T, h_l, w_l)
    classes = torch.tensor([[0, 3, 3, 1, -1], [0, 2, -1, -1, -1]])
    got = assemble_class_attention(maps, classes, 4, (16, 16), (128, 128))
    acc = sum(F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False) for m in maps)
    up = F.interpolate(acc, size=(128, 128), mode="bilinear", align_corners=False)  # (B, T, 128, 128)
    pooled = up.view(2, 5, 16, 8, 16, 8).sum(dim=(3, 5))  # (B, T, 16, 16)
    assert torch.equal(got, tokens_to_classes(pooled, classes, 4))  # tokens_to_classes: tested in test_tokens


def test_public_names():
    assert pccfast.generate_with_capture is generate_with_capture
    assert pccfast.diffusion.generate_with_capture is generate_with_capture
    assert pccfast.diffusion.CaptureOutput is CaptureOutput
    assert pccfast.diffusion.AttentionCapture is AttentionCapture
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pccfast.diffusion.nothing


def test_generate_with_capture_exceptions(pipe):
    args = (pipe, PROMPTS[:1], CLASSES[:1], VOC, SEEDS[:1])
    with pytest.raises(ValueError, match="`guidance` has to be at least 0 but is -1.0"):
        generate_with_capture(*args, steps=1, guidance=-1.0, height=64, width=64)
    with pytest.raises(ValueError, match="`height` and `width` have to be positive multiples of 8 for a sd model .* 64 and 100"):
        generate_with_capture(*args, steps=1, height=64, width=100)
    with pytest.raises(ValueError, match="`scheduler` has to be one of ddim, .* but is 'foo'"):
        generate_with_capture(*args, steps=1, height=64, width=64, scheduler="foo")
    with pytest.raises(ValueError, match="`negative_prompt` has to be a text or 1 texts"):
        generate_with_capture(*args, steps=1, height=64, width=64, negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="same length but have 1, 1 and 2"):
        generate_with_capture(pipe, PROMPTS[:1], CLASSES[:1], VOC, SEEDS[:2], steps=1, height=64, width=64)
    with pytest.raises(ValueError, match="'unicorn' is not in label set"):
        generate_with_capture(pipe, PROMPTS[:1], [["unicorn"]], VOC, SEEDS[:1], steps=1, height=64, width=64)


def test_recording_processors_installed_for_the_last_step_only(pipe):
    """The step counter stays outside the UNet (a compiled UNet would recompile on it): the
    callback swaps in recording attn1 processors before the last call; the attn2 ones stay."""
    emb = torch.zeros(3, 4, 32)
    cap = AttentionCapture(pipe.unet, emb, torch.ones(3, 4, dtype=torch.bool), 3, (8, 8))
    with cap:
        first = pipe.unet.attn_processors
        cap.on_step_end(pipe, 0, None, {})
        assert pipe.unet.attn_processors == first
        cap.on_step_end(pipe, 1, None, {})  # the next call is the last
        last = pipe.unet.attn_processors
        assert all(not first[n].record and last[n].record for n in cap.self_layers)
        assert all(last[n] is first[n] for n in cap.cross_layers)
    one = AttentionCapture(pipe.unet, emb, torch.ones(3, 4, dtype=torch.bool), 1, (8, 8))
    with one:
        assert all(pipe.unet.attn_processors[n].record for n in one.self_layers)
