"""Dataset Diffusion's capture on the tiny pipeline: unchanged images, affinity and class maps
equal to a float64 recomputation from the recorded hidden states, the steps window, head
chunking, buffers that do not grow with the steps, batch invariance, the class prompt."""
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from pccfast.core.dd import DDConfig, dd_masks
from pccfast.data.labelsets import get_label_set
from pccfast.diffusion.dd_capture import (
    DDCapture, DDFeatureProcessor, DDSelfAttentionProcessor, append_classes, dd_class_names, encode_dd_class_prompt,
)
from pccfast.diffusion.generation import generate_with_capture
from pccfast.diffusion.tokens import DROP

VOC = get_label_set("voc")
PROMPTS = ["a cat on a sofa", "a pot plant next to a motorbike", "a dog and a dog"]
CLASSES = [["cat", "sofa"], ["pottedplant", "motorbike"], ["dog", "dog"]]
SEEDS = [11, 12, 13]
STEPS = 2  # PNDM: 3 UNet calls
SIZE = 128  # latent 16: half grid 8x8, quarter grid 4x4


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _run(pipe, prompts, seeds, **kw):
    return pipe(list(prompts), height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
                generator=_generators(seeds), output_type="pt", **kw).images


class _Recorder:
    """Per UNet call, the conditional half's hidden states of every attention layer (float64)."""

    def __init__(self, batch):
        self.batch = batch
        self.calls = defaultdict(list)  # name -> [(B, N, C) hidden states, one per UNet call]

    def processor(self, name):
        rec = self

        class P:
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                         *args, **kwargs):
                rec.calls[name].append(hidden_states[rec.batch:].double())
                return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        return P()


@pytest.fixture(scope="module")
def recorded(tiny_pipe):
    rec = _Recorder(len(PROMPTS))
    saved = dict(tiny_pipe.unet.attn_processors)
    tiny_pipe.unet.set_attn_processor({n: rec.processor(n) for n in saved})
    try:
        images = _run(tiny_pipe, PROMPTS, SEEDS)
    finally:
        tiny_pipe.unet.set_attn_processor(saved)
    return rec, images


def _modules(unet):
    return {name + ".processor": m for name, m in unet.named_modules() if hasattr(m, "to_q")}


def _expected(pipe, rec, cfg, num_calls):
    """Affinity (B, N2, N2) and per-class maps (B, K, 4, 4) recomputed in float64 from the
    recorded hidden states: per layer at the half / quarter grid and UNet call in the window,
    softmax(Q K^T * scale) averaged over heads; then averaged over layers and calls."""
    first, stop = cfg.step_window(num_calls)
    mods = _modules(pipe.unet)
    prompt = encode_dd_class_prompt(pipe, CLASSES, VOC)
    ctx = prompt.embeds.double()  # (B, T, C)
    aff, n_aff, cls, n_cls = 0, 0, 0, 0
    for name, calls in rec.calls.items():
        attn = mods[name]
        heads = attn.heads
        for i, h in enumerate(calls):
            if not first <= i < stop:
                continue
            q = F.linear(h, attn.to_q.weight.double())  # (B, N, inner)
            b, n, inner = q.shape
            q = q.view(b, n, heads, -1).transpose(1, 2)  # (B, heads, N, d)
            if ".attn1." in name and n == 64:
                k = F.linear(h, attn.to_k.weight.double()).view(b, n, heads, -1).transpose(1, 2)
                aff = aff + torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(1)
                n_aff += 1
            elif ".attn2." in name and n == 16:
                k = F.linear(ctx, attn.to_k.weight.double()).view(b, ctx.shape[1], heads, -1).transpose(1, 2)
                cls = cls + torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(1)  # (B, N4, T)
                n_cls += 1
    aff, cls = aff / n_aff, cls / n_cls
    maps = torch.zeros(len(CLASSES), VOC.num_classes, 16, dtype=torch.float64)
    for b in range(len(CLASSES)):
        for c in set(prompt.token_classes[b].tolist()) - {DROP}:
            maps[b, c] = cls[b][:, prompt.token_classes[b] == c].mean(1)  # a class's tokens: their mean
    return aff, maps.reshape(len(CLASSES), -1, 4, 4), n_aff, n_cls


@pytest.mark.parametrize("cfg", [DDConfig(), DDConfig(step_start=0.5)])
def test_capture_equals_float64_recomputation(tiny_pipe, recorded, cfg):
    rec, plain = recorded
    out = generate_with_capture(tiny_pipe, PROMPTS, CLASSES, VOC, SEEDS, steps=STEPS, height=SIZE, width=SIZE, dd=cfg)
    want = (plain * 255).round().clamp(0, 255)
    torch.testing.assert_close(out.images.float(), want, rtol=0, atol=1)  # float rounding may move a level
    aff, maps, n_aff, n_cls = _expected(tiny_pipe, rec, cfg, STEPS + 1)
    calls = 3 if cfg.step_start == 0 else 1  # calls 0..2, or call 2 alone (ceil(0.5 * 3) = 2)
    assert n_aff == 5 * calls and n_cls == 5 * calls  # 8x8: down_blocks.1 (2) and up_blocks.2 (3); 4x4: down_blocks.2 (2), up_blocks.1 (3)
    assert out.dd_affinity.shape == (3, 64, 64) and out.dd_affinity.dtype == torch.float32
    torch.testing.assert_close(out.dd_affinity.double(), aff, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.dd_affinity.sum(-1), torch.ones(3, 64), rtol=0, atol=1e-5)  # probabilities
    assert out.dd_class_attention.shape == (3, VOC.num_classes, 4, 4)
    torch.testing.assert_close(out.dd_class_attention.double(), maps, rtol=0, atol=1e-5)
    present = out.dd_class_attention.sum((2, 3)) > 0
    want = torch.zeros_like(present)
    for b, names in enumerate(CLASSES):
        want[b, [VOC.index(c) for c in names]] = True
    assert torch.equal(present, want)  # the classes of the prompt, and no background map


def _captured_run(pipe, prompts, classes, seeds, chunk=None, watch=None, steps=STEPS):
    """One run with the PCC capture and the DD capture installed; float images, the DD capture."""
    from pccfast.diffusion.adapters import adapter_for
    from pccfast.diffusion.capture import AttentionCapture
    from pccfast.diffusion.tokens import encode_class_texts

    adapter = adapter_for(pipe)
    prompt = encode_dd_class_prompt(pipe, classes, VOC)
    dd = DDCapture(pipe.unet, prompt, VOC.num_classes, steps + 1, (16, 16), DDConfig(),
                   listened_layers=adapter.feature_layers(), chunk_elements=chunk)
    embeds, mask, _ = encode_class_texts(pipe, classes, VOC)
    cap = AttentionCapture(pipe.unet, embeds, mask, steps + 1, (16, 16), adapter=adapter,
                           listeners=(dd,) if watch is None else (dd, watch))
    with cap, dd:
        installed = pipe.unet.attn_processors
        assert all(isinstance(installed[n], DDSelfAttentionProcessor) for n in dd.own_layers)
        assert len(dd.own_layers) == 7  # down-block and mid attn1 (every size; only 8x8 counts)
        assert all(isinstance(installed[n], DDFeatureProcessor) for n in dd.listened_layers)  # up-block attn1
        images = pipe(list(prompts), height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=7.5,
                      generator=_generators(seeds), output_type="pt", callback_on_step_end=cap.on_step_end).images
    return images, dd, cap


def test_images_unchanged_against_diffusers_processors(tiny_pipe):
    """The DD processors compute the conditional half's output from the probabilities they add
    into the affinity (P @ V): the images are diffusers' AttnProcessor2_0 images to 1e-5, and
    every processor is restored afterwards (PCC's recording ones were installed for the last step)."""
    saved = dict(tiny_pipe.unet.attn_processors)
    tiny_pipe.unet.set_attn_processor(AttnProcessor2_0())
    try:
        plain = _run(tiny_pipe, PROMPTS[:2], SEEDS[:2])
    finally:
        tiny_pipe.unet.set_attn_processor(saved)
    before = dict(tiny_pipe.unet.attn_processors)
    images, dd, cap = _captured_run(tiny_pipe, PROMPTS[:2], CLASSES[:2], SEEDS[:2])
    torch.testing.assert_close(images, plain, rtol=0, atol=1e-5)
    assert cap.step == STEPS + 1 and len(cap.head_features) == 9  # PCC's last step recorded as before
    after = tiny_pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)  # every processor restored
    assert float(dd.affinity_count) == 5 * (STEPS + 1)


def test_chunking_over_heads_changes_nothing(tiny_pipe):
    """One head at a time (chunk_elements 1) gives the affinity and images of all heads at once."""
    one = _captured_run(tiny_pipe, PROMPTS, CLASSES, SEEDS, chunk=1)
    every = _captured_run(tiny_pipe, PROMPTS, CLASSES, SEEDS, chunk=1 << 30)
    torch.testing.assert_close(one[1].affinity(), every[1].affinity(), rtol=0, atol=1e-6)
    torch.testing.assert_close(one[0], every[0], rtol=0, atol=1e-6)


def test_buffers_do_not_grow_with_steps(tiny_pipe):
    """The capture holds one (B, N2, N2) and one (B, T, N4) float32 buffer whatever the steps:
    the same tensors (same storage) after every step, and the same bytes for 2 and 6 steps."""
    from pccfast.diffusion.adapters import adapter_for
    from pccfast.diffusion.capture import AttentionCapture
    from pccfast.diffusion.tokens import encode_class_texts

    held = {}
    for steps in (2, 6):
        prompt = encode_dd_class_prompt(tiny_pipe, CLASSES[:1], VOC)
        adapter = adapter_for(tiny_pipe)
        dd = DDCapture(tiny_pipe.unet, prompt, VOC.num_classes, steps + 1, (16, 16), DDConfig(),
                       listened_layers=adapter.feature_layers())
        embeds, mask, _ = encode_class_texts(tiny_pipe, CLASSES[:1], VOC)
        pointers = []

        class Watch:
            def on_step_end(self, capture, step):
                pointers.append((dd.affinity_sum.data_ptr(), dd.class_sum.data_ptr()))

        cap = AttentionCapture(tiny_pipe.unet, embeds, mask, steps + 1, (16, 16), adapter=adapter,
                               listeners=(dd, Watch()))
        with cap, dd:
            tiny_pipe(PROMPTS[:1], height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=7.5,
                      generator=_generators(SEEDS[:1]), output_type="pt", callback_on_step_end=cap.on_step_end)
        assert len(pointers) == steps + 1 and len(set(pointers)) == 1
        tensors = [v for v in vars(dd).values() if isinstance(v, torch.Tensor) and v is not prompt.embeds
                   and v is not prompt.token_classes]
        held[steps] = sum(t.numel() * t.element_size() for t in tensors)
    assert held[2] == held[6] == 4 * (64 * 64 + 77 * 16 + 2)


def test_batch_invariance(tiny_pipe):
    """Prompt i's image and DD tensors do not depend on the batch it is in (one generator per
    image, unlike Dataset Diffusion's shared generator), up to float rounding; its masks come
    from its own tensors alone.

    The tiny model's random attention is almost uniform, so its propagated maps vary by about
    1e-5 of their value over the image and min-max scaling turns float rounding (1e-8 here)
    into different masks: masks are compared on the same tensors, not across two runs."""
    full = generate_with_capture(tiny_pipe, PROMPTS, CLASSES, VOC, SEEDS, steps=STEPS, height=SIZE, width=SIZE,
                                 dd=DDConfig())
    present = torch.zeros(3, VOC.num_classes, dtype=torch.bool)
    for b, names in enumerate(CLASSES):
        present[b, [VOC.index(c) for c in names]] = True
    masks = dd_masks(full.dd_affinity, full.dd_class_attention, present, (SIZE, SIZE))
    for i in (0, 2):
        one = generate_with_capture(tiny_pipe, PROMPTS[i:i + 1], CLASSES[i:i + 1], VOC, SEEDS[i:i + 1], steps=STEPS,
                                    height=SIZE, width=SIZE, dd=DDConfig())
        torch.testing.assert_close(one.images.float(), full.images[i:i + 1].float(), rtol=0, atol=1)
        torch.testing.assert_close(one.dd_affinity, full.dd_affinity[i:i + 1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(one.dd_class_attention, full.dd_class_attention[i:i + 1], rtol=1e-5, atol=1e-7)
        alone = dd_masks(full.dd_affinity[i:i + 1], full.dd_class_attention[i:i + 1], present[i:i + 1], (SIZE, SIZE))
        assert torch.equal(alone[0], masks[i])


def test_class_prompt_and_names(tiny_pipe):
    assert dd_class_names(VOC)[VOC.index("pottedplant")] == "potted plant"
    assert dd_class_names(VOC)[VOC.index("tvmonitor")] == "tv monitor"
    assert dd_class_names(VOC)[VOC.index("diningtable")] == "dining table"
    assert append_classes("a black cat laying on the floor", ["cat"], VOC) == "a black cat laying on the floor; cat"
    assert append_classes("two", ["dog", "pottedplant", "dog"], VOC) == "two; dog potted plant"
    p = encode_dd_class_prompt(tiny_pipe, [["cat", "sofa"], ["pottedplant"], ["dog", "dog"]], VOC)
    assert p.texts == ["cat sofa", "potted plant", "dog"]
    assert p.embeds.shape == (3, 77, 32) and p.token_classes.shape == (3, 77)  # padded to max length
    tok = tiny_pipe.tokenizer
    n_plant = len(tok("potted plant", add_special_tokens=False)["input_ids"])
    row = p.token_classes[1].tolist()
    assert row[0] == DROP and row[1:1 + n_plant] == [VOC.index("pottedplant")] * n_plant
    assert set(row[1 + n_plant:]) == {DROP}
    ids = torch.full((1, 77), tok.pad_token_id)
    piece = [tok.bos_token_id] + tok("cat sofa", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids[0, :len(piece)] = torch.tensor(piece)
    with torch.no_grad():
        torch.testing.assert_close(p.embeds[0], tiny_pipe.text_encoder(ids)[0][0])


def test_exceptions(tiny_pipe):
    prompt = encode_dd_class_prompt(tiny_pipe, CLASSES, VOC)
    with pytest.raises(ValueError, match=r"`step_start` 0.9 and `step_end` 0.95 hold none of the 3 denoising calls"):
        DDCapture(tiny_pipe.unet, prompt, 21, 3, (16, 16), DDConfig(step_start=0.9, step_end=0.95))
    with pytest.raises(ValueError, match=r"`chunk_elements` has to be at least 1 but is 0"):
        DDCapture(tiny_pipe.unet, prompt, 21, 3, (16, 16), chunk_elements=0)
    dd = DDCapture(tiny_pipe.unet, prompt, 21, 3, (16, 16))
    with pytest.raises(RuntimeError, match=r"no self-attention layer at the half grid 8x8 was captured"):
        dd.affinity()


def test_other_families_refused_in_one_line(tiny_pipe):
    from pccfast.diffusion.adapters import StableDiffusionXLAdapter
    from pccfast.diffusion.dd_capture import dd_capture_for

    adapter = StableDiffusionXLAdapter(None, denoiser=tiny_pipe.unet)
    with pytest.raises(ValueError, match=r"needs a Stable Diffusion 1.x/2.x model but the model is of family 'sdxl'"):
        dd_capture_for(adapter, CLASSES, VOC, 3, (16, 16), DDConfig(), 2)
