"""``python -m pccfast.generate``: prompts in, a VOC-layout segmentation dataset out, in one pass."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from pccfast.cli.common import (
    add_label_set_argument, add_run_arguments, check_scaleout_arguments, fail, one_line_errors, positive_int,
    run_and_report, run_settings,
)
from pccfast.cli.labelers import add_labeler_arguments, labeler_choice_from_args
from pccfast.diffusion.schedulers import scheduler_names
from pccfast.diffusion.settings import DEFAULT_MODEL, GenerationConfig

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccfast.generate",
        description="Generate a labelled segmentation dataset (VOC layout, or WebDataset tar shards with --format "
        "webdataset) from text prompts with Stable Diffusion "
        "and PCC segmentation. Re-running the same command resumes where it stopped. A batch that fails is run "
        "again prompt by prompt; prompts that still fail are listed at the end (exit status 1).",
    )
    g = p.add_argument_group("input and output")
    g.add_argument("--prompts", help="prompt file: the reference's JSON list (id, prompt_sd, classes), JSON Lines with "
                   "the same fields, or text lines 'prompt | class, class'. Default: the built-in prompt bank")
    g.add_argument("--out", default="out", help="dataset directory (default: %(default)s)")
    g.add_argument("--start", type=int, default=0, help="skip the first N prompts (default: 0)")
    g.add_argument("--limit", type=int, default=None, help="use at most N prompts (default: all)")
    g.add_argument("--save-blocky", action="store_true", help="also write SegmentationClassBlocky/<id>.png")
    g.add_argument("--save-captures", action="store_true",
                   help="also write captures/<id>.safetensors (read by python -m pccfast.relabel)")
    g.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of JPEGImages (default: %(default)s)")
    g.add_argument("--format", choices=("voc", "webdataset"), default="voc",
                   help="output layout: voc (JPEGImages/, SegmentationClass/, ...) or webdataset (tar shards "
                   "shards/<prefix>-NNNNNN.tar with <id>.jpg, <id>.png, <id>.json per sample, and shards.json); "
                   "python -m pccfast.export converts between layouts and to parquet (default: %(default)s)")
    g.add_argument("--shard-size", type=positive_int, default=1000, metavar="N",
                   help="samples per tar with --format webdataset (default: %(default)s)")
    g.add_argument("--overwrite", action="store_true",
                   help="accept settings or prompts that differ from the dataset's (OUT/run.json, the manifest) and "
                   "redo the samples whose records differ; without it such a run is refused with the first difference")
    add_label_set_argument(p)
    m = p.add_argument_group("model and diffusion")
    m.add_argument("--model", default=DEFAULT_MODEL, help="diffusers Stable Diffusion 1.x/2.x, SD-Turbo, SDXL, "
                   "SDXL-Turbo, SD3/SD3.5 or FLUX.1 checkpoint (the family is read from its model_index.json): hub id "
                   "or local folder, or 'tiny' (SD 2.1 topology), 'tiny-sdxl', 'tiny-turbo' (SD-Turbo's scheduler; run "
                   "it with --guidance 0), 'tiny-lcm' (a guidance-distilled UNet), 'tiny-sd3', 'tiny-flux' or "
                   "'tiny-flux-schnell' for the built-in random test models (default: %(default)s)")
    m.add_argument("--steps", type=int, default=80, help="denoising steps (default: %(default)s)")
    m.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance scale, at least 0: above 1 the UNet sees two halves (the class "
                   "maps use the unconditional one, the features both); at or below 1 (turbo models: 0) one half, "
                   "as with a guidance-distilled model whatever the scale (default: %(default)s)")
    m.add_argument("--height", type=int, default=512,
                   help="image height, a multiple of 8 (of 16 for SDXL); it may differ from --width (default: %(default)s)")
    m.add_argument("--width", type=int, default=512,
                   help="image width, a multiple of 8 (of 16 for SDXL) (default: %(default)s)")
    m.add_argument("--scheduler", default=None, choices=scheduler_names(), metavar="NAME",
                   help="sampler built from the checkpoint's own scheduler configuration (its noise schedule kept): "
                   f"{', '.join(scheduler_names())}; the capture counts the UNet calls from it (default: the "
                   "checkpoint's own scheduler)")
    m.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="negative prompt of every image (the unconditional half, with guidance only; SD 1.x/2.x, "
                   "SDXL and SD3, not FLUX.1, which has no unconditional half); a prompt file's 'negative_prompt' "
                   "field overrides it per prompt (default: none, the empty prompt)")
    m.add_argument("--seed", type=int, default=2024, help="prompt i gets seed + i, whatever the batch (default: %(default)s)")
    m.add_argument("--batch", type=int, default=8, help="prompts per UNet call (default: %(default)s)")
    m.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    m.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model precision (default: float16 on CUDA, float32 on the CPU)")
    m.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the UNet (SD3/FLUX: the transformer) (default backend: inductor; 'eager' "
                   "checks the graphs without code generation); the capture compiles three graphs once, not one per "
                   "step")
    m.add_argument("--feature-blocks", default=None, metavar="BLOCKS",
                   help="SD3/FLUX only: the transformer blocks whose image tokens give the head-wise features and the "
                   "class maps: 'default' (the later half of the joint (SD3) or dual-stream (FLUX) blocks), 'all', or "
                   "commas of block indexes, ranges a-b and names (FLUX: dual-stream blocks first, then single-stream; "
                   "e.g. 9-18 or transformer_blocks.12) (default: default)")
    m.add_argument("--append-classes", action="store_true",
                   help="append '; ' and the prompt's class names to each image prompt, as Dataset Diffusion does "
                   "('a black cat laying on the floor; cat'); the prompt used is the one recorded in the manifest, "
                   "and run.json records the setting (default: off)")
    add_labeler_arguments(p)
    add_run_arguments(p, "prompts")
    return p


@one_line_errors(resumable=build_parser)
def main(argv: list[str] | None = None) -> int:
    from pccfast.data.prompt_bank import builtin_prompts
    from pccfast.data.prompts import PromptError, read_prompts
    from pccfast.data.provenance import file_digest
    from pccfast.diffusion.adapters import check_family_size
    from pccfast.diffusion.dit_adapters import check_family_options, declared_blocks, declared_family

    def warn(line: str) -> None:
        print(f"warning: {line}", file=sys.stderr)

    from pccfast.runs.generate import run_generation
    from pccfast.runs.plan import parse_shard, select_shard

    args = build_parser().parse_args(argv)
    try:
        label_set, cfg, device = run_settings(args)
        dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
        settings = GenerationConfig(model=args.model, steps=args.steps, guidance=args.guidance, height=args.height,
                                    width=args.width, seed=args.seed, device=str(device), dtype=dtype,
                                    feature_blocks=args.feature_blocks, scheduler=args.scheduler,
                                    negative_prompt=args.negative_prompt)
        settings.check_labeller(cfg.pca_components)
        labeling = labeler_choice_from_args(args)
        if args.save_blocky and not labeling.needs_pcc:
            raise ValueError("`--save-blocky` writes PCC's blocky mask, which --labeler dd does not make (add "
                             "--save-all-labelers to run PCC as well)")
        if args.save_blocky and not labeling.needs_pcc:
            raise ValueError("`--save-blocky` writes PCC's blocky mask, which --labeler dd does not make (add "
                             "--save-all-labelers to run PCC as well)")
        if labeling.save_all and args.format != "voc":
            raise ValueError(f"`--save-all-labelers` writes SegmentationClassPCC/ and SegmentationClassDD/ folders, so "
                             f"it needs --format voc but the format is {args.format!r}")
        if args.compile is not None:
            known = torch._dynamo.list_backends(exclude_tags=())
            if args.compile not in known:
                raise ValueError(f"`--compile` has to be a torch.compile backend ({', '.join(known)}) "
                                 f"but is {args.compile!r}")
        if args.batch < 1:
            raise ValueError(f"`--batch` has to be at least 1 but is {args.batch}")
        if not 1 <= args.jpeg_quality <= 100:
            raise ValueError(f"`--jpeg-quality` has to lie in 1..100 but is {args.jpeg_quality}")
        check_scaleout_arguments(args)
        shard = parse_shard(args.shard)
        if args.start < 0:
            raise ValueError(f"`--start` has to be >= 0 but is {args.start}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"`--limit` has to be >= 1 but is {args.limit}")
        if args.prompts:
            entries = read_prompts(args.prompts, label_set, start=args.start, limit=args.limit, warn=warn)
            source = f"{os.path.abspath(args.prompts)} {file_digest(args.prompts)}"
        else:
            bank = builtin_prompts(label_set)
            if args.start >= len(bank):
                raise ValueError(f"`--start` {args.start} is beyond the {len(bank)} prompts of the built-in bank")
            entries = bank[args.start:] if args.limit is None else bank[args.start:args.start + args.limit]
            source = f"the built-in prompt bank of label set {label_set.name!r}"
        chosen = len(entries)
        entries = select_shard(entries, shard)
        if not entries:
            raise ValueError(f"`--shard` {args.shard} holds none of the {chosen} prompts chosen (--start, --limit)")
        family = declared_family(args.model)
        if family is not None:  # known without loading (tiny names, local folders, cached hub models): before any output
            check_family_size(family, args.height, args.width)  # SDXL: multiples of 16
            check_family_options(family, feature_blocks=args.feature_blocks, needs_dd=labeling.needs_dd,
                                 labeler=labeling.labeler, save_all=labeling.save_all, scheduler=args.scheduler,
                                 negative_prompt=any(getattr(e, "negative_prompt", None) is not None for e in entries)
                                 or args.negative_prompt is not None, blocks=declared_blocks(args.model, family))
    except (ValueError, PromptError, OSError) as exc:
        fail(exc)
    return run_and_report(lambda: run_generation(
        entries, settings, cfg, label_set, args.out, batch=args.batch, shard=shard, save_blocky=args.save_blocky,
        save_captures=args.save_captures, jpeg_quality=args.jpeg_quality, ray=args.ray, workers=args.workers,
        progress=not args.no_progress, prompts=source, overwrite=args.overwrite, compile=args.compile or False,
        format=args.format, shard_size=args.shard_size, labeling=labeling, append_classes=args.append_classes),
        "images", args.out)


if __name__ == "__main__":
    sys.exit(main())
