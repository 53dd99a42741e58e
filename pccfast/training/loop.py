"""The training run: a DeepLabv3 on a (synthetic) dataset, evaluated on a validation set.

``train(...)`` runs in one process or under ``torchrun`` (one process per GPU, DDP with
synchronised batch norm). A run lives in its folder (names in :data:`RUN_FILES`):

- ``last.pt``: everything needed to go on (iteration, weights, optimiser, gradient scaler,
  EMA weights, the recipe), written atomically every ``checkpoint_every`` iterations, at
  Ctrl-C and at the end; running the same command again resumes from it. Data order,
  augmentation and dropout derive from ``(seed, iteration)`` and the learning rate from the
  iteration, so a resumed run ends with the same weights as one that was never stopped
  (bit-identical on the CPU);
- ``best.pt``: the weights (EMA ones with ``ema_decay``) of the best validation mIoU;
- ``log.jsonl``: one record per ``log_every`` iterations (loss, lr, img/s) and per evaluation
  (mIoU, pixel accuracy, per-class IoU); ``curves.png``: loss and mIoU over iterations;
- ``train.json``: the recipe, the data and the model, for the reader.

Same results per global batch under DDP: rank r of W takes slots ``r*B/W .. (r+1)*B/W`` of
each global batch of B samples, batch norm statistics are synchronised, and each rank's loss
is divided by the global count of labelled pixels (times W, as DDP averages gradients), so
the update is the single-process one up to dropout masks (seeded per rank) and the order of
float sums.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pccfast.core.labelset import label_set_from_dict
from pccfast.data.fileio import append_line, atomic_write, atomic_write_bytes, check_writable, read_jsonl
from pccfast.data.layout import TRAIN_RUN_FILES
from pccfast.runs.progress import Progress
from pccfast.tools.evaluate import EvalReport, confusion_matrix
from pccfast.training.datasets import EvalSamples, TrainSamples, find_pairs
from pccfast.training.models import build_model
from pccfast.training.plot import plot_curves
from pccfast.training.recipe import RUN_DEFINING, TrainConfig

__all__ = ["RUN_FILES", "TrainResult", "train", "segmentation_loss", "evaluate_model", "load_checkpoint_model",
           "Distributed"]

RUN_FILES = TRAIN_RUN_FILES  # names of the run folder's files (data.layout)
CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """How a run ended."""

    iteration: int  # iterations done
    best_miou: float | None  # best validation mIoU (None without --val)
    last_miou: float | None  # mIoU of the last evaluation
    resumed_from: int  # iteration the run started from (0 = fresh)
    out: str  # the run folder


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0


def segmentation_loss(out: dict, target: torch.Tensor, aux_weight: float, ignore_index: int,
                      normalizer: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the main (and auxiliary) logits, summed over labelled pixels and divided
    by ``normalizer``.

    Args:
        out: ``{"out": (B, C, H, W)[, "aux": (B, C, H, W)]}`` logits.
        target: (B, H, W) long labels; ``ignore_index`` pixels do not count.
        normalizer: () float, the number of labelled pixels the mean is taken over.
    Returns: () float32 loss.
    """
    loss = F.cross_entropy(out["out"].float(), target, ignore_index=ignore_index, reduction="sum")
    if aux_weight and "aux" in out:
        loss = loss + aux_weight * F.cross_entropy(out["aux"].float(), target, ignore_index=ignore_index,
                                                   reduction="sum")
    return loss / normalizer


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, classes, ignore_index: int, device: torch.device,
                   dist: Distributed | None = None) -> EvalReport:
    """Per-class IoU and mIoU of ``model``'s argmax on ``loader``'s (image, mask) batches, with
    the VOC convention of :mod:`pccfast.tools.evaluate`; under DDP the counts of all ranks are
    summed."""
    was_training = model.training
    model.eval()
    c = len(classes)
    cm = torch.zeros(c, c + 1, dtype=torch.int64, device=device)
    n = torch.zeros((), dtype=torch.int64, device=device)
    for image, mask in loader:
        image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        pred = model(image)["out"].argmax(1)  # (B, H, W)
        cm += confusion_matrix(pred, mask, c, ignore_index)
        n += image.shape[0]
    if dist is not None and dist.world > 1:
        torch.distributed.all_reduce(cm)
        torch.distributed.all_reduce(n)
    model.train(was_training)
    return EvalReport.from_confusion(cm.cpu(), classes, int(n))


def _digest(ids) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return (seed * 1_000_003 + iteration * 7_919 + rank * 104_729 + 17) % (2 ** 63)


def _save(path: str, obj: dict) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def load_checkpoint_model(path: str, device: torch.device, implementation: str = "auto"):
    """The model of a ``last.pt``/``best.pt`` (EMA weights when the run had them), its config and
    its label set: ``(model, cfg, label_set)``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"`CKPT` {path!r}: no such file") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"`CKPT` {path!r} is not a pccfast training checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"`CKPT` {path!r} is not a pccfast training checkpoint (no config and model in it)")
    cfg = TrainConfig.from_json(ckpt["config"])
    model, _ = build_model(cfg.arch, len(ckpt["classes"]), "none", implementation=implementation)
    model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    return model.to(device).eval(), cfg, label_set_from_dict(ckpt["label_set"], path)


class _Stop:
    """Ctrl-C (SIGINT) and SIGTERM set a flag that the loop reads between iterations, so the
    checkpoint written on the way out is always that of a finished step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _positions(start: int, iters: int, batch: int, dist: Distributed):
    """The sample positions of this rank for iterations ``start..iters-1``, one list per step."""
    per = batch // dist.world
    for it in range(start, iters):
        base = it * batch + dist.rank * per
        yield list(range(base, base + per))


def _loader(dataset, batch_sampler, workers: int, pin: bool):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
                                       persistent_workers=False)


def _refuse_other_run(path: str, have: dict, want: dict) -> None:
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            raise ValueError(f"{path}: the run was made with {key} {have.get(key)!r} but this one has "
                             f"{want.get(key)!r}: use another --out to start a new run")


def train(dataset: str, out: str, cfg: TrainConfig, label_set, *, val: str | None = None,
          backbone_weights: str = "auto", device: torch.device | str = "cpu", workers: int = 2,
          progress: bool = True, implementation: str = "auto", log=print) -> TrainResult:
    """Train (or resume training) into the run folder ``out``; see the module docstring.

    Args:
        dataset: the training dataset folder; val: the validation folder (None: no evaluation).
        cfg: the recipe; label_set: the classes (a :class:`~pccfast.core.labelset.LabelSet`).
        backbone_weights: ``auto``, ``none`` or a weights file (:func:`~pccfast.training.models.build_model`).
        device: where to train (under torchrun: ``cuda`` means this rank's GPU).
        workers: data-loading processes (0: in this process).
        log: where the lines for the user go (the model chosen, evaluations).
    Raises: ValueError (one line) for bad folders, weights or a run folder of another run.
    """
    dist = Distributed.from_env()
    device = torch.device(device)
    if dist.world > 1:
        if cfg.batch % dist.world:
            raise ValueError(f"`batch` has to be divisible by the {dist.world} ranks but is {cfg.batch}")
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type != "cuda" and cfg.batch // dist.world < 2:  # on GPUs batch norm is synchronised: 1 is enough
        raise ValueError(f"`batch` {cfg.batch} leaves 1 image per CPU rank; batch norm needs 2")
    say = log if dist.main else (lambda *_: None)
    classes, ignore = list(label_set.classes), int(label_set.ignore_index)
    ls_json = label_set.to_json()
    pairs = find_pairs(dataset, "train", "DATASET")
    if cfg.max_pairs is not None and len(pairs) > cfg.max_pairs:
        say(f"using the first {cfg.max_pairs:,} of {len(pairs):,} pairs (in id order; the recipe's max_pairs)")
        pairs = pairs[: cfg.max_pairs]
    val_pairs = find_pairs(val, "val", "--val") if val else []
    paths = {k: os.path.join(out, v) for k, v in RUN_FILES.items()}
    if dist.main:
        check_writable(out)
    run_id = {"dataset_ids": _digest(p.id for p in pairs), "pairs": len(pairs), "classes": classes,
              **{k: v for k, v in cfg.to_json().items() if k in RUN_DEFINING}}

    ckpt = None
    if os.path.exists(paths["last"]):
        try:
            ckpt = torch.load(paths["last"], map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{paths['last']}: cannot be read ({type(e).__name__}); remove it to start again") from None
        _refuse_other_run(paths["last"], ckpt["run"], json.loads(json.dumps(run_id)))
    use_amp = cfg.amp and device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model, info = build_model(cfg.arch, len(classes), "none" if ckpt else backbone_weights,
                              implementation=implementation)
    why = " (torchvision does not import here)" if info.implementation != "torchvision" and implementation == "auto" else ""
    say(f"model: {info.arch}, {info.implementation} implementation{why}; "
        f"weights: {'from ' + paths['last'] if ckpt else info.weights}")
    if cfg.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    model.to(device)
    ema = None
    if cfg.ema_decay is not None:
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": backbone, "lr_mult": cfg.backbone_lr_mult}, {"params": heads, "lr_mult": 1.0}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start, best, history = 0, None, []
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start, best = int(ckpt["iteration"]), ckpt.get("best_miou")
        say(f"resuming {out} at iteration {start:,} of {cfg.iters:,}")
    if dist.main:
        # records past the checkpoint (a run killed after it) are dropped: they are done again
        history = [r for r in read_jsonl(paths["log"]) if r.get("iter", 0) <= start]
        atomic_write_bytes(paths["log"], "".join(json.dumps(r) + "\n" for r in history).encode())
        info_json = {"config": cfg.to_json(), "dataset": os.path.abspath(dataset), "pairs": len(pairs),
                     "val": os.path.abspath(val) if val else None, "val_pairs": len(val_pairs), "classes": classes,
                     "model": {"arch": info.arch, "implementation": info.implementation, "weights": info.weights},
                     "world_size": dist.world, "torch": torch.__version__}
        atomic_write_bytes(paths["info"], (json.dumps(info_json, indent=1) + "\n").encode())
    net = model
    if dist.world > 1:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place: the same parameters and buffers
        else:
            say("batch norm statistics are per rank: SyncBatchNorm needs GPUs, so CPU ranks do not match one process")
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = ema if ema is not None else model

    def checkpoint(iteration: int) -> None:
        if dist.main:
            _save(paths["last"], {"format": CHECKPOINT_FORMAT, "iteration": iteration, "run": run_id,
                                  "config": cfg.to_json(), "classes": classes, "label_set": ls_json,
                                  "model": model.state_dict(),
                                  "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                  "ema": ema.state_dict() if ema is not None else None, "best_miou": best})

    val_loader = None
    if val_pairs:
        val_loader = _loader(EvalSamples(val_pairs[dist.rank::dist.world], len(classes), ignore),
                             [[i] for i in range(len(val_pairs[dist.rank::dist.world]))], min(workers, 2),
                             device.type == "cuda")
    last_miou = None

    def evaluate(iteration: int) -> None:
        nonlocal best, last_miou
        rep = evaluate_model(eval_model, val_loader, classes, ignore, device, dist)
        last_miou = rep.miou
        say(f"iteration {iteration:,}: val mIoU {100 * rep.miou:.2f}  pixel acc {100 * rep.pixel_acc:.2f}  "
            f"({rep.n_images} images{', EMA weights' if ema is not None else ''})")
        if not dist.main:
            return
        rec = {"iter": iteration, "val_miou": rep.miou, "val_pixel_acc": rep.pixel_acc,
               "val_iou": {c: (None if math.isnan(v) else float(v)) for c, v in zip(classes, rep.iou)}}
        append_line(paths["log"], json.dumps(rec))
        history.append(rec)
        if best is None or rep.miou > best:
            best = rep.miou
            _save(paths["best"], {"format": CHECKPOINT_FORMAT, "iteration": iteration, "config": cfg.to_json(),
                                  "classes": classes, "label_set": ls_json, "model": eval_model.state_dict(), "ema": None,
                                  "miou": rep.miou})
        plot()

    def plot() -> None:
        if dist.main:
            loss = [(r["iter"], r["loss"]) for r in history if "loss" in r]
            miou = [(r["iter"], r["val_miou"]) for r in history if "val_miou" in r]
            atomic_write_bytes(paths["plot"], plot_curves(loss, miou, cfg.iters))

    if start >= cfg.iters:
        say(f"{out}: the run is complete ({start:,} iterations); nothing to do")
        return TrainResult(start, best, None, start, out)
    data = TrainSamples(pairs, len(classes), crop=cfg.crop, scale=(cfg.scale_min, cfg.scale_max), flip=cfg.flip,
                        seed=cfg.seed, ignore_index=ignore)
    batches = iter(_loader(data, list(_positions(start, cfg.iters, cfg.batch, dist)), workers, device.type == "cuda"))
    # counts images; those of the iterations done before a resume show as "already done"
    bar = Progress((cfg.iters - start) * cfg.batch, "train", enabled=progress and dist.main, skipped=start * cfg.batch)
    net.train()
    if ema is not None:
        ema_state, model_state = list(ema.state_dict().values()), list(model.state_dict().values())
    running = torch.zeros((), device=device)
    t_log, n_log = time.perf_counter(), 0
    it, between_steps = start, False
    with _Stop() as stop:
        try:
            for it in range(start, cfg.iters):
                if stop.requested:
                    between_steps = True
                    raise KeyboardInterrupt
                try:
                    image, mask = next(batches)
                except Exception as e:  # noqa: BLE001
                    if stop.requested:  # Ctrl-C reached the loader's workers too: stop between steps
                        between_steps = True
                        raise KeyboardInterrupt from None
                    if isinstance(e, ValueError):  # a bad mask or image, named by the worker
                        last = str(e).strip().splitlines()[-1]
                        raise ValueError(last[len("ValueError: "):] if last.startswith("ValueError: ") else last) from None
                    raise
                image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
                lr = cfg.lr_at(it)
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_mult"]
                torch.manual_seed(_iteration_seed(cfg.seed, it, dist.rank))  # dropout masks
                labelled = (mask != ignore).sum().to(torch.float32)
                if dist.world > 1:
                    torch.distributed.all_reduce(labelled)
                    labelled = labelled / dist.world
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    out_ = net(image)
                loss = segmentation_loss(out_, mask, cfg.aux_weight, ignore, labelled.clamp_min(1.0))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip is not None:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                if ema is not None:  # weights and batch-norm statistics averaged alike (counters copied)
                    with torch.no_grad():
                        e = [t for t in ema_state if t.is_floating_point()]
                        m = [t for t in model_state if t.is_floating_point()]
                        torch._foreach_lerp_(e, m, 1.0 - cfg.ema_decay)
                        for et, mt in zip(ema_state, model_state):
                            if not et.is_floating_point():
                                et.copy_(mt)
                running += loss.detach()
                n_log += 1
                done = it + 1
                bar.advance(cfg.batch)
                if done % cfg.log_every == 0 or done == cfg.iters:
                    mean = float(running) / n_log  # the one host read per log interval
                    now = time.perf_counter()
                    rate = n_log * cfg.batch / max(now - t_log, 1e-9)
                    rec = {"iter": done, "loss": mean, "lr": lr, "img_s": rate}
                    if dist.main:
                        append_line(paths["log"], json.dumps(rec))
                        history.append(rec)
                    bar.advance(0, extra=f"it {done:,}/{cfg.iters:,}, loss {mean:.4f}, lr {lr:.2e}")
                    running.zero_()
                    t_log, n_log = now, 0
                if done % cfg.checkpoint_every == 0 and done < cfg.iters:
                    checkpoint(done)
                if val_loader is not None and (done % cfg.eval_every == 0 or done == cfg.iters):
                    evaluate(done)
            it = cfg.iters
        except KeyboardInterrupt:
            bar.close()
            if between_steps:  # a second Ctrl-C mid-step keeps the last periodic checkpoint
                checkpoint(it)
                plot()
            raise
        finally:
            bar.close()
    checkpoint(cfg.iters)
    plot()
    return TrainResult(cfg.iters, best, last_miou, start, out)

