"""Atomic file writing and image/mask I/O (the edge of the package, not the core).

Every file pccfast writes goes through :func:`atomic_write`: it is written to a temporary
file in the same directory, flushed, fsync'ed and renamed over the target, so a run killed
at any moment leaves either the old file, the whole new file, or nothing.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import glob
import re
import shutil
import socket
import tempfile
import zlib

import numpy as np
from PIL import Image

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "save_mask_png",
    "save_image",
    "encode_mask_png",
    "encode_image",
    "load_image",
    "load_mask",
    "check_id",
    "append_line",
    "read_jsonl",
    "clean_stale_temps",
    "atomic_link_or_copy",
    "check_writable",
    "check_output_file",
    "write_output",
    "FILE_MODE",
    "remove_temps_of",
]


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


# what an ordinary open() gives a new file: 0666 less the umask (0644 under umask 022), so that
# a dataset on shared storage is readable by the training jobs of other accounts
FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Context manager yielding a file object; the target appears only if the block succeeds.

    The file gets the permissions an ordinary ``open()`` would give it (:data:`FILE_MODE`),
    not the 0600 of a temporary file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), suffix="-" + os.path.basename(path), dir=d)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _tmp_prefix() -> str:
    # host and pid in the name let a later run tell a dead writer's leftovers from a live one's
    return f".tmp-{socket.gethostname()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(directory: str) -> int:
    """Remove temporary files left in ``directory`` by killed writers of this host.

    Temporaries of live processes, and of other hosts (shared storage), are left alone.
    Returns how many were removed.
    """
    removed = 0
    if not os.path.isdir(directory):
        return 0
    host = socket.gethostname()
    for name in os.listdir(directory):
        if not name.startswith(f".tmp-{host}-"):
            continue
        rest = name[len(f".tmp-{host}-"):]
        pid = rest.split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed += 1
    return removed


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def append_line(path: str, line: str, *, fsync: bool = True) -> None:
    """Append one line (with fsync unless ``fsync=False``). A kill mid-write can leave at most
    one torn last line, which readers skip (see ``read_jsonl``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    with open(path, "ab+") as f:
        if f.tell() > 0:  # a torn last line (killed writer) must not swallow this record
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSON Lines file, skipping a torn (unparseable) line left by a crash."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def save_mask_png(path: str, mask: np.ndarray, palette: list[int]) -> None:
    """8-bit palette PNG. ``mask``: (H, W) uint8 label values; ``palette``: 768 ints."""
    atomic_write_bytes(path, encode_mask_png(mask, palette))


def encode_mask_png(mask: np.ndarray, palette: list[int]) -> bytes:
    """The bytes of :func:`save_mask_png`'s file (every layout stores these same bytes)."""
    if mask.ndim != 2:
        raise ValueError(f"`mask` has to be (H, W) but has shape {tuple(mask.shape)}")
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(palette)
    buf = io.BytesIO()
    # zlib's run-length strategy: label masks are long runs of one value, so it is about 2x
    # faster than the default strategy at the same size (the pixels are the same either way)
    img.save(buf, format="PNG", compress_type=zlib.Z_RLE)
    return buf.getvalue()


def save_image(path: str, image: np.ndarray, quality: int = 95) -> None:
    """RGB image (H, W, 3) uint8 to JPEG or PNG by the file's extension."""
    atomic_write_bytes(path, encode_image(image, quality, jpeg=path.lower().endswith((".jpg", ".jpeg"))))


def encode_image(image: np.ndarray, quality: int = 95, *, jpeg: bool = True) -> bytes:
    """The bytes of :func:`save_image`'s file: RGB (H, W, 3) uint8 as JPEG (or PNG)."""
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")
    buf = io.BytesIO()
    if jpeg:
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def load_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    with Image.open(path) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # RGB: no extra copy


def load_mask(path: str) -> np.ndarray:
    """(H, W) uint8 label values of a palette (or greyscale) PNG."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: a mask has to be a palette or greyscale PNG but has mode {im.mode}")
        return np.asarray(im)


_BAD_ID = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_id(value) -> str:
    """An image id as a safe file name; ValueError if it could leave the output folder."""
    s = str(value)
    if not s or s in (".", "..") or _BAD_ID.search(s) or s.startswith(".") or len(s) > 200:
        raise ValueError(
            f"id {s!r} is not a plain file name (no path separators, no leading '.', no control characters, 1-200 chars)"
        )
    return s


def _probe(directory: str) -> None:
    """Prove that files can be written in ``directory``: a temporary file, removed at once."""
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), suffix="-probe", dir=directory)
    os.close(fd)
    os.unlink(tmp)


def check_writable(directory: str) -> None:
    """Create ``directory`` (and parents) if needed and prove that files can be written in it
    (:func:`_probe`); OSError (``DIR: reason``) otherwise. Used before a run starts its work,
    so a read-only or full output fails at once, in one line."""
    try:
        os.makedirs(directory, exist_ok=True)
        _probe(directory)
    except OSError as e:
        raise OSError(e.errno, f"cannot write files here: {e.strerror or e}", directory) from None


def check_output_file(path: str, option: str) -> None:
    """Before any work: OSError (``FILE: reason``) unless ``path`` can be written as a new or
    replaced file in a folder that exists (:func:`_probe`), so a read-only or unwritable folder
    fails here and nothing is left behind; the folder is not created (a mistyped path should
    not make folders). ``option`` names the command-line option in the messages."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"`{option}` has to be a file name but is a folder", path)
    if not os.path.exists(folder):
        raise FileNotFoundError(errno.ENOENT, f"no such folder for `{option}` (create it first)", folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, f"not a folder, so `{option}` cannot be written inside it", folder)
    try:
        _probe(folder)
    except OSError as e:
        raise OSError(e.errno, f"cannot write `{option}` here: {e.strerror or e}", folder) from None


def write_output(path: str, write) -> None:
    """Run ``write()`` (an atomic write of ``path``: all or nothing); an OSError without a file
    name (a full disk) gets ``path``, so its line says which file failed."""
    try:
        write()
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise


def atomic_link_or_copy(src: str, dst: str) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link where the file system allows it, else a
    copy; through the same temporary-file naming as :func:`atomic_write`."""
    if os.path.abspath(src) == os.path.abspath(dst):
        return
    d = os.path.dirname(os.path.abspath(dst))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f"{_tmp_prefix()}link-{os.path.basename(dst)}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_temps_of(paths) -> int:
    """Remove the temporary files of :func:`atomic_write` for these targets, whoever wrote them
    (for a writer known to be dead, e.g. a killed Ray worker). Returns how many were removed."""
    n = 0
    for path in paths:
        d, name = os.path.split(path)
        for tmp in glob.glob(os.path.join(glob.escape(d), ".tmp-*-" + glob.escape(name))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
                n += 1
    return n
