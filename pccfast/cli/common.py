"""argparse helpers shared by pccfast's command-line tools.

- :func:`add_config_arguments` / :func:`config_from_args`: one ``--field-name`` option per
  :class:`~pccfast.config.PCCConfig` field; only options given on the command line override
  the reference defaults.
- :func:`add_device_arguments` / :func:`device_from_args` / :func:`dtype_from_args`.
- :func:`add_label_set_argument` / :func:`label_set_from_args`.
- :func:`add_scaleout_arguments` / :func:`check_scaleout_arguments`: ``--shard``, ``--ray``, ``--workers``.
- :func:`fail`: ``error: <one line>`` on stderr, exit status 2; :func:`report_run` (the summary
  and exit status of a run), :func:`interrupted` (Ctrl-C, exit status 130).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

import torch

from pccfast.core.config import PCCConfig
from pccfast.data.labelsets import get_label_set
from pccfast.core.labelset import LabelSet

__all__ = [
    "CONFIG_HELP",
    "add_config_arguments",
    "config_from_args",
    "add_device_arguments",
    "device_from_args",
    "dtype_from_args",
    "add_label_set_argument",
    "label_set_from_args",
    "positive_int",
    "run_settings",
    "fail",
    "report_error",
    "error_text",
    "add_scaleout_arguments",
    "add_run_arguments",
    "check_scaleout_arguments",
    "report_run",
    "run_and_report",
    "interrupted",
    "one_line_errors",
    "BROKEN_PIPE_STATUS",
]

# One line per PCCConfig field; the default is appended from the dataclass.
CONFIG_HELP = {
    "pca_components": "principal components kept per attention head",
    "pca_method": "PCA solver per head: 'lowrank' (randomised) or 'eigh' (exact, from the covariance)",
    "pca_oversample": "extra columns of the randomised PCA solver (q = components + oversample)",
    "pca_niter": "power iterations of the randomised PCA solver",
    "pca_seed": "seed of the randomised PCA solver",
    "cluster_ks": "k-means cluster counts on the attention features, comma-separated",
    "kmeans_max_iter": "maximum Lloyd iterations of k-means",
    "kmeans_tol": "k-means tolerance, relative to the mean feature variance",
    "kmeans_seed": "seed of the k-means++ initialisation",
    "kmeans_n_init": "k-means++ restarts (the lowest inertia is kept)",
    "kmeans_check_every": "the torch k-means reads its convergence on the host once every this many iterations",
    "kmeans_backend": "k-means implementation: 'auto' (the C kernel for CPU work when a C compiler is there, "
    "else torch), 'torch', 'native' (C kernel, CPU only) or 'cuml' (RAPIDS)",
    "connectivity": "pixel connectivity when clusters are split into pieces: 4 or 8",
    "components_backend": "connected-components implementation: 'auto' (C kernel on the CPU when it builds, "
    "else torch), 'torch', 'native' (C kernel, CPU only) or 'cupy' (RAPIDS)",
    "cleanup_backend": "morphological clean-up implementation: 'auto' (C kernel on the CPU when it builds, "
    "else torch), 'torch' or 'native' (C kernel, CPU only)",
    "thresholds": "class-map thresholds, comma-separated",
    "background_factor": "the background's threshold is this factor times each threshold",
    "vote_min_share": "share of the votes a pixel's majority label needs, else it is uncertain",
    "refine": "refine the blocky mask with the image (--no-refine: upsampled blocky mask)",
    "refine_k": "k-means clusters on the image's (R, G, B, x, y) points",
    "refine_position_range": "x and y of the refinement points are scaled to [0, this]",
    "min_piece_pixels": "image pieces smaller than this many pixels are pooled into one",
    "dominance_ratio": "a piece takes its most frequent label if it beats the runner-up by this factor",
    "erode_first": "clean-up: 3x3 erosions first",
    "dilate_iters": "clean-up: 3x3 dilations next",
    "erode_after": "clean-up: 3x3 erosions last",
    "band_dilations": "width (in 3x3 dilations) of the uncertain band around each class",
    "ignore_index": "label of uncertain pixels",
}


def _field_types() -> dict:
    return typing.get_type_hints(PCCConfig)


def _scalar_parser(kind):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"has to be {'an int' if kind is int else 'a number'} but is {text!r}") from None

    return parse


def _tuple_parser(kind):
    def parse(text: str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            if not parts:
                raise ValueError
            return tuple(kind(p) for p in parts)
        except ValueError:
            what = "ints" if kind is int else "numbers"
            raise argparse.ArgumentTypeError(f"has to be comma-separated {what} (e.g. 4,7,10) but is {text!r}") from None

    return parse


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser, title: str = "labeller settings (PCCConfig)") -> argparse._ArgumentGroup:
    """Add ``--<field-name>`` for every :class:`PCCConfig` field (default None = keep the
    config's value). Tuples are comma-separated (``--cluster-ks 4,7,10``); bools are
    ``--refine`` / ``--no-refine``. Returns the argument group."""
    group = parser.add_argument_group(title)
    hints = _field_types()
    defaults = PCCConfig()
    for f in dataclasses.fields(PCCConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f"{CONFIG_HELP.get(f.name, 'PCCConfig.' + f.name)} (default: {_show(getattr(defaults, f.name))})"
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            group.add_argument(flag, dest=f.name, type=_tuple_parser(inner), default=None,
                               metavar=("K,K,..." if inner is int else "T,T,..."), help=help_text)
        elif kind in (int, float):
            group.add_argument(flag, dest=f.name, type=_scalar_parser(kind), default=None,
                               metavar=("N" if kind is int else "X"), help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar="NAME", help=help_text)
    return group


def config_from_args(args: argparse.Namespace, base: PCCConfig | None = None) -> PCCConfig:
    """``base`` (default: the reference ``PCCConfig()``) with every option given on the
    command line applied. Raises ValueError (from PCCConfig's checks) on an invalid value."""
    base = PCCConfig() if base is None else base
    changes = {
        name: getattr(args, name)
        for name in PCCConfig.field_names()
        if getattr(args, name, None) is not None
    }
    return base.replace(**changes)


def add_device_arguments(parser: argparse.ArgumentParser, *, dtype: bool = True, default_dtype: str = "float32") -> None:
    """``--device`` (default: cuda if available, else cpu) and, with ``dtype``, ``--dtype``."""
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="torch device: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    if dtype:
        parser.add_argument("--dtype", default=default_dtype, choices=["float32", "float16", "bfloat16"],
                            help="floating-point precision (default: %(default)s)")


def device_from_args(args: argparse.Namespace) -> torch.device:
    """The device of ``--device``; ValueError if it cannot be used here."""
    name = getattr(args, "device", None)
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"`--device` has to be a torch device such as cpu, cuda or cuda:1 but is {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`--device` is {name!r} but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"`--device` is {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`--device` is {name!r} but MPS is not available here")
    return dev


def dtype_from_args(args: argparse.Namespace) -> torch.dtype:
    """The torch dtype of ``--dtype`` (float32 if the option is absent)."""
    return getattr(torch, getattr(args, "dtype", None) or "float32")


def add_label_set_argument(parser: argparse.ArgumentParser, default: str = "voc") -> None:
    """``--label-set NAME|FILE``: a built-in set (voc, coco) or a JSON/YAML label-set file."""
    parser.add_argument("--label-set", default=default, metavar="NAME|FILE",
                        help="label set: voc, coco, or a JSON/YAML file with 'classes' (background first) "
                        "and optional 'texts', 'palette', 'ignore_index' (default: %(default)s)")


def label_set_from_args(args: argparse.Namespace) -> LabelSet:
    """The :class:`LabelSet` of ``--label-set``; ValueError with a one-line message otherwise."""
    try:
        return get_label_set(args.label_set)
    except OSError as e:
        raise ValueError(f"`--label-set` {args.label_set!r} cannot be read: {e.strerror or e}") from None


def run_settings(args: argparse.Namespace) -> tuple[LabelSet, PCCConfig, torch.device]:
    """What every labelling command reads first: ``--label-set``, the labeller options and
    ``--device``; ValueError with one line for any of them."""
    return label_set_from_args(args), config_from_args(args), device_from_args(args)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"has to be a positive integer but is {text!r}")
    return value


def error_text(error: "str | BaseException") -> str:
    """One line for an error: an OSError as ``FILE: reason``, anything else by its message
    with its lines joined by '; '."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip())


def report_error(error: "str | BaseException", code: int = 2) -> int:
    """Print ``error: <one line>`` on stderr; returns ``code`` (default 2, as argparse) for ``main``."""
    print(f"error: {error_text(error)}", file=sys.stderr)
    return code


def fail(msg: "str | BaseException", code: int = 2) -> typing.NoReturn:
    """Print ``error: <one line>`` on stderr and exit with ``code`` (default 2, as argparse)."""
    raise SystemExit(report_error(msg, code))


def add_scaleout_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--shard I/N``, ``--ray [ADDRESS]`` and ``--workers N``: the run engine's scale-out options."""
    s = parser.add_argument_group("scale-out")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help=f"take the deterministic I-th of N parts of the {what} (for job arrays writing into one "
                   "directory; generate's shards are combined with python -m pccfast.merge)")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="spread batches over Ray workers: no ADDRESS starts a local Ray instance, 'auto' joins the "
                   "running cluster (needs pip install 'pccfast[ray]')")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray workers, with --ray (default: one per visible GPU; on a CPU-only host 1)")


def add_run_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """What every run command takes after its own options: scale-out (:func:`add_scaleout_arguments`),
    ``--no-progress`` and the labeller settings (:func:`add_config_arguments`)."""
    add_scaleout_arguments(parser, what)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (errors are still printed)")
    add_config_arguments(parser)


def check_scaleout_arguments(args: argparse.Namespace) -> None:
    """ValueError for scale-out options that cannot work together (before anything starts)."""
    if args.workers is not None and args.ray is None:
        raise ValueError(f"`--workers` {args.workers} needs --ray (without it the run uses this process only)")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"`--workers` has to be at least 1 but is {args.workers}")


def run_and_report(run: "typing.Callable[[], object]", what: str, out: str) -> int:
    """Run a command's work (``run() -> RunReport``) and report it: the exit status.

    A run that cannot start or go on (no model, no Ray, no cluster, no worker, a bad setting
    found late): one ``error:`` line and SystemExit(2), as :func:`fail`. Otherwise the summary,
    one line per failed item and 1 if any failed, else 0. Ctrl-C is the command's
    :func:`one_line_errors` (``resumable``): :func:`interrupted` with its ``--out``, 130."""
    from pccfast.runs.engine import RunError

    try:
        report = run()
    except (RunError, ImportError, ConnectionError, ValueError, OSError) as exc:
        fail(exc)
    return report_run(report, what, out)


def report_run(report, what: str, out: str) -> int:
    """Print a run's summary and one line per failed item on stderr; the exit status (1 if any failed)."""
    print(report.summary(what, out), file=sys.stderr)
    if report.failures:
        print(f"{len(report.failures)} failed:", file=sys.stderr)
        for _, msg in report.failures:
            print(f"  {msg}", file=sys.stderr)
    return 1 if report.failures else 0


def interrupted(out: str) -> int:
    """Ctrl-C: one line saying that the finished work is kept; exit status 130."""
    print(f"interrupted; finished work is kept in {out}: run the same command again to resume", file=sys.stderr)
    return 130


# 128 + SIGPIPE: what a shell reports for a command whose reader went away (``yes | head``); it
# only shows under ``set -o pipefail``, where it tells a script that the output was cut short
BROKEN_PIPE_STATUS = 141


def one_line_errors(main=None, *, resumable=None):
    """Decorator for a command's ``main(argv) -> int``: whatever escapes it ends in at most one
    line on stderr and an exit status, never a traceback. Use ``@one_line_errors``, or
    ``@one_line_errors(resumable=build_parser)`` for a command whose re-run resumes its ``--out``.

    - BrokenPipeError on standard output (``python -m pccfast.inspect DATASET | head``): nothing
      printed, exit status :data:`BROKEN_PIPE_STATUS` (141). Standard output is pointed at
      ``os.devnull`` first, so the interpreter's final flush prints no "Exception ignored". A
      broken pipe elsewhere, with standard output still open, is an OSError as below.
    - KeyboardInterrupt (Ctrl-C): the line ``interrupted``, exit status 130; with ``resumable``
      (the command's parser), :func:`interrupted` with the ``--out`` of ``argv``.
    - OSError not handled inside (permission denied, not a directory, no space left, read-only
      file system): ``error: FILE: reason`` (:func:`error_text`), exit status 2.

    SystemExit (argparse, :func:`fail`) passes through, after standard output is flushed; any
    other exception is a bug and keeps its traceback.
    """

    def decorate(func):
        import functools

        @functools.wraps(func)
        def wrapper(argv: "list[str] | None" = None) -> int:
            try:
                try:
                    return func(argv)
                finally:
                    if sys.stdout is not None:
                        sys.stdout.flush()  # a reader gone early shows here, not at interpreter exit
            except BrokenPipeError as exc:
                if not _stdout_closed():
                    return report_error(exc)
                _stdout_to_devnull()
                return BROKEN_PIPE_STATUS
            except KeyboardInterrupt:
                out = _resumable_out(resumable, argv)
                if out:
                    return interrupted(out)
                print("interrupted", file=sys.stderr)
                return 130
            except OSError as exc:
                return report_error(exc)

        return wrapper

    return decorate if main is None else decorate(main)


def _stdout_fd() -> "int | None":
    try:
        return sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # None, closed, or an in-memory stream (io.UnsupportedOperation)
        return None


def _stdout_closed() -> bool:
    """Whether standard output is a pipe (or socket) whose reader is gone; True where it cannot be told."""
    fd = _stdout_fd()
    if fd is None:
        return True
    try:
        import select

        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() on this platform
        return True


def _stdout_to_devnull() -> None:
    import os

    fd = _stdout_fd()
    if fd is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _resumable_out(build_parser, argv) -> "str | None":
    """The ``--out`` of ``argv`` by the command's parser (None without one, or if it cannot be read)."""
    if build_parser is None:
        return None
    try:
        args, _ = build_parser().parse_known_args(argv)
    except (SystemExit, Exception):
        return None
    return getattr(args, "out", None)
