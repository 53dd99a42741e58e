"""``python -m pccfast.generate``: prompts in, a VOC-layout segmentation dataset out, in one pass.

Each batch of prompts goes through one diffusers Stable Diffusion call with pccfast's capture
processors installed; the captured tensors go straight to the labeller on the same device,
and the image, mask (and optionally blocky mask and capture file) are written atomically.
Re-running the same command resumes: finished ids are skipped.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from pccfast.core.config import PCCConfig
from pccfast.data.dataset import DatasetWriter
from pccfast.data.labelsets import get_label_set
from pccfast.core.labelset import LabelSet

__all__ = ["GenerationConfig", "BatchRunner", "ModelLoadError", "GenerationReport", "run_generation", "select_shard", "pending", "main"]

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"


@dataclass
class GenerationConfig:
    """Diffusion settings (defaults = the reference: SD 2.1-base, 512x512, 80 steps, 7.5, seed 2024 + i)."""

    model: str = DEFAULT_MODEL  # diffusers checkpoint: hub id, local folder, or "tiny"
    steps: int = 80  # denoising steps
    guidance: float = 7.5  # classifier-free guidance scale
    height: int = 512  # image height (multiple of 8)
    width: int = 512  # image width (multiple of 8)
    seed: int = 2024  # prompt i (position in the prompt list) gets seed + i
    device: str = "cpu"  # torch device of the pipeline and the labeller
    dtype: str = "float32"  # float32, float16 or bfloat16 (half precision on CUDA)
    batch: int = 8  # prompts per UNet call
    jpeg_quality: int = 95  # JPEGImages quality

    def __post_init__(self) -> None:
        if self.height % 8 or self.width % 8 or self.height < 8 or self.width < 8:
            raise ValueError(
                f"`height` and `width` have to be positive multiples of 8 but are {self.height} and {self.width}"
            )
        if self.steps < 1:
            raise ValueError(f"`steps` has to be at least 1 but is {self.steps}")
        if self.batch < 1:
            raise ValueError(f"`batch` has to be at least 1 but is {self.batch}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"`dtype` has to be float32, float16 or bfloat16 but is {self.dtype!r}")
        if self.dtype == "float16" and torch.device(self.device).type == "cpu":
            raise ValueError("`dtype` float16 needs a CUDA device (--device cuda); on the CPU use float32 or bfloat16")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"`jpeg_quality` has to lie in 1..100 but is {self.jpeg_quality}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class BatchRunner:
    """Holds one loaded pipeline; turns a batch of prompt entries into written sample files.

    Used by the single-process loop and by each Ray worker. ``run`` writes the files of every
    sample of the batch and returns their manifest records; committing them is the caller's job.
    """

    def __init__(self, gen: GenerationConfig, cfg: PCCConfig, label_set: LabelSet, writer: DatasetWriter, pipe=None):
        from pccfast.diffusion.pipeline import load_pipeline

        self.gen, self.cfg, self.label_set, self.writer = gen, cfg, label_set, writer
        self.pipe = pipe if pipe is not None else load_pipeline(gen.model, device=gen.device, dtype=gen.torch_dtype)

    @torch.no_grad()
    def run(self, entries) -> list[dict]:
        from pccfast.diffusion.capture import generate_with_capture
        from pccfast.core.labeller import label_images

        t0 = time.perf_counter()
        seeds = [self.gen.seed + e.index for e in entries]
        cap = generate_with_capture(
            self.pipe,
            [e.prompt for e in entries],
            [list(e.classes) for e in entries],
            self.label_set,
            seeds,
            steps=self.gen.steps,
            guidance=self.gen.guidance,
            height=self.gen.height,
            width=self.gen.width,
            cfg=self.cfg,
        )
        res = label_images(cap.features.float(), cap.class_attention.float(), cap.images, self.cfg)
        images = cap.images.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()  # (B, H, W, 3)
        masks = res.mask.cpu().numpy()
        blocky = res.blocky_full.cpu().numpy() if self.writer.save_blocky else None
        seconds = (time.perf_counter() - t0) / len(entries)
        records = []
        for i, e in enumerate(entries):
            capture = None
            if self.writer.save_captures:
                capture = dict(
                    features=cap.features[i], class_attention=cap.class_attention[i], label_set=self.label_set,
                    prompt=e.prompt, classes=list(e.classes), seed=seeds[i], model=self.gen.model, steps=self.gen.steps,
                )
            self.writer.write_files(e.id, images[i], masks[i], None if blocky is None else blocky[i], capture)
            records.append(
                dict(id=e.id, index=e.index, prompt=e.prompt, classes=list(e.classes), seed=seeds[i],
                     model=self.gen.model, steps=self.gen.steps, seconds=round(seconds, 4))
            )
        return records


class ModelLoadError(RuntimeError):
    """The pipeline could not be loaded (message: one line saying what to do)."""


@dataclass
class GenerationReport:
    done: int = 0  # samples finished in this run
    skipped: int = 0  # already finished before (resume)
    failed: list = None  # (ids, message) per failed batch
    seconds: float = 0.0

    def __post_init__(self):
        self.failed = [] if self.failed is None else self.failed


def select_shard(entries: list, shard: tuple[int, int] | None) -> list:
    """Deterministic 1/N of the prompts by list position (independent of the batch size)."""
    if shard is None:
        return list(entries)
    i, n = shard
    return [e for e in entries if e.index % n == i]


def pending(entries: list, writer: DatasetWriter) -> tuple[list, int]:
    """Record the run's plan and return (entries still to do, how many are already done)."""
    writer.write_plan([e.id for e in entries])
    done = writer.done_ids()
    todo = [e for e in entries if e.id not in done]
    return todo, len(entries) - len(todo)


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_generation(
    entries: list,
    gen: GenerationConfig,
    cfg: PCCConfig,
    label_set: LabelSet,
    writer: DatasetWriter,
    *,
    progress: bool = True,
    runner: BatchRunner | None = None,
) -> GenerationReport:
    """Single-process loop: resume, batch, generate+label+write, commit, report failures."""
    from tqdm.auto import tqdm

    report = GenerationReport()
    todo, report.skipped = pending(entries, writer)
    if not todo:
        writer.finalize()
        return report
    if runner is None:
        try:
            runner = BatchRunner(gen, cfg, label_set, writer)
        except Exception as exc:  # a model that cannot be loaded ends the run with one line
            raise ModelLoadError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, desc="generate")
    for batch in batches(todo, gen.batch):
        try:
            records = runner.run(batch)
        except Exception as exc:  # one failing batch must not end the run
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ids = [e.id for e in batch]
            report.failed.append((ids, msg))
            tqdm.write(f"error: batch {ids[0]}..{ids[-1]} failed: {msg}", file=sys.stderr)
            bar.update(len(batch))
            continue
        for r in records:
            writer.commit(r)
        report.done += len(records)
        bar.update(len(records))
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{report.done / max(elapsed, 1e-9):.2f} img/s")
    bar.close()
    report.seconds = time.perf_counter() - t0
    writer.finalize()
    return report


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"`--shard` has to be I/N (e.g. 0/4) but is {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"`--shard` I/N needs 0 <= I < N but is {text!r}")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    from pccfast.cli.common import add_config_arguments, add_label_set_argument

    p = argparse.ArgumentParser(
        prog="python -m pccfast.generate",
        description="Generate a labelled segmentation dataset (VOC layout) from text prompts with Stable Diffusion "
        "and PCC segmentation. Re-running the same command resumes where it stopped.",
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
    add_label_set_argument(p)
    m = p.add_argument_group("model and diffusion")
    m.add_argument("--model", default=DEFAULT_MODEL, help="diffusers Stable Diffusion 1.x/2.x checkpoint: hub id or "
                   "local folder, or 'tiny' for the built-in random test model (default: %(default)s)")
    m.add_argument("--steps", type=int, default=80, help="denoising steps (default: %(default)s)")
    m.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    m.add_argument("--height", type=int, default=512, help="image height, multiple of 8 (default: %(default)s)")
    m.add_argument("--width", type=int, default=512, help="image width, multiple of 8 (default: %(default)s)")
    m.add_argument("--seed", type=int, default=2024, help="prompt i gets seed + i, whatever the batch (default: %(default)s)")
    m.add_argument("--batch", type=int, default=8, help="prompts per UNet call (default: %(default)s)")
    m.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    m.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model precision (default: float16 on CUDA, float32 on the CPU)")
    s = p.add_argument_group("scale-out")
    s.add_argument("--shard", default=None, help="I/N: take the deterministic I-th of N parts of the prompts "
                   "(for job arrays writing into one directory; combine with python -m pccfast.merge)")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="spread batches over Ray workers: no ADDRESS starts a local Ray instance, 'auto' joins the "
                   "running cluster (needs pip install 'pccfast[ray]')")
    s.add_argument("--workers", type=int, default=None,
                   help="Ray workers (default: one per visible GPU; on a CPU-only host 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from pccfast.cli.common import config_from_args, fail
    from pccfast.data.prompts import PromptError, builtin_prompts, read_prompts

    args = build_parser().parse_args(argv)
    try:
        label_set = get_label_set(args.label_set)
        cfg = config_from_args(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype or ("float16" if torch.device(device).type == "cuda" else "float32")
        gen = GenerationConfig(model=args.model, steps=args.steps, guidance=args.guidance, height=args.height,
                               width=args.width, seed=args.seed, device=device, dtype=dtype, batch=args.batch,
                               jpeg_quality=args.jpeg_quality)
        shard = parse_shard(args.shard)
        if args.start < 0:
            raise ValueError(f"`--start` has to be >= 0 but is {args.start}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"`--limit` has to be >= 1 but is {args.limit}")
        if args.prompts:
            entries = read_prompts(args.prompts, label_set, start=args.start, limit=args.limit)
        else:
            entries = builtin_prompts(label_set)[args.start:]
            entries = entries if args.limit is None else entries[: args.limit]
        entries = select_shard(entries, shard)
        writer = DatasetWriter(args.out, label_set, save_blocky=args.save_blocky, save_captures=args.save_captures,
                               shard=shard, jpeg_quality=args.jpeg_quality)
    except (ValueError, PromptError, FileNotFoundError) as exc:
        fail(str(exc))
    try:
        report = _run(args, entries, gen, cfg, label_set, writer)
    except KeyboardInterrupt:
        print(f"interrupted; finished images are kept in {args.out}: run the same command again to resume",
              file=sys.stderr)
        return 130
    print(
        f"{report.done} images written, {report.skipped} already done, {sum(len(i) for i, _ in report.failed)} failed"
        f" -> {args.out}",
        file=sys.stderr,
    )
    for ids, msg in report.failed:
        print(f"failed: {', '.join(ids)}: {msg}", file=sys.stderr)
    return 1 if report.failed else 0


def _run(args, entries, gen, cfg, label_set, writer) -> GenerationReport:
    from pccfast.cli.common import fail

    if args.ray is not None:
        from pccfast.runs.ray import RayRunError, run_ray

        try:
            report = run_ray(entries, gen, cfg, label_set, writer, address=args.ray, workers=args.workers,
                             progress=not args.no_progress)
        except (ImportError, RayRunError, ConnectionError, ValueError) as exc:  # no Ray, no cluster, no worker
            fail(str(exc))
    else:
        try:
            report = run_generation(entries, gen, cfg, label_set, writer, progress=not args.no_progress)
        except ModelLoadError as exc:
            fail(str(exc))
    return report


if __name__ == "__main__":
    sys.exit(main())
