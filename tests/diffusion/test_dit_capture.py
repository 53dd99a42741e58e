"""Joint-attention capture on the tiny SD3 and FLUX pipelines: unchanged images, class maps and
per-head outputs equal to a float64 recomputation of the documented definitions from the
blocks' stored inputs, features equal to a float64 SVD, batch invariance."""
import pytest
import torch

from pccfast.core.config import PCCConfig
from pccfast.core.labeller import label_images
from pccfast.diffusion.dit_generation import dit_halves, generate_with_capture_dit
from pccfast.diffusion.dit_text import encode_dit_class_texts
from pccfast.diffusion.joint_capture import (
    JointAttentionCapture, default_feature_blocks, dit_blocks, parse_feature_blocks)
from pccfast.diffusion.tiny_dit import build_tiny_dit_pipeline

PROMPTS = ["a cat on a sofa", "a pot plant next to a motorbike", "an airplane", "a dog and a dog"]
CLASSES = [["cat", "sofa"], ["pottedplant", "motorbike"], ["aeroplane"], ["dog", "dog"]]
SEEDS = [11, 12, 13, 14]
STEPS = 2
SIZE = 128  # image-token grid 8x8
EXACT = PCCConfig(pca_method="eigh")
MODELS = ["tiny-sd3", "tiny-flux", "tiny-flux-schnell"]
GUIDANCE = {"tiny-sd3": 4.0, "tiny-flux": 3.5, "tiny-flux-schnell": 0.0}


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param, build_tiny_dit_pipeline(request.param)


def _pipe_call(pipe, name, prompts, seeds, **kw):
    return pipe(list(prompts), height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE[name],
                generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt", **kw).images


# --- float64 reference of the documented definitions ------------------------------------------


def _lin(lin, x):
    y = x @ lin.weight.double().T
    return y + lin.bias.double() if lin.bias is not None else y


def _rms(norm, x):
    if norm is None:
        return x
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * norm.weight.double() if getattr(norm, "weight", None) is not None else y


def _ln(x, eps):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def _rope(x, cos, sin):
    """x (B, L, H, d) with FLUX's interleaved pairs; cos, sin (L, d)."""
    real, imag = x[..., 0::2], x[..., 1::2]
    rot = torch.stack([-imag, real], dim=-1).flatten(-2)
    return x * cos.double()[None, :, None] + rot * sin.double()[None, :, None]


def _heads(x, heads):
    return x.view(x.shape[0], x.shape[1], heads, -1)  # (B, L, H, d)


def ref_joint(kind, attn, h, c, rot, n_image):
    """Image queries and per-head image outputs (B, H, N, d) float64 of one joint attention."""
    H = attn.heads
    q, k, v = (_heads(_lin(p, h.double()), H) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = _rms(attn.norm_q, q), _rms(attn.norm_k, k)
    if c is not None:
        cq, ck, cv = (_heads(_lin(p, c.double()), H) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        cq, ck = _rms(attn.norm_added_q, cq), _rms(attn.norm_added_k, ck)
        order = (lambda a, b: torch.cat([a, b], 1)) if kind == "sd3" else (lambda a, b: torch.cat([b, a], 1))
        q, k, v = order(q, cq), order(k, ck), order(v, cv)
    if rot is not None:
        q, k = _rope(q, *rot), _rope(k, *rot)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
    probs = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)
    out = probs @ v
    rows = slice(0, n_image) if kind == "sd3" else slice(q.shape[2] - n_image, None)
    return q[:, :, rows], out[:, :, rows]


def ref_keys(kind, block, attn, embeds, temb, rot):
    """Class keys (B, H, T, d) float64 of the module docstring's definition."""
    e, t = embeds.double(), torch.nn.functional.silu(temb.double())
    if kind == "sd3" and block.context_pre_only:
        scale, shift = _lin(block.norm1_context.linear, t).chunk(2, dim=1)
        x = _ln(e, block.norm1_context.norm.eps) * (1 + scale[:, None]) + shift[:, None]
    else:
        norm = block.norm if kind == "flux-single" else block.norm1_context
        shift, scale = _lin(norm.linear, t).chunk(3 if kind == "flux-single" else 6, dim=1)[:2]
        x = _ln(e, norm.norm.eps) * (1 + scale[:, None]) + shift[:, None]
    if kind == "flux-single":
        k = _rms(attn.norm_k, _heads(_lin(attn.to_k, x), attn.heads))
    else:
        k = _rms(attn.norm_added_k, _heads(_lin(attn.add_k_proj, x), attn.heads))
    if rot is not None:
        cos, sin = rot
        k = _rope(k, cos[:1].expand(k.shape[1], -1), sin[:1].expand(k.shape[1], -1))
    return k.transpose(1, 2)


class _Recorder:
    """Forward pre-hooks that store every call's temb and the chosen blocks' attention inputs."""

    def __init__(self, transformer, blocks):
        self.calls, self.handles = [], []
        self.handles.append(transformer.transformer_blocks[0].register_forward_pre_hook(self._temb, with_kwargs=True))
        for name in blocks:
            group, idx = name.split(".")
            attn = getattr(transformer, group)[int(idx)].attn
            self.handles.append(attn.register_forward_pre_hook(self._attn(name), with_kwargs=True))

    def _temb(self, module, args, kwargs):
        self.calls.append({"temb": kwargs["temb"].detach().clone()})

    def _attn(self, name):
        def hook(module, args, kwargs):
            c = kwargs.get("encoder_hidden_states")
            self.calls[-1][name] = (kwargs["hidden_states"].detach().clone(), None if c is None else c.detach().clone(),
                                    kwargs.get("image_rotary_emb"))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class _KeepHeads(JointAttentionCapture):
    """Keeps a copy of the last call's per-head image outputs before the PCA reduces them."""

    def reduce_block(self, name, per_head):
        self.kept = getattr(self, "kept", {})
        self.kept[name] = per_head.detach().clone()
        super().reduce_block(name, per_head)


@pytest.fixture(scope="module")
def recorded(model):
    name, pipe = model
    blocks = dit_blocks(pipe.transformer)  # every block: dual- and single-stream
    embeds, mask, tok = encode_dit_class_texts(pipe, CLASSES, "voc")
    halves = dit_halves(pipe, GUIDANCE[name])
    cap = _KeepHeads(pipe.transformer, embeds, mask, STEPS, (SIZE // 16, SIZE // 16), halves, blocks, EXACT)
    rec = _Recorder(pipe.transformer, blocks)
    try:
        with cap:
            images = _pipe_call(pipe, name, PROMPTS, SEEDS, callback_on_step_end=cap.on_step_end)
    finally:
        rec.remove()
    return dict(name=name, pipe=pipe, cap=cap, rec=rec, images=images, embeds=embeds, mask=mask, blocks=blocks,
                halves=halves)


# --- tests -------------------------------------------------------------------------------------


def test_images_equal_default_processors(recorded):
    r = recorded
    plain = _pipe_call(r["pipe"], r["name"], PROMPTS, SEEDS)
    assert (r["images"] - plain).abs().max() <= 1e-5
    # the processors are restored afterwards
    assert not any(type(p).__name__ == "JointCaptureProcessor" for p in r["pipe"].transformer.attn_processors.values())


def test_class_maps_equal_float64_definition(recorded):
    r = recorded
    cap, tr, b = r["cap"], r["pipe"].transformer, len(PROMPTS)
    assert len(r["rec"].calls) == STEPS
    grid = SIZE // 16
    for name in r["blocks"]:
        group, idx = name.split(".")
        block = getattr(tr, group)[int(idx)]
        kind = "sd3" if r["name"] == "tiny-sd3" else ("flux-single" if group.startswith("single") else "flux")
        acc = 0
        for call in r["rec"].calls:
            h, c, rot = call[name]
            q, _ = ref_joint(kind, block.attn, h, c, rot, grid * grid)
            k = ref_keys(kind, block, block.attn, r["embeds"], call["temb"][:b], rot)
            s = (q[:b] @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # (B, H, N, T)
            s = s.masked_fill(~r["mask"][:, None, None, :], float("-inf"))
            acc = acc + s.softmax(-1).sum(1)  # (B, N, T)
        ref = acc.transpose(1, 2).reshape(b, -1, grid, grid)
        got = cap.class_maps[name].double()
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), name
        # padding tokens get nothing; real tokens' probabilities sum to heads * calls per pixel
        assert got.masked_select(~r["mask"][:, :, None, None].expand_as(got)).abs().max() == 0
        heads = block.attn.heads
        assert torch.allclose(got.sum(1), torch.full_like(got.sum(1), heads * STEPS), rtol=1e-5)


def test_per_head_outputs_equal_float64_attention(recorded):
    r = recorded
    tr, grid = r["pipe"].transformer, SIZE // 16
    last = r["rec"].calls[-1]
    for name in r["blocks"]:
        group, idx = name.split(".")
        block = getattr(tr, group)[int(idx)]
        kind = "sd3" if r["name"] == "tiny-sd3" else ("flux-single" if group.startswith("single") else "flux")
        h, c, rot = last[name]
        _, ref = ref_joint(kind, block.attn, h, c, rot, grid * grid)
        got = r["cap"].kept[name].double()
        assert got.shape == ref.shape == (r["halves"] * len(PROMPTS), block.attn.heads, grid * grid, got.shape[-1])
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), name


def test_features_equal_float64_svd(recorded):
    r = recorded
    feats, grid, c = r["cap"].features(), SIZE // 16, 3
    b, halves = len(PROMPTS), r["halves"]
    offset = 0
    for name in r["blocks"]:
        x = r["cap"].kept[name].double()  # (halves*B, heads, N, d)
        heads = x.shape[1]
        x = x.view(halves, b, heads, *x.shape[2:]).transpose(0, 1).reshape(b, halves * heads, *x.shape[2:])
        xc = x - x.mean(dim=2, keepdim=True)
        _, _, vh = torch.linalg.svd(xc, full_matrices=False)  # (B, hh, d, d)
        comps = vh[..., :c, :]  # (B, hh, c, d)
        idx = comps.abs().argmax(-1, keepdim=True)
        comps = comps * torch.sign(torch.gather(comps, -1, idx))
        proj = xc @ comps.transpose(-1, -2)  # (B, hh, N, c)
        ref = proj.permute(0, 1, 3, 2).reshape(b, halves * heads * c, grid, grid)
        got = feats[:, offset: offset + halves * heads * c].double()
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), name
        offset += halves * heads * c
    assert offset == feats.shape[1]


def test_guidance_halves(model):
    name, pipe = model
    assert dit_halves(pipe, GUIDANCE[name]) == (2 if name == "tiny-sd3" else 1)
    assert dit_halves(pipe, 1.0) == 1


@pytest.mark.parametrize("name", MODELS)
def test_batch_1_and_4_same_images_and_blocky_masks(name):
    pipe = build_tiny_dit_pipeline(name)
    kw = dict(steps=STEPS, guidance=GUIDANCE[name], height=SIZE, width=SIZE)
    full = generate_with_capture_dit(pipe, PROMPTS, CLASSES, "voc", SEEDS, **kw)
    res = label_images(full.features, full.class_attention, full.images, PCCConfig())
    for i in range(len(PROMPTS)):
        one = generate_with_capture_dit(pipe, PROMPTS[i:i + 1], CLASSES[i:i + 1], "voc", SEEDS[i:i + 1], **kw)
        assert (one.images[0].int() - full.images[i].int()).abs().max() <= 1
        assert torch.allclose(one.class_attention[0], full.class_attention[i], rtol=1e-4, atol=1e-3)
        one_res = label_images(one.features, one.class_attention, one.images, PCCConfig())
        assert torch.equal(one_res.blocky[0], res.blocky[i])


def test_feature_block_choice(model):
    _, pipe = model
    tr = pipe.transformer
    n = len(tr.transformer_blocks)
    assert default_feature_blocks(tr) == [f"transformer_blocks.{i}" for i in range(n // 2, n)]
    assert parse_feature_blocks(None, tr) == parse_feature_blocks("default", tr)
    assert parse_feature_blocks("all", tr) == dit_blocks(tr)
    assert parse_feature_blocks("1,0", tr) == ["transformer_blocks.0", "transformer_blocks.1"]
    assert parse_feature_blocks(f"0-{len(dit_blocks(tr)) - 1}", tr) == dit_blocks(tr)
    with pytest.raises(ValueError, match="`feature_blocks` has to name blocks .* but holds '99'"):
        parse_feature_blocks("99", tr)
    with pytest.raises(ValueError, match="but holds 'x'"):
        parse_feature_blocks("0,x", tr)


def test_features_shape_and_default_blocks():
    pipe = build_tiny_dit_pipeline("tiny-flux")
    out = generate_with_capture_dit(pipe, PROMPTS[:1], CLASSES[:1], "voc", SEEDS[:1], steps=1, guidance=3.5,
                                    height=SIZE, width=SIZE)
    heads = pipe.transformer.config.num_attention_heads
    assert out.features.shape == (1, 3 * heads * len(default_feature_blocks(pipe.transformer)), SIZE // 16, SIZE // 16)
    assert out.class_attention.shape == (1, 21, SIZE // 16, SIZE // 16)
    assert out.class_attention[0, 0].abs().sum() > 0 and out.class_attention[0, 8].abs().sum() > 0  # background, cat
    assert out.class_attention[0, 12].abs().sum() == 0  # dog is not in the image


def test_exceptions():
    pipe = build_tiny_dit_pipeline("tiny-flux-schnell")
    with pytest.raises(ValueError, match="`height` and `width` have to be positive multiples of 16 but are 120 and 120"):
        generate_with_capture_dit(pipe, PROMPTS[:1], CLASSES[:1], "voc", SEEDS[:1], steps=1, height=120, width=120)
    with pytest.raises(ValueError, match="same length"):
        generate_with_capture_dit(pipe, PROMPTS[:2], CLASSES[:1], "voc", SEEDS[:1], steps=1, height=SIZE, width=SIZE)


def test_capture_memory_flat_in_steps():
    pipe = build_tiny_dit_pipeline("tiny-sd3")
    embeds, mask, _ = encode_dit_class_texts(pipe, CLASSES[:2], "voc")
    sizes = []
    for steps in (1, 3):
        cap = JointAttentionCapture(pipe.transformer, embeds, mask, steps, (SIZE // 16, SIZE // 16), 2,
                                    dit_blocks(pipe.transformer))
        with cap:
            pipe(PROMPTS[:2], height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=4.0,
                 generator=[torch.Generator().manual_seed(s) for s in SEEDS[:2]], output_type="latent",
                 callback_on_step_end=cap.on_step_end)
        held = list(cap.class_maps.values()) + list(cap.head_features.values())
        sizes.append(sum(t.numel() * t.element_size() for t in held))
        assert len(cap.head_features) == len(dit_blocks(pipe.transformer))
    assert sizes[0] == sizes[1] > 0


def test_sd3_negative_prompt_is_the_unconditional_half():
    """SD3 with guidance: the images equal StableDiffusion3Pipeline's own with the same negative
    prompts (per prompt), and differ from the empty negative prompt's; the class maps (from the
    unconditional half) change with it too."""
    name, pipe = "tiny-sd3", build_tiny_dit_pipeline("tiny-sd3")
    negative = ["blurry, low quality", "a dog"]
    kw = dict(steps=STEPS, guidance=GUIDANCE[name], height=SIZE, width=SIZE)
    got = generate_with_capture_dit(pipe, PROMPTS[:2], CLASSES[:2], "voc", SEEDS[:2], negative_prompt=negative, **kw)
    own = _pipe_call(pipe, name, PROMPTS[:2], SEEDS[:2], negative_prompt=negative)
    plain = generate_with_capture_dit(pipe, PROMPTS[:2], CLASSES[:2], "voc", SEEDS[:2], **kw)
    own_u8 = (own * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(got.images, own_u8)
    embeds, mask, _ = encode_dit_class_texts(pipe, CLASSES[:2], "voc")
    cap = JointAttentionCapture(pipe.transformer, embeds, mask, STEPS, (SIZE // 16, SIZE // 16), 2,
                                default_feature_blocks(pipe.transformer))
    with cap:  # the float images under the capture: the pipeline's own to 1e-5
        captured = _pipe_call(pipe, name, PROMPTS[:2], SEEDS[:2], negative_prompt=negative,
                              callback_on_step_end=cap.on_step_end)
    assert (captured - own).abs().max() <= 1e-5
    assert (got.images.int() - plain.images.int()).abs().max() > 8
    assert not torch.allclose(got.class_attention, plain.class_attention, atol=1e-4)
    one = generate_with_capture_dit(pipe, PROMPTS[:2], CLASSES[:2], "voc", SEEDS[:2], negative_prompt="a dog", **kw)
    both = generate_with_capture_dit(pipe, PROMPTS[:2], CLASSES[:2], "voc", SEEDS[:2], negative_prompt=["a dog"] * 2, **kw)
    assert torch.equal(one.images, both.images)
    with pytest.raises(ValueError, match="`negative_prompt` has to be a text or 2 texts"):
        generate_with_capture_dit(pipe, PROMPTS[:2], CLASSES[:2], "voc", SEEDS[:2], negative_prompt=["x"], **kw)


def test_flux_refuses_a_negative_prompt():
    pipe = build_tiny_dit_pipeline("tiny-flux")
    with pytest.raises(ValueError, match="`negative_prompt` is the text of the unconditional half, which a flux model"):
        generate_with_capture_dit(pipe, PROMPTS[:1], CLASSES[:1], "voc", SEEDS[:1], steps=1, guidance=3.5,
                                  height=SIZE, width=SIZE, negative_prompt="blurry")
