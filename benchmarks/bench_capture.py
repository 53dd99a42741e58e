"""Cost of attention capture per denoising step, and capture memory against the number of steps.

Three ways to run the same UNet step (same inputs, same run):

* ``plain``: diffusers' ``AttnProcessor2_0`` everywhere (no capture);
* ``pccfast``: pccfast's fused capture processors (``pccfast.diffusion.capture.AttentionCapture``): class
  scores accumulated in place every step, head-wise PCA at the last step only;
* ``pccfast + Dataset Diffusion``: the same capture with Dataset Diffusion's listener and
  processors as well (``pccfast.diffusion.dd_capture.DDCapture``: the half-grid self-attention
  probabilities summed into one (N2, N2) buffer per image, the quarter-grid class-prompt
  scores), i.e. both labellers' inputs (``--labeler fused``);
* ``reference-style``: hooks the way the reference does it: every attention layer's
  probabilities recomputed explicitly (softmax(QK^T) materialised), the unconditional queries
  of every cross-attention and the per-head outputs of every up-block self-attention copied to
  the host at every step and kept in lists; class scores and PCA done afterwards.

The UNet is the tiny model's (SD 2.1 topology: same blocks, heads (5, 10, 20, 20), reduced
width) at 64x64 latents (a 512x512 image), batch 1 prompt (UNet batch 2, CFG).

    python benchmarks/bench_capture.py [--latent 64] [--steps 10] [--repeats 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from pccfast.core.pca import headwise_features
from pccfast.diffusion.capture import AttentionCapture
from pccfast.diffusion.layers import cross_attention_layers, self_attention_layers
from pccfast.diffusion.tiny import build_tiny_pipeline
from pccfast.testing.timing import sync


class _RefCross:
    """Reference-style attn2 hook: explicit attention, uncond query copied to the host each step."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        q = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        b, n, inner = q.shape
        h = attn.heads
        d = inner // h
        qh = q.view(b, n, h, d).transpose(1, 2)  # (2B, heads, N, d)
        kh = key.view(b, -1, h, d).transpose(1, 2)
        vh = v.view(b, -1, h, d).transpose(1, 2)
        probs = (qh @ kh.transpose(-1, -2) * attn.scale).softmax(-1)  # explicit (2B, heads, N, L)
        out = (probs @ vh).transpose(1, 2).reshape(b, n, inner)
        self.store.setdefault(self.name, []).append(q[: b // 2].detach().cpu().clone())  # host copy each step
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class _RefSelf:
    """Reference-style attn1 hook: explicit attention, per-head outputs to the host each step."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        q, key, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        b, n, inner = q.shape
        h = attn.heads
        d = inner // h
        qh, kh, vh = (t.view(b, n, h, d).transpose(1, 2) for t in (q, key, v))  # (2B, heads, N, d)
        probs = (qh @ kh.transpose(-1, -2) * attn.scale).softmax(-1)  # (2B, heads, N, N) materialised
        per_head = probs @ vh  # (2B, heads, N, d)
        self.store.setdefault(self.name, []).append(per_head.detach().cpu().clone())
        out = per_head.transpose(1, 2).reshape(b, n, inner)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = a 512x512 image; default %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of one timed run (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the median is reported")
    p.add_argument("--tokens", type=int, default=6, help="class-text tokens (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--memory-steps", default="2,5,10,20", help="step counts for the memory table")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.add_argument("--families", default="", help="instead, time the capture per UNet call of these tiny UNet "
                   "families against the plain UNet in the same run, comma-separated: tiny, tiny-sdxl, tiny-turbo, "
                   "tiny-lcm (default: none)")
    p.add_argument("--family-size", default="512x512", help="image HxW of the family tables (default %(default)s)")
    p.add_argument("--dit", default="", help="also (or with --dit-only, only) time the joint-attention capture per "
                   "transformer call of these DiT families, comma-separated: sd3, flux (default: none)")
    p.add_argument("--dit-only", action="store_true", help="skip the UNet tables (with --dit)")
    p.add_argument("--dit-size", type=int, default=512, help="image side of the DiT tables (image tokens (side/16)^2; "
                   "default %(default)s)")
    args = p.parse_args(argv)
    if args.families:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _bench_families(args, torch.device(args.device))
    if args.dit_only:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _bench_dit(args, torch.device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe = build_tiny_pipeline(seed=0, device=device)
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, args.latent, args.latent, generator=generator).to(device)  # (2B, 4, h, w), B = 1
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device)
    class_embeds = torch.randn(1, args.tokens, unet.config.cross_attention_dim, generator=generator).to(device)
    class_mask = torch.ones(1, args.tokens, dtype=torch.bool, device=device)
    ts = torch.linspace(999, 1, args.steps).long()

    def run_plain():
        for t in ts:
            unet(lat, t.to(device), encoder_hidden_states=ctx)

    def run_pccfast(steps=args.steps, total=None):
        # total > steps: the run stops before the last step (the steps every run has most of)
        cap = AttentionCapture(unet, class_embeds, class_mask, total or steps, (args.latent, args.latent))
        with cap:
            for i in range(steps):
                unet(lat, ts[i % len(ts)].to(device), encoder_hidden_states=ctx)
                cap.on_step_end(None, i, None, {})
        return cap

    dd_embeds = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).to(device)  # padded class prompt
    dd_classes = torch.full((1, 77), -1, dtype=torch.long)
    dd_classes[0, 1:args.tokens - 1] = torch.arange(1, args.tokens - 1)  # one token per class, SoT/EoT/padding dropped

    def run_both(steps=args.steps, total=None):
        from pccfast.core.dd import DDConfig
        from pccfast.diffusion.dd_capture import DDCapture, DDClassPrompt

        prompt = DDClassPrompt(dd_embeds, dd_classes.to(device), [""])
        dd = DDCapture(unet, prompt, 21, total or steps, (args.latent, args.latent), DDConfig(),
                       listened_layers=self_attention_layers(unet))
        cap = AttentionCapture(unet, class_embeds, class_mask, total or steps, (args.latent, args.latent),
                               listeners=(dd,))
        with cap, dd:
            for i in range(steps):
                unet(lat, ts[i % len(ts)].to(device), encoder_hidden_states=ctx)
                cap.on_step_end(None, i, None, {})
        return cap, dd

    def run_reference(steps=args.steps):
        store: dict = {}
        procs = dict(unet.attn_processors)
        for n in cross_attention_layers(unet):
            procs[n] = _RefCross(store, n)
        for n in self_attention_layers(unet):
            procs[n] = _RefSelf(store, n)
        saved = dict(unet.attn_processors)
        unet.set_attn_processor(procs)
        try:
            for i in range(steps):
                unet(lat, ts[i % len(ts)].to(device), encoder_hidden_states=ctx)
        finally:
            unet.set_attn_processor(saved)
        # afterwards, as the reference's second script: score every step's queries, PCA the last step
        grid = args.latent
        modules = dict(unet.named_modules())
        for n in cross_attention_layers(unet):
            attn = modules[n.rsplit(".", 1)[0]]  # "...attn2.processor" -> the Attention module
            key = attn.to_k(class_embeds)
            for q in store[n]:
                h = attn.heads
                d = q.shape[-1] // h
                qh = q.to(device).view(1, -1, h, d).transpose(1, 2)
                kh = key.view(1, -1, h, d).transpose(1, 2)
                (qh @ kh.transpose(-1, -2) * attn.scale).softmax(-1).sum(1)
        for n in self_attention_layers(unet):
            x = store[n][-1]  # (2, heads, N, d), unconditional half first
            x = x.reshape(1, -1, *x.shape[2:])  # (1, 2*heads, N, d)
            headwise_features(x.to(device), grid)
        return store

    variants = {
        "plain": run_plain,
        "pccfast (steps before the last)": lambda: run_pccfast(args.steps, args.steps + 1),
        "pccfast (whole run, last step included)": run_pccfast,
        "pccfast + Dataset Diffusion (steps before the last)": lambda: run_both(args.steps, args.steps + 1),
        "pccfast + Dataset Diffusion (whole run)": run_both,
        "reference-style": run_reference,
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():  # interleaved, so load changes hit all variants alike
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append((time.perf_counter() - t0) / args.steps)
        memory = {"steps": [], "pccfast": [], "pccfast + Dataset Diffusion": [], "reference-style": []}
        for s in [int(x) for x in args.memory_steps.split(",")]:
            cap = run_pccfast(s)
            ref = run_reference(s)
            memory["steps"].append(s)
            memory["pccfast"].append(_nbytes(cap.class_maps) + _nbytes(cap.head_features))
            both, dd = run_both(s)
            memory["pccfast + Dataset Diffusion"].append(
                _nbytes(both.class_maps) + _nbytes(both.head_features)
                + _nbytes([dd.affinity_sum, dd.affinity_count, dd.class_sum, dd.class_count]))
            memory["reference-style"].append(_nbytes(ref))
    med = {k: statistics.median(v) for k, v in times.items()}
    # the last step's extra cost (PCA), amortised over the reference's 80 steps
    mid = med["pccfast (steps before the last)"]
    last_extra = (med["pccfast (whole run, last step included)"] - mid) * args.steps
    med["pccfast (80-step run, projected)"] = mid + last_extra / 80
    mid_dd = med["pccfast + Dataset Diffusion (steps before the last)"]
    last_dd = (med["pccfast + Dataset Diffusion (whole run)"] - mid_dd) * args.steps
    med["pccfast + Dataset Diffusion (80-step run, projected)"] = mid_dd + last_dd / 80
    print(f"UNet: tiny SD 2.1 topology, latent {args.latent}x{args.latent}, {args.steps} steps, device {device}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| variant | s / step | ratio to plain |")
    print("| --- | --- | --- |")
    for k in med:
        print(f"| {k} | {med[k]:.4f} | {med[k] / med['plain']:.3f}x |")
    print("\n| steps | pccfast capture MiB | pccfast + Dataset Diffusion MiB | reference-style MiB |")
    print("| --- | --- | --- | --- |")
    for s, a, d, b in zip(memory["steps"], memory["pccfast"], memory["pccfast + Dataset Diffusion"],
                          memory["reference-style"]):
        print(f"| {s} | {a / 2**20:.2f} | {d / 2**20:.2f} | {b / 2**20:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds_per_step": med, "all": times, "memory_bytes": memory, "latent": args.latent,
                       "steps": args.steps, "threads": torch.get_num_threads()}, f, indent=1)
    if args.dit:
        return _bench_dit(args, device)
    return 0


# --- diffusion transformers (SD3, FLUX): the joint-attention capture ------------------------------

# Benchmark-size transformers: the real models' head width (64 for SD3, 128 for FLUX) and block
# proportions (SD3: joint blocks, default capture = their later half; FLUX: 1 dual-stream block per
# 2 single-stream ones, default capture = the later half of the dual-stream blocks), fewer heads
# and blocks so that a CPU runs them; text length as the pipelines' (SD3 77 CLIP + 256 T5, FLUX 512).
_DIT_BENCH = {
    "sd3": dict(sample_size=64, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64, num_attention_heads=4,
                joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=64, out_channels=16,
                pos_embed_max_size=96, qk_norm="rms_norm"),
    "flux": dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                 num_attention_heads=2, joint_attention_dim=256, pooled_projection_dim=64, axes_dims_rope=(16, 56, 56),
                 guidance_embeds=True),
}
_DIT_TEXT = {"sd3": 77 + 256, "flux": 512}


def _bench_dit(args, device) -> int:
    """Per transformer call: plain (diffusers' default processors) vs the joint capture (steps
    before the last; whole run with the last step's per-head outputs and PCA), and the capture's
    memory (class maps + features) against the number of steps."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from pccfast.diffusion.joint_capture import JointAttentionCapture, default_feature_blocks

    results = {}
    gen = torch.Generator().manual_seed(0)
    grid = args.dit_size // 16
    for family in [f.strip() for f in args.dit.split(",") if f.strip()]:
        if family not in _DIT_BENCH:
            raise SystemExit(f"error: --dit has to name sd3 or flux but names {family!r}")
        torch.manual_seed(0)
        cfg = _DIT_BENCH[family]
        model = (SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel)(**cfg).eval().to(device)
        halves = 2 if family == "sd3" else 1  # SD3 with CFG; FLUX: no guidance batch
        n_txt = _DIT_TEXT[family]
        ctx = torch.randn(halves, n_txt, cfg["joint_attention_dim"], generator=gen).to(device)
        pooled = torch.randn(halves, cfg["pooled_projection_dim"], generator=gen).to(device)
        if family == "sd3":
            lat = torch.randn(halves, 16, 2 * grid, 2 * grid, generator=gen).to(device)  # (2B, 16, h, w)

            def call(t, lat=lat, ctx=ctx, pooled=pooled, model=model):
                model(hidden_states=lat, encoder_hidden_states=ctx, pooled_projections=pooled,
                      timestep=torch.full((halves,), float(t), device=device), return_dict=False)
        else:
            lat = torch.randn(1, grid * grid, 64, generator=gen).to(device)  # (B, N, 64) packed
            ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
            img_ids = torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3).float().to(device)
            txt_ids = torch.zeros(n_txt, 3, device=device)

            def call(t, lat=lat, ctx=ctx, pooled=pooled, model=model, img_ids=img_ids, txt_ids=txt_ids):
                model(hidden_states=lat, encoder_hidden_states=ctx, pooled_projections=pooled,
                      timestep=torch.full((1,), float(t) / 1000, device=device), img_ids=img_ids, txt_ids=txt_ids,
                      guidance=torch.full((1,), 3.5, device=device), return_dict=False)
        width = model.inner_dim if family == "flux" else cfg["num_attention_heads"] * cfg["attention_head_dim"]
        class_embeds = torch.randn(1, args.tokens, width, generator=gen).to(device)
        class_mask = torch.ones(1, args.tokens, dtype=torch.bool, device=device)
        blocks = default_feature_blocks(model)
        ts = torch.linspace(999, 1, args.steps)

        def run_plain(steps=args.steps):
            for i in range(steps):
                call(ts[i % len(ts)])

        def run_capture(steps=args.steps, total=None):
            cap = JointAttentionCapture(model, class_embeds, class_mask, total or steps, (grid, grid), halves, blocks)
            with cap:
                for i in range(steps):
                    call(ts[i % len(ts)])
                    cap.on_step_end(None, i, None, {})
            return cap

        variants = {"plain": run_plain, "capture (steps before the last)": lambda: run_capture(args.steps, args.steps + 1),
                    "capture (whole run, last step included)": run_capture}

        class _Keep(JointAttentionCapture):  # keeps one call's processor hand-overs, to time them alone
            seen: list = []

            def observe(self, *a):
                if len(self.seen) < len(blocks):
                    self.seen.append(a)
                super().observe(*a)
        times = {k: [] for k in variants}
        with torch.no_grad():
            for fn in variants.values():
                fn()
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[name].append((time.perf_counter() - t0) / args.steps)
            memory = []
            for s in [int(x) for x in args.memory_steps.split(",")]:
                cap = run_capture(s)
                memory.append((s, _nbytes(cap.class_maps) + _nbytes(cap.head_features)))
            # paired calls: plain and capture (a call before the last) back to back, order alternating,
            # the ratio per pair; its median is robust to load that drifts slower than one pair
            paired, cap = [], JointAttentionCapture(model, class_embeds, class_mask, 10**9, (grid, grid), halves, blocks)
            for r in range(args.repeats * args.steps):
                pair = {}
                for which in (("plain", "capture") if r % 2 == 0 else ("capture", "plain")):
                    ctx_mgr = cap if which == "capture" else contextlib.nullcontext()
                    with ctx_mgr:
                        sync(device)
                        t0 = time.perf_counter()
                        call(ts[r % len(ts)])
                        sync(device)
                        pair[which] = time.perf_counter() - t0
                paired.append(pair["capture"] / pair["plain"])
            # the capture's own work in one call before the last (class keys, scores, accumulation), alone
            keep = _Keep(model, class_embeds, class_mask, 2, (grid, grid), halves, blocks)
            keep.seen = []
            with keep:
                call(ts[0])
                own = []
                for _ in range(args.repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    for a in keep.seen:
                        keep.observe(*a)
                    sync(device)
                    own.append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        print(f"\nDiT {family}: {len(blocks)} of {len(model.attn_processors)} attention blocks captured, "
              f"{args.dit_size}x{args.dit_size} image ({grid * grid} image tokens, {n_txt} text tokens), "
              f"transformer batch {halves}, {args.steps} calls, device {device}, median of {args.repeats}\n")
        print("| variant | s / transformer call (median) | ratio to plain | fastest run | ratio, fastest runs |")
        print("| --- | --- | --- | --- | --- |")
        for k in med:
            print(f"| {k} | {med[k]:.4f} | {med[k] / med['plain']:.3f}x | {low[k]:.4f} | {low[k] / low['plain']:.3f}x |")
        own_s = statistics.median(own)
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        print(f"\npaired calls (capture / plain, back to back, {len(paired)} pairs): median {statistics.median(paired):.3f}x, "
              f"quartiles {q[0]:.3f}x-{q[2]:.3f}x")
        print(f"\ncapture work alone per call before the last (class keys, scores, accumulation; {len(blocks)} blocks): "
              f"{own_s:.4f} s = {own_s / low['plain']:.3f} of the fastest plain call")
        print("\n| steps | capture MiB |")
        print("| --- | --- |")
        for s, nb in memory:
            print(f"| {s} | {nb / 2**20:.3f} |")
        results[family] = {"seconds_per_call": med, "fastest": low, "all": times, "memory_bytes": memory,
                           "capture_work_per_call": own_s, "paired_ratios": paired}
    if args.json:
        path = args.json if args.dit_only else args.json.rsplit(".", 1)[0] + "_dit.json"
        with open(path, "w") as f:
            json.dump({"dit": results, "size": args.dit_size, "steps": args.steps,
                       "threads": torch.get_num_threads()}, f, indent=1)
    return 0


# --- UNet families (SD 1/2, SDXL, turbo, guidance-distilled): the adapters' capture -------------------

_FAMILY_GUIDANCE = {"tiny": 7.5, "tiny-sdxl": 7.5, "tiny-turbo": 0.0, "tiny-lcm": 7.5}  # as each is run


def _bench_families(args, device) -> int:
    """Per UNet call of each tiny family's UNet, in one run: plain (diffusers' default
    processors) vs the capture its adapter installs (steps before the last; the whole run with
    the last step's PCA; projected to 80 steps and, for a guidance-free family, a 1-step run),
    and the capture's memory (class maps + features) against the number of steps."""
    from pccfast.diffusion.adapters import adapter_for
    from pccfast.diffusion.pipeline import load_pipeline

    height, width = (int(v) for v in args.family_size.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    results = {}
    for name in [f.strip() for f in args.families.split(",") if f.strip()]:
        if name not in _FAMILY_GUIDANCE:
            raise SystemExit(f"error: --families has to name {', '.join(_FAMILY_GUIDANCE)} but names {name!r}")
        pipe = load_pipeline(name, device=device)
        adapter = adapter_for(pipe)
        unet = adapter.denoiser
        adapter.check_size(height, width)
        halves = adapter.halves(_FAMILY_GUIDANCE[name])
        latent_hw, grid_hw = adapter.latent_hw(height, width), adapter.grid_hw(height, width)
        cfg_unet = unet.config
        lat = torch.randn(halves, cfg_unet.in_channels, *latent_hw, generator=gen).to(device)  # (halves*B, 4, h, w), B = 1
        ctx = torch.randn(halves, 77, cfg_unet.cross_attention_dim, generator=gen).to(device)
        extra = {}
        if cfg_unet.addition_embed_type == "text_time":  # SDXL: pooled text embedding and the 6 size ids
            pooled = cfg_unet.projection_class_embeddings_input_dim - 6 * cfg_unet.addition_time_embed_dim
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(halves, pooled, generator=gen).to(device),
                                          "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * halves,
                                                                   dtype=torch.float32, device=device)}
        if cfg_unet.time_cond_proj_dim is not None:  # guidance embedding
            extra["timestep_cond"] = torch.randn(halves, cfg_unet.time_cond_proj_dim, generator=gen).to(device)
        class_embeds = torch.randn(1, args.tokens, cfg_unet.cross_attention_dim, generator=gen).to(device)
        class_mask = torch.ones(1, args.tokens, dtype=torch.bool, device=device)
        ts = torch.linspace(999, 1, args.steps).long()

        def call(i, unet=unet, lat=lat, ctx=ctx, extra=extra, ts=ts):
            unet(lat, ts[i % len(ts)].to(device), encoder_hidden_states=ctx, **extra)

        def run_plain(steps=args.steps, call=call):
            for i in range(steps):
                call(i)

        def run_capture(steps=args.steps, total=None, call=call, unet=unet, adapter=adapter, halves=halves,
                        latent_hw=latent_hw, grid_hw=grid_hw, class_embeds=class_embeds, class_mask=class_mask):
            cap = AttentionCapture(unet, class_embeds, class_mask, total or steps, latent_hw, adapter=adapter,
                                   halves=halves, grid_hw=grid_hw)
            with cap:
                for i in range(steps):
                    call(i)
                    cap.on_step_end(None, i, None, {})
            return cap

        variants = {"plain": run_plain,
                    "capture (steps before the last)": lambda run_capture=run_capture: run_capture(args.steps,
                                                                                                  args.steps + 1),
                    "capture (whole run, last step included)": run_capture}
        times = {k: [] for k in variants}
        one_step = {"plain": [], "capture": []}
        with torch.no_grad():
            for fn in variants.values():  # warm-up
                fn()
            for _ in range(args.repeats):
                for k, fn in variants.items():  # interleaved, so load changes hit all variants alike
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[k].append((time.perf_counter() - t0) / args.steps)
                for k, fn in (("plain", lambda run_plain=run_plain: run_plain(1)),
                              ("capture", lambda run_capture=run_capture: run_capture(1))):
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    one_step[k].append(time.perf_counter() - t0)
            memory = []
            for s in [int(x) for x in args.memory_steps.split(",")]:
                cap = run_capture(s)
                memory.append((s, _nbytes(cap.class_maps) + _nbytes(cap.head_features), int(cap.features().shape[1])))
            # counted FLOPs (matmuls, convolutions, attention; not eigh): what a loaded machine cannot distort
            from torch.utils.flop_counter import FlopCounterMode

            counted = {}
            for k, fn in (("plain", lambda run_plain=run_plain: run_plain(1)),
                          ("capture, a call before the last", lambda run_capture=run_capture: run_capture(1, 2)),
                          ("capture, the last call (PCA included)", lambda run_capture=run_capture: run_capture(1))):
                with FlopCounterMode(display=False) as fc:
                    fn()
                counted[k] = fc.get_total_flops()
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}  # the fastest runs: what a loaded machine distorts least
        for d in (med, low):
            mid = d["capture (steps before the last)"]
            d["capture (80-step run, projected)"] = mid + (d["capture (whole run, last step included)"] - mid) * args.steps / 80
        one = {k: min(v) for k, v in one_step.items()}
        print(f"\n{name} ({adapter.family}): {height}x{width} image, latent {latent_hw[0]}x{latent_hw[1]}, grid "
              f"{grid_hw[0]}x{grid_hw[1]}, UNet batch {halves} (B = 1), {len(adapter.feature_layers())} feature layers, "
              f"{len(adapter.class_map_layers())} class-map layers, D = {memory[0][2]}, {args.steps} calls, device "
              f"{device}, torch threads {torch.get_num_threads()}, median of {args.repeats}\n")
        print("| variant | s / UNet call (median) | ratio to plain | fastest run | ratio, fastest runs |")
        print("| --- | --- | --- | --- | --- |")
        for k in med:
            print(f"| {k} | {med[k]:.4f} | {med[k] / med['plain']:.3f}x | {low[k]:.4f} | {low[k] / low['plain']:.3f}x |")
        print(f"| capture, 1-step run (PCA included) | | | {one['capture']:.4f} | {one['capture'] / one['plain']:.3f}x |")
        print("\n| one UNet call | GFLOP (counted) | ratio to plain |")
        print("| --- | --- | --- |")
        for k, v in counted.items():
            print(f"| {k} | {v / 1e9:.3f} | {v / counted['plain']:.4f}x |")
        print("\n| steps | capture MiB |")
        print("| --- | --- |")
        for s, nb, _ in memory:
            print(f"| {s} | {nb / 2**20:.3f} |")
        results[name] = {"seconds_per_call": med, "fastest": low, "one_step": one, "flops": counted, "all": times, "memory_bytes": memory,
                         "halves": halves, "grid": grid_hw, "size": [height, width]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"families": results, "steps": args.steps, "threads": torch.get_num_threads()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
