"""Benchmark: pccfast's labeller against the reference baseline on synthetic SD-sized scenes.

The same inputs go through both paths in one run:

- baseline: ``benchmarks/reference_impl.py`` (numpy + scikit-learn + scipy, one image at a
  time, the reference's loops; stages handed over through pickles for the file run);
- pccfast: ``pccfast.synthetic.scene_features`` (batched head-wise PCA) and
  ``pccfast.labeller.label_images`` (batched), ``pccfast.relabel.relabel_dir`` for the file run.

Stages timed (median over repeats of seconds per image):

1. head-wise PCA: per-layer attention outputs (2*heads, S*S, d) -> features (D, 64, 64);
2. blocky mask: features + class maps -> (64, 64) labels;
3. refinement: blocky mask + image -> (512, 512) labels;
4. files in, masks out: baseline = pickled features and class maps + JPEG -> PNG through the
   three pickled stages (blocky, refine); pccfast = capture files + JPEG -> PNG (relabel).

Each path runs on its own previous stage's output. Images are saved as JPEG (quality 75, as
the reference) and decoded once; both paths read the same decoded pixels. Agreement: mIoU
between the two masks (255 as a label of its own) and pixel agreement; each against the
planted ground truth (mIoU over the classes, an uncertain pixel counts as a miss); and the
baseline with k-means seed 0 against seed 1 as the floor two equally valid runs reach.

    python benchmarks/bench_labeller.py --scenes 8 --repeats 3 --json bench.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pccfast.testing.reference as ref  # noqa: E402

from pccfast.core.config import PCCConfig  # noqa: E402
from pccfast.data.fileio import load_mask  # noqa: E402
from pccfast.data.labelsets import get_label_set  # noqa: E402
from pccfast.testing.synthetic import make_scene, mask_miou, pixel_agreement, scene_features  # noqa: E402
from pccfast.testing.timing import git_version, timed  # noqa: E402

__all__ = ["build_parser", "main"]


def _jpeg_roundtrip(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 -> JPEG quality 75 bytes -> (H, W, 3) uint8 (what the reference reads)."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=75)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _chunks(n: int, size: int):
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x >= 0.01 else f"{x * 1000:.2f} ms"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench_labeller.py",
        description="Time the reference baseline (numpy/scikit-learn/scipy, pickles) and pccfast's labeller "
        "on the same synthetic scenes, stage by stage, and measure how well their masks agree with each "
        "other and with the planted ground truth. Prints a markdown table; --json writes the figures.",
    )
    p.add_argument("--scenes", type=int, default=8, help="number of synthetic scenes (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per stage, median reported (default: %(default)s)")
    p.add_argument("--baseline-repeats", type=int, default=None,
                   help="timed repeats for the (slow) baseline (default: --repeats)")
    p.add_argument("--device", default="cpu", help="torch device for pccfast (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="pccfast images per call (default: all scenes)")
    p.add_argument("--grid", type=int, default=64, help="feature grid side (default: %(default)s, SD 2.1 at 512)")
    p.add_argument("--image-size", type=int, default=512, help="image side (default: %(default)s)")
    p.add_argument("--heads", default="20,10,5",
                   help="heads per CFG half at grid/4, grid/2, grid (default: %(default)s, SD 2.1-base)")
    p.add_argument("--layers-per-scale", type=int, default=3, help="layers per scale (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head (default: %(default)s)")
    p.add_argument("--first-seed", type=int, default=1000, help="seed of the first scene (default: %(default)s)")
    p.add_argument("--no-seed-floor", action="store_true",
                   help="skip the second baseline run with k-means seed 1 (the agreement floor)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both paths: torch intra-op threads and, through threadpoolctl, the BLAS and "
                   "OpenMP pools numpy/scikit-learn use (default: each library's own choice). On a shared "
                   "machine, 1 gives the steadiest figures")
    p.add_argument("--workdir", default=None, help="folder for the file run (default: a temporary folder)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=args.threads):
            return _run(args)
    return _run(args)


def _run(args) -> int:
    for name in ("scenes", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} has to be at least 1 but is {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from pccfast.core.labeller import label_images  # the module under test
    from pccfast.core.refine import refine_mask

    load_start = os.getloadavg()
    version = git_version()
    device = torch.device(args.device)
    heads = tuple(int(h) for h in args.heads.split(","))
    n = args.scenes
    batch = args.batch or n
    b_repeats = args.baseline_repeats or args.repeats
    cfg = PCCConfig()
    grid, size = args.grid, args.image_size
    ls = get_label_set("voc")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    # ---------------- inputs ----------------
    log(f"making {n} scenes (grid {grid}, image {size}, heads {heads} x {args.layers_per_scale} layers per scale)")
    scenes = [
        make_scene(args.first_seed + i, grid=grid, image_size=size, heads=heads,
                   layers_per_scale=args.layers_per_scale, head_dim=args.head_dim, num_classes=ls.num_classes)
        for i in range(n)
    ]
    images_np = [_jpeg_roundtrip(s.image) for s in scenes]  # (H, W, 3) uint8 each
    images_t = torch.stack([torch.from_numpy(im.copy()).permute(2, 0, 1) for im in images_np])  # (N, 3, H, W)
    layers_np = [[x.numpy() for x in s.layers] for s in scenes]
    layers_t = [torch.stack([s.layers[j] for s in scenes]) for j in range(len(scenes[0].layers))]  # (N, heads, S*S, d)
    ca_t = torch.stack([s.class_attention for s in scenes])  # (N, K, h, w)
    ca_np = [s.class_attention.numpy() for s in scenes]
    idx = _chunks(n, batch)

    def on_dev(xs):
        return [x.to(device) for x in xs]

    layers_dev = [on_dev([x[r.start:r.stop] for x in layers_t]) for r in idx]
    ca_dev = [ca_t[r.start:r.stop].to(device) for r in idx]
    img_dev = [images_t[r.start:r.stop].to(device) for r in idx]

    # ---------------- pccfast ----------------
    def pcc_pca():
        return [scene_features(x, grid, cfg) for x in layers_dev]  # per chunk (b, D, h, w)

    def pcc_blocky(feats):
        return [label_images(f, c, im, cfg.replace(refine=False)) for f, c, im in zip(feats, ca_dev, img_dev)]

    def pcc_refine(blk):
        return [refine_mask(im, r.blocky_full, cfg) for im, r in zip(img_dev, blk)]

    log("pccfast: warm-up")
    feats = pcc_pca()
    pcc_refine(pcc_blocky(feats))
    times = {"pca": [], "blocky": [], "refine": []}
    for _ in range(args.repeats):
        feats, t = timed(pcc_pca, device)
        times["pca"].append(t / n)
        blk, t = timed(lambda: pcc_blocky(feats), device)
        times["blocky"].append(t / n)
        masks, t = timed(lambda: pcc_refine(blk), device)
        times["refine"].append(t / n)
    pcc_mask = torch.cat([m.cpu() for m in masks])  # (N, H, W)
    pcc_blk = torch.cat([r.blocky.cpu() for r in blk])  # (N, h, w)
    pcc_feats = torch.cat([f.cpu() for f in feats])  # (N, D, h, w)
    pcc_t = {k: statistics.median(v) for k, v in times.items()}
    # the staged calls give what one label_images call gives
    whole = torch.cat([r.mask.cpu() for r in
                       (label_images(f, c, im, cfg) for f, c, im in zip(feats, ca_dev, img_dev))])
    staged_match = bool(torch.equal(whole, pcc_mask))
    log(f"pccfast: pca {pcc_t['pca']:.3f} blocky {pcc_t['blocky']:.3f} refine {pcc_t['refine']:.3f} s/img")

    # ---------------- baseline ----------------
    log("baseline: warm-up")
    f0 = ref.pca_stage(layers_np[0], grid)
    ref.refine_stage(ref.blocky_stage(f0, ca_np[0]), images_np[0])
    btimes = {"pca": [], "blocky": [], "refine": []}
    for rep in range(b_repeats):
        tp = tb = tr = 0.0
        b_feats, b_blk, b_mask = [], [], []
        for i in range(n):
            f, t = timed(lambda: ref.pca_stage(layers_np[i], grid), torch.device("cpu"))
            tp += t
            blk, t = timed(lambda: ref.blocky_stage(f, ca_np[i]), torch.device("cpu"))
            tb += t
            m, t = timed(lambda: ref.refine_stage(blk, images_np[i]), torch.device("cpu"))
            tr += t
            b_feats.append(f), b_blk.append(blk), b_mask.append(m)
        btimes["pca"].append(tp / n), btimes["blocky"].append(tb / n), btimes["refine"].append(tr / n)
        log(f"baseline repeat {rep + 1}/{b_repeats}: pca {tp / n:.3f} blocky {tb / n:.3f} refine {tr / n:.3f} s/img")
    base_t = {k: statistics.median(v) for k, v in btimes.items()}

    floor = None
    if not args.no_seed_floor:
        log("baseline with k-means seed 1 (agreement floor)")
        floor = [ref.reference_label(ca_np[i], images_np[i], layers=layers_np[i], grid=grid, seed=1)[0]
                 for i in range(n)]

    # ---------------- files in, masks out ----------------
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_labeller_")
        workdir = tmp.name
    else:
        workdir = args.workdir
    ids = [f"scene{s.seed}" for s in scenes]
    jpg_dir = os.path.join(workdir, "JPEGImages")
    os.makedirs(jpg_dir, exist_ok=True)
    for i, sid in enumerate(ids):
        Image.fromarray(scenes[i].image.permute(1, 2, 0).numpy()).save(os.path.join(jpg_dir, sid + ".jpg"), quality=75)
    # baseline inputs: pickles of its features and the class maps (the first script's output)
    bdir = os.path.join(workdir, "baseline")
    for sub in ("features", "class_attention"):
        os.makedirs(os.path.join(bdir, sub), exist_ok=True)
    if not os.path.exists(os.path.join(bdir, "JPEGImages")):
        os.symlink(jpg_dir, os.path.join(bdir, "JPEGImages"))
    for i, sid in enumerate(ids):
        with open(os.path.join(bdir, "features", sid + ".pkl"), "wb") as fh:
            pickle.dump({"features": b_feats[i]}, fh, protocol=pickle.HIGHEST_PROTOCOL)
        with open(os.path.join(bdir, "class_attention", sid + ".pkl"), "wb") as fh:
            pickle.dump(ca_np[i], fh, protocol=pickle.HIGHEST_PROTOCOL)
    palette = ls.flat_palette()
    file_note = "pccfast: capture files + JPEG -> relabel_dir -> palette PNG"
    relabel_dir = write_capture = None
    try:
        from pccfast.data.captures import write_capture
        from pccfast.runs.relabel import relabel_dir
    except ImportError as e:
        file_note = f"pccfast.relabel/capture_io unavailable ({e}); timed label_images + image load + PNG write"
    pdir = os.path.join(workdir, "pccfast")
    os.makedirs(os.path.join(pdir, "captures"), exist_ok=True)
    if write_capture is not None:
        for i, sid in enumerate(ids):
            write_capture(os.path.join(pdir, "captures", sid + ".safetensors"), pcc_feats[i], ca_t[i], label_set=ls,
                          prompt="synthetic scene", classes=[ls.classes[c] for c in scenes[i].object_classes],
                          seed=scenes[i].seed, model="synthetic", steps=None)

    def pcc_files():
        if relabel_dir is not None:
            rep = relabel_dir(os.path.join(pdir, "captures"), jpg_dir, os.path.join(pdir, "out"), cfg,
                              batch=batch, device=device, overwrite=True)
            if not rep.ok:
                raise RuntimeError(f"relabel failed: {rep.failures[:3]}")
            return
        from pccfast.data.fileio import load_image, save_mask_png
        for r in idx:
            ims = torch.stack([torch.from_numpy(load_image(os.path.join(jpg_dir, ids[i] + ".jpg")).copy()).permute(2, 0, 1)
                               for i in r]).to(device)
            out = label_images(pcc_feats[r.start:r.stop].to(device), ca_t[r.start:r.stop].to(device), ims, cfg)
            for j, i in enumerate(r):
                save_mask_png(os.path.join(pdir, "out", "SegmentationClass", ids[i] + ".png"),
                              out.mask[j].cpu().numpy(), palette)

    def base_files():
        ref.run_scripts(bdir, ids, stages=("blocky", "refine"), grid=grid, palette=palette)

    log("files: warm-up")
    pcc_files()
    ftimes = {"pcc": [], "base": []}
    for rep in range(args.repeats):
        _, t = timed(pcc_files, device)
        ftimes["pcc"].append(t / n)
    for rep in range(b_repeats):
        _, t = timed(base_files, torch.device("cpu"))
        ftimes["base"].append(t / n)
        log(f"baseline files repeat {rep + 1}/{b_repeats}: {t / n:.3f} s/img")
    pcc_file_masks = [load_mask(os.path.join(pdir, "out", "SegmentationClass", sid + ".png")) for sid in ids]
    base_file_masks = [load_mask(os.path.join(bdir, "SegmentationClass", sid + ".png")) for sid in ids]
    files_match = {
        "pccfast": all(np.array_equal(a, pcc_mask[i].numpy()) for i, a in enumerate(pcc_file_masks)),
        "baseline": all(np.array_equal(a, b_mask[i]) for i, a in enumerate(base_file_masks)),
    }
    if tmp is not None:
        tmp.cleanup()

    # ---------------- agreement ----------------
    per_scene = []
    for i, s in enumerate(scenes):
        bm, pm = torch.from_numpy(b_mask[i]), pcc_mask[i]
        gt_grid = s.gt[size // grid // 2::size // grid, size // grid // 2::size // grid]  # (h, w) at pixel centres
        row = {
            "seed": s.seed,
            "classes": s.classes,
            "blocky_miou_pcc_vs_base": mask_miou(pcc_blk[i], torch.from_numpy(b_blk[i])),
            "blocky_pixel_agreement": pixel_agreement(pcc_blk[i], torch.from_numpy(b_blk[i])),
            "mask_miou_pcc_vs_base": mask_miou(pm, bm),
            "mask_pixel_agreement": pixel_agreement(pm, bm),
            "gt_miou_base": mask_miou(bm, s.gt, skip=255),
            "gt_miou_pcc": mask_miou(pm, s.gt, skip=255),
            "gt_blocky_miou_base": mask_miou(torch.from_numpy(b_blk[i]), gt_grid, skip=255),
            "gt_blocky_miou_pcc": mask_miou(pcc_blk[i], gt_grid, skip=255),
            "uncertain_base": float((bm == 255).double().mean()),
            "uncertain_pcc": float((pm == 255).double().mean()),
        }
        if floor is not None:
            fm = torch.from_numpy(floor[i])
            row["mask_miou_base_seed0_vs_seed1"] = mask_miou(bm, fm)
            row["mask_pixel_agreement_base_seed0_vs_seed1"] = pixel_agreement(bm, fm)
            row["gt_miou_base_seed1"] = mask_miou(fm, s.gt, skip=255)
        per_scene.append(row)
    mean = {k: float(np.mean([r[k] for r in per_scene])) for k in per_scene[0] if k not in ("seed", "classes")}

    threads_note = (f"{args.threads} for both paths" if args.threads
                    else f"library defaults (torch {torch.get_num_threads()})")
    stages = [
        ("head-wise PCA (stage 1)", base_t["pca"], pcc_t["pca"]),
        ("blocky mask (stage 2)", base_t["blocky"], pcc_t["blocky"]),
        ("refinement (stage 3)", base_t["refine"], pcc_t["refine"]),
        ("stages 1-3 in memory", sum(base_t.values()), sum(pcc_t.values())),
        ("files in, masks out (stages 2-3 + I/O)", statistics.median(ftimes["base"]), statistics.median(ftimes["pcc"])),
    ]
    lines = [
        f"Synthetic scenes: {n}, grid {grid}, image {size}, heads {heads} x {args.layers_per_scale} layers/scale x 2 CFG "
        f"halves, head dim {args.head_dim}; pccfast on {device} (batch {batch}); threads {threads_note}; "
        f"median of {args.repeats} (pccfast) / {b_repeats} (baseline) repeats, seconds per image.",
        f"Code: {version}. Load average (1 min) at start / end: {load_start[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
        "(other work on the machine slows both paths).",
        "",
        "| stage | baseline s/img | pccfast s/img | baseline / pccfast |",
        "|---|---:|---:|---:|",
    ]
    for name, b, p in stages:
        lines.append(f"| {name} | {_fmt(b)} | {_fmt(p)} | {b / p:.1f}x |" if p > 0 else f"| {name} | {_fmt(b)} | {_fmt(p)} | - |")
    lines += [
        "",
        "| agreement (mean over scenes) | value |",
        "|---|---:|",
        f"| blocky mIoU, pccfast vs baseline (255 own label) | {mean['blocky_miou_pcc_vs_base']:.3f} |",
        f"| mask mIoU, pccfast vs baseline (255 own label) | {mean['mask_miou_pcc_vs_base']:.3f} |",
        f"| mask pixel agreement, pccfast vs baseline | {100 * mean['mask_pixel_agreement']:.1f}% |",
    ]
    if floor is not None:
        lines += [
            f"| mask mIoU, baseline seed 0 vs seed 1 (floor) | {mean['mask_miou_base_seed0_vs_seed1']:.3f} |",
            f"| mask pixel agreement, baseline seed 0 vs seed 1 | {100 * mean['mask_pixel_agreement_base_seed0_vs_seed1']:.1f}% |",
        ]
    lines += [
        f"| mask mIoU vs ground truth: baseline / pccfast | {mean['gt_miou_base']:.3f} / {mean['gt_miou_pcc']:.3f} |",
        f"| blocky mIoU vs ground truth: baseline / pccfast | {mean['gt_blocky_miou_base']:.3f} / {mean['gt_blocky_miou_pcc']:.3f} |",
        f"| uncertain (255) share: baseline / pccfast | {100 * mean['uncertain_base']:.1f}% / {100 * mean['uncertain_pcc']:.1f}% |",
        "",
        f"File run: {file_note}; baseline: pickled features + class maps + JPEG -> blocky pickle -> PNG. "
        f"File masks equal the in-memory masks: pccfast {files_match['pccfast']}, baseline {files_match['baseline']}. "
        f"pccfast staged (blocky, then refine_mask) equals one label_images call: {staged_match}.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.json:
        import sklearn
        result = {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "environment": {
                "python": platform.python_version(), "torch": torch.__version__, "sklearn": sklearn.__version__,
                "numpy": np.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "device": str(device), "git": version,
                "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            },
            "seconds_per_image": {
                "baseline": {**base_t, "files": statistics.median(ftimes["base"])},
                "pccfast": {**pcc_t, "files": statistics.median(ftimes["pcc"])},
                "raw": {"pccfast": times, "baseline": btimes, "files": ftimes},
            },
            "ratios": {name: (b / p if p > 0 else None) for name, b, p in stages},
            "agreement_mean": mean,
            "agreement_per_scene": per_scene,
            "files_match_in_memory": files_match,
            "pccfast_staged_equals_label_images": staged_match,
            "file_run": file_note,
            "table_markdown": table,
        }
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
