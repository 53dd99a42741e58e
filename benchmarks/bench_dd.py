"""Dataset Diffusion's labeller and the fused labeller on planted scenes: quality and time.

Scenes: ``pccfast.testing.synthetic.make_scene`` (PCC's inputs, planted objects) and, drawn
from the same layout, ``pccfast.testing.dd_scenes.dd_inputs`` (Dataset Diffusion's affinity
at the half grid and class maps at the quarter grid, with noise). Per labeller (PCC's refined
mask, DD's mask, the fused mask: agree -> keep, else 255):

* coverage: share of pixels labelled (not 255);
* precision: share of labelled pixels with the planted class;
* mIoU against the planted ground truth (255 counted against the true class);

plus two variants of the fused rule that are measured, not shipped: PCC's label where DD is
uncertain, and DD's label where PCC is uncertain;

and the time per image of ``core.dd.dd_masks`` against ``core.labeller.label_images`` on the
same batch (the fused labeller costs both plus an elementwise compare).

    python benchmarks/bench_dd.py [--scenes 16] [--grid 64] [--size 512] [--threads 1] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pccfast.core.dd import DDConfig, dd_masks, fuse_masks
from pccfast.core.labeller import label_images
from pccfast.testing.dd_scenes import coverage_precision, dd_inputs
from pccfast.testing.synthetic import make_scene, mask_miou, scene_features, stack_scenes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=16, help="planted scenes (seeds 0..N-1; default %(default)s)")
    p.add_argument("--grid", type=int, default=64, help="labelling grid (64 = SD at 512x512; default %(default)s)")
    p.add_argument("--size", type=int, default=512, help="image side (default %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="images per labeller call (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DDConfig()
    scenes = [make_scene(s, grid=args.grid, image_size=args.size, heads=(4, 2, 2), head_dim=16)
              for s in range(args.scenes)]
    ins = [dd_inputs(s, cfg, seed=100 + i) for i, s in enumerate(scenes)]
    st = stack_scenes(scenes)
    feats = scene_features(st["layers"], args.grid)
    aff = torch.stack([x.affinity for x in ins])  # (N, N2, N2)
    maps = torch.stack([x.class_maps for x in ins])  # (N, K, h4, w4)
    present = torch.stack([x.present for x in ins])  # (N, K)
    batches = [slice(i, i + args.batch) for i in range(0, args.scenes, args.batch)]
    hw = (args.size, args.size)

    def run_pcc():
        return torch.cat([label_images(feats[b], st["class_attention"][b], st["images"][b], return_blocky=False).mask
                          for b in batches])

    def run_dd():
        return torch.cat([dd_masks(aff[b], maps[b], present[b], hw, cfg) for b in batches])

    pcc, dd = run_pcc(), run_dd()  # also the warm-up
    fused = fuse_masks(pcc, dd)
    keep_pcc = torch.where((dd == 255) & (pcc != 255), pcc, fused)  # variant: PCC where DD is uncertain
    keep_dd = torch.where((pcc == 255) & (dd != 255), dd, fused)  # variant: DD where PCC is uncertain
    times = {"pcc": [], "dd": []}
    for _ in range(args.repeats):
        for name, fn in (("pcc", run_pcc), ("dd", run_dd)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / args.scenes)
    gt = st["gt"]
    rows = {}
    for name, m in (("PCC (refined)", pcc), ("Dataset Diffusion", dd), ("fused (agree, else 255)", fused),
                    ("variant: fused, PCC where DD is uncertain", keep_pcc),
                    ("variant: fused, DD where PCC is uncertain", keep_dd)):
        cov, prec = coverage_precision(m, gt)
        miou = statistics.mean(mask_miou(m[i], gt[i], skip=255) for i in range(args.scenes))
        rows[name] = dict(coverage=cov, precision=prec, miou=miou)
    print(f"{args.scenes} planted scenes, grid {args.grid}, image {args.size}, torch threads {torch.get_num_threads()}\n")
    print("| labeller | coverage | precision | mIoU vs planted |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['coverage']:.3f} | {r['precision']:.4f} | {r['miou']:.3f} |")
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n| labeller | ms / image | ratio to PCC |")
    print("| --- | ---: | ---: |")
    for k, name in (("pcc", "PCC label_images"), ("dd", "Dataset Diffusion dd_masks")):
        print(f"| {name} | {1000 * med[k]:.1f} | {med[k] / med['pcc']:.3f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quality": rows, "seconds_per_image": med, "all": times, "scenes": args.scenes,
                       "grid": args.grid, "size": args.size, "threads": torch.get_num_threads()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
