"""The generate step: prompts -> diffusion with capture -> labeller -> written samples.

Each batch of prompts goes through one diffusers call with pccfast's capture processors
installed (``process``); the captured tensors go straight to the labeller on the same device
(``finish``, which the local loop runs on its writer thread while the next batch diffuses); the image,
mask (and optionally blocky mask and capture file) are written atomically by a
:class:`~pccfast.data.writer.SampleWriter`. :func:`run_generation` drives it through the run
engine (this process or Ray); finished ids are skipped, so re-running resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass

import torch

from pccfast.core.config import PCCConfig
from pccfast.core.dd import LabelerChoice
from pccfast.core.labelset import LabelSet
from pccfast.data.layout import file_prefix
from pccfast.data.manifest import Manifest
from pccfast.data.shards import DEFAULT_SHARD_SIZE, ShardStore, ShardWriter, check_format
from pccfast.data.writer import SampleWriter
from pccfast.diffusion.settings import GenerationConfig
from pccfast.runs.engine import Prepared, run_local
from pccfast.runs.report import RunReport

__all__ = ["GenerateStep", "run_generation"]


@dataclass
class _Made:
    """A processed batch, on the host: ready to be encoded and written."""

    seeds: list
    images: object  # (B, H, W, 3) uint8 numpy
    masks: object  # (B, H, W) uint8 numpy
    blocky: object  # (B, H, W) uint8 numpy or None
    captures: list  # per item: dict for write_capture, or None
    seconds: float  # per item
    extra: object = None  # per item: {"mask_pcc": ..., "mask_dd": ...} (--save-all-labelers), else None


@dataclass
class _Diffused:
    """A diffused batch, still on the device: waiting for the labeller."""

    seeds: list
    capture: object  # CaptureOutput
    ready: object  # torch.cuda.Event recorded after the diffusion (CUDA), else None
    seconds: float  # for the batch


def _ready_event(device: torch.device):
    """An event on the current CUDA stream marking the end of this batch's work (None elsewhere)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


_SIDE_STREAMS: dict = {}  # CUDA device -> the labeller's stream


@contextlib.contextmanager
def _side_stream(device: torch.device, ready, tensors: tuple):
    """On CUDA, run the body on the labeller's own stream after ``ready``; ``tensors`` (made on
    the diffusion's stream) are marked as used there, so the allocator does not hand their
    memory to the next batch too early. Elsewhere, nothing."""
    if device.type != "cuda":
        yield
        return
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    stream.wait_event(ready)
    for t in tensors:
        t.record_stream(stream)
    with torch.cuda.stream(stream):
        yield


class GenerateStep:
    """Holds one loaded pipeline; turns a batch of prompt entries into written samples.

    Used by the local loop and by each Ray worker (built there by ``make_step(device)``).
    """

    name = "generate"

    def __init__(self, settings: GenerationConfig, cfg: PCCConfig, label_set: LabelSet, writer: SampleWriter,
                 pipe=None, compile: "bool | str" = False, labeling: "LabelerChoice | None" = None):
        from pccfast.diffusion.pipeline import load_pipeline

        from pccfast.core.seeding import SeedingCache

        self.settings, self.cfg, self.label_set, self.writer = settings, cfg, label_set, writer
        self.compile = compile  # torch.compile the UNet (a backend name, True for inductor, False)
        self.labeling = labeling or LabelerChoice()  # pcc, dd or fused (core.dd), and whether both are kept
        self.cache = SeedingCache()  # k-means++ draws kept across the run's batches (same results, less work)
        self.pipe = pipe if pipe is not None else load_pipeline(settings.model, device=settings.device,
                                                                dtype=settings.torch_dtype, label_set=label_set)
        from pccfast.diffusion.adapters import adapter_for
        from pccfast.diffusion.dit_adapters import DIT_FAMILIES, check_family_options

        adapter = adapter_for(self.pipe)
        if pipe is None:  # the family's size rule (SDXL: multiples of 16) once, not per batch
            adapter.check_size(settings.height, settings.width)
        # what the family cannot run (DD on a DiT, --feature-blocks out of range, ...): one line, not per batch
        check_family_options(adapter.family, feature_blocks=settings.feature_blocks, needs_dd=self.labeling.needs_dd,
                             labeler=self.labeling.labeler, save_all=self.labeling.save_all,
                             scheduler=settings.scheduler, negative_prompt=settings.negative_prompt is not None,
                             transformer=adapter.denoiser if adapter.family in DIT_FAMILIES else None)

    @classmethod
    def factory(cls, settings: GenerationConfig, cfg: PCCConfig, label_set: LabelSet, writer: SampleWriter,
                compile: "bool | str" = False, labeling: "LabelerChoice | None" = None):
        """``make_step(device)`` for the run engine (picklable, for Ray)."""
        return functools.partial(_build, cls, settings, cfg, label_set, writer, compile, labeling)

    def prepare(self, entries: list) -> Prepared:
        return Prepared(list(entries))  # prompts need no reading

    @torch.no_grad()
    def process(self, prepared: Prepared) -> _Diffused:
        """The diffusion with capture (on the device); the labeller runs in :meth:`finish`."""
        from pccfast.diffusion.generation import generate_with_capture

        t0 = time.perf_counter()
        entries, s = prepared.items, self.settings
        seeds = [s.seed + e.index for e in entries]
        cap = generate_with_capture(
            self.pipe, [e.prompt for e in entries], [list(e.classes) for e in entries], self.label_set, seeds,
            steps=s.steps, guidance=s.guidance, height=s.height, width=s.width, cfg=self.cfg, compile=self.compile,
            scheduler=s.scheduler, negative_prompt=negative_prompts(entries, s),
            dd=self.labeling.dd if self.labeling.needs_dd else None,
            feature_blocks=s.feature_blocks,
        )
        return _Diffused(seeds, cap, _ready_event(cap.images.device), time.perf_counter() - t0)

    @torch.no_grad()
    def finish(self, prepared: Prepared, diffused: _Diffused) -> _Made:
        """Label the batch and copy it to the host. The local loop runs this on its writer
        thread while the next batch diffuses; on CUDA on a stream of its own, which waits for
        this batch's diffusion only (an event), not for the next batch's kernels queued since."""
        from pccfast.core.dd import present_classes, run_labeler

        t0 = time.perf_counter()
        entries, s, cap, seeds = prepared.items, self.settings, diffused.capture, diffused.seeds
        dd_in = tuple(t for t in (cap.dd_affinity, cap.dd_class_attention) if t is not None)
        with _side_stream(cap.images.device, diffused.ready, (cap.images, cap.features, cap.class_attention) + dd_in):
            present = present_classes([list(e.classes) for e in entries], self.label_set, cap.images.device)
            res = run_labeler(self.labeling, cap.images, present, features=cap.features.float(),
                              class_attention=cap.class_attention.float(), dd_affinity=cap.dd_affinity,
                              dd_class_attention=cap.dd_class_attention, cfg=self.cfg,
                              return_blocky=self.writer.save_blocky, cache=self.cache)
            images = cap.images.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()  # (B, H, W, 3)
            masks = res.mask.cpu().numpy()  # (B, H, W)
            blocky = res.blocky_full.cpu().numpy() if res.blocky_full is not None else None  # (B, H, W)
            extra = None
            if self.labeling.save_all:
                pcc, dd = res.pcc.cpu().numpy(), res.dd.cpu().numpy()  # (B, H, W) each
                extra = [{"mask_pcc": pcc[i], "mask_dd": dd[i]} for i in range(len(entries))]
            captures = [None] * len(entries)
            if self.writer.save_captures:
                captures = [
                    dict(features=cap.features[i].cpu(), class_attention=cap.class_attention[i].cpu(),
                         label_set=self.label_set, prompt=e.prompt, classes=list(e.classes), seed=seeds[i],
                         model=s.model, steps=s.steps, image=cap.images[i].cpu(), halves=cap.halves,
                         **({} if cap.dd_affinity is None else dict(
                             dd_affinity=cap.dd_affinity[i].cpu(), dd_class_attention=cap.dd_class_attention[i].cpu())))
                    for i, e in enumerate(entries)
                ]
        seconds = diffused.seconds + time.perf_counter() - t0
        return _Made(seeds, images, masks, blocky, captures, seconds / len(entries), extra)

    def write(self, prepared: Prepared, made: _Made) -> tuple[list[dict], list]:
        records, failures = [], []
        s = self.settings
        for i, e in enumerate(prepared.items):
            record = dict(id=e.id, index=e.index, **sample_record(e, s), seconds=round(made.seconds, 4))
            try:
                more = {} if made.extra is None else {"extra_masks": made.extra[i]}  # (--save-all-labelers, VOC)
                records.append(self.writer.write_files(e.id, made.images[i], made.masks[i],
                                                       None if made.blocky is None else made.blocky[i],
                                                       made.captures[i], record=record, **more))
            except OSError as exc:
                failures.append((e.id, f"cannot write the files of {e.id} in {self.writer.out}: {exc.strerror or exc}"))
        self.writer.end_batch()  # (a tar shard is a complete archive on disk before its records are committed)
        return records, failures


# labeller settings that choose how the work runs, not what it gives (same masks either way)
EXECUTION_FIELDS = frozenset({"kmeans_backend", "components_backend", "cleanup_backend", "kmeans_check_every"})


def negative_prompts(entries: list, settings: GenerationConfig):
    """The batch's negative prompts: each entry's own (prompt files' ``negative_prompt``), else
    the run's ``--negative-prompt``; None when no entry has one (the pipeline's empty prompt),
    else one text per entry ("" for those without)."""
    texts = [e.negative_prompt if getattr(e, "negative_prompt", None) is not None else settings.negative_prompt
             for e in entries]
    return None if all(t is None for t in texts) else ["" if t is None else t for t in texts]


def sample_record(entry, settings: GenerationConfig) -> dict:
    """What defines one sample, as its manifest record carries it (and resume compares). The
    scheduler and negative prompt appear only when set, so older datasets' records still match."""
    negative = getattr(entry, "negative_prompt", None)
    negative = settings.negative_prompt if negative is None else negative
    extra = {} if settings.scheduler is None else {"scheduler": settings.scheduler}
    if negative is not None:
        extra["negative_prompt"] = negative
    return dict(prompt=entry.prompt, classes=list(entry.classes), seed=settings.seed + entry.index,
                model=settings.model, steps=settings.steps, height=settings.height, width=settings.width, **extra)


def defining_settings(settings: GenerationConfig, cfg: PCCConfig, label_set: LabelSet, prompts: str,
                      jpeg_quality: int, labeling: "LabelerChoice | None" = None, append_classes: bool = False) -> dict:
    """What defines every sample of a run (``run.json``): not the batch size, workers, device
    or the labeller's backends, which choose how, not what. A run with another labeller than
    PCC records it (``labeler``, Dataset Diffusion's constants ``dd``), and ``append_classes``
    when the prompts carry their class names; a default run's ``run.json`` is as before."""
    labeller = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_FIELDS}
    if labeling is not None and labeling.labeler != "pcc":
        labeller = dict(labeller, labeler=labeling.labeler, dd=dataclasses.asdict(labeling.dd))
    if append_classes:
        labeller = dict(labeller, append_classes=True)
    return dict(model=settings.model, dtype=settings.dtype, height=settings.height, width=settings.width,
                steps=settings.steps, guidance=settings.guidance, scheduler=settings.scheduler or "the model's own",
                **({} if settings.negative_prompt is None else {"negative_prompt": settings.negative_prompt}),
                seed=f"{settings.seed} + prompt index", label_set=label_set.to_json(), labeller=labeller,
                jpeg_quality=jpeg_quality, prompts=prompts,
                **({} if settings.feature_blocks is None else {"feature_blocks": settings.feature_blocks}))


def _build(cls, settings, cfg, label_set, writer, compile, labeling, device):
    from dataclasses import replace

    return cls(replace(settings, device=str(device)), cfg, label_set, writer, compile=compile, labeling=labeling)


def run_generation(
    entries: list,
    settings: GenerationConfig,
    cfg: PCCConfig,
    label_set: LabelSet,
    out: str,
    *,
    batch: int = 8,
    shard: tuple[int, int] | None = None,
    save_blocky: bool = False,
    save_captures: bool = False,
    jpeg_quality: int = 95,
    ray: str | None = None,
    workers: int | None = None,
    io_threads: int = 1,
    progress: bool = True,
    prompts: str = "given in memory",
    overwrite: bool = False,
    compile: "bool | str" = False,
    pipe=None,
    make_step=None,
    format: str = "voc",
    shard_size: int = DEFAULT_SHARD_SIZE,
    labeling: "LabelerChoice | None" = None,
    append_classes: bool = False,
) -> RunReport:
    """Generate ``entries`` (already sharded) into dataset ``out``, locally or on Ray.

    Args:
        entries: prompt entries (``id``, ``index``, ``prompt``, ``classes``).
        settings, cfg, label_set: diffusion settings, labeller settings, label set.
        batch: prompts per diffusion call.
        shard: (I, N) of a sharded run (its own manifest and plan), or None.
        ray: None runs in this process; "local", "auto" or an address runs on Ray.
        workers: Ray workers (default one per GPU, else 1).
        io_threads: 0 writes in line; 1 writes a batch's files while the next one diffuses.
        prompts: where the prompts come from, for ``run.json`` (a prompt file's digest).
        overwrite: redo the samples whose records differ from this run's (settings or prompts
            changed) instead of refusing the run.
        compile: run a ``torch.compile``-d UNet (True: inductor; or a backend name); the
            capture compiles three graphs once, not one per step.
        pipe: an already loaded pipeline to use in this process (instead of loading ``settings.model``).
        make_step: replaces :meth:`GenerateStep.factory` (tests).
        format: ``voc`` (files in folders) or ``webdataset`` (tar shards, :mod:`pccfast.data.shards`).
        shard_size: samples per tar (webdataset).
        labeling: the labeller (``core.dd.LabelerChoice``: pcc, dd or fused; ``save_all`` also
            writes SegmentationClassPCC/ and SegmentationClassDD/, VOC layout only); None: PCC.
        append_classes: Dataset Diffusion's prompt convention: each prompt gets "; " and its
            class names appended (the prompt recorded in the manifest is the one used).
    """
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"`jpeg_quality` has to lie in 1..100 but is {jpeg_quality}")
    check_format(out, format, ("voc", "webdataset"))
    labeling = labeling or LabelerChoice()
    if labeling.save_all and format != "voc":
        raise ValueError(f"`save_all_labelers` writes SegmentationClassPCC/ and SegmentationClassDD/ folders, so it "
                         f"needs format 'voc' but the format is {format!r}")
    if append_classes:
        from pccfast.diffusion.dd_capture import append_classes as _append

        entries = [dataclasses.replace(e, prompt=_append(e.prompt, list(e.classes), label_set)) for e in entries]
    store = (ShardStore if format == "webdataset" else Manifest)(
        out, label_set, shard,
        defining=defining_settings(settings, cfg, label_set, prompts, jpeg_quality, labeling, append_classes),
        expected={e.id: sample_record(e, settings) for e in entries}, overwrite=overwrite)
    options = dict(save_blocky=save_blocky, save_captures=save_captures, jpeg_quality=jpeg_quality)
    writer = (ShardWriter(out, label_set, shard_size=shard_size, prefix=file_prefix(shard), **options)
              if format == "webdataset" else SampleWriter(out, label_set, **options))
    if make_step is None and pipe is not None:
        make_step = lambda device: GenerateStep(settings, cfg, label_set, writer, pipe=pipe, compile=compile,  # noqa: E731
                                                labeling=labeling)
    make_step = make_step or GenerateStep.factory(settings, cfg, label_set, writer, compile, labeling)
    if ray is None:
        return run_local(make_step, entries, store, batch=batch, device=settings.device, io_threads=io_threads,
                         progress=progress, desc="generate")
    from pccfast.runs.ray import run_ray

    return run_ray(make_step, entries, store, batch=batch, device=settings.device, address=ray, workers=workers,
                   progress=progress, desc="generate")
