"""WebDataset tar shards: the worker's writer and the driver's store of ``--format webdataset``.

Layout (names in :mod:`pccfast.data.layout`)::

    OUT/shards/<prefix>-NNNNNN.tar   <id>.jpg, <id>.png (palette mask, 255 = uncertain),
                                     <id>.json (the record), optional <id>.blocky.png, <id>.safetensors
    OUT/shards.json                  index: each tar's name, samples and bytes
    OUT/manifest.jsonl               the records, each with the ``shard`` (tar name) holding it

A tar holds ``shard_size`` samples (the last one fewer); the members of one sample are
consecutive and share its id as their key (webdataset splits a member name at its first
dot, so ids with a dot are refused up front).

**Crash safety.** A writer appends each sample's members to its open tar; at the end of every
batch it writes the end-of-archive marker (two zero blocks) behind the last member and fsyncs,
so at each commit point the tar is a complete archive. Only then does the driver append the
batch's records to the manifest (the commit point, as for VOC files). The next batch's members
overwrite the marker. A ``kill -9`` can therefore leave, behind the last committed member,
members whose records were never committed, a torn member, or a missing marker. Before a run
(resume) and when it ends, the store *repairs* each tar of its own prefix: it reads the
members, keeps the samples whose last manifest record names this tar, and cuts the file back
to the end of the last of them and writes the marker again (if an uncommitted sample sits
between committed ones, as a dead Ray worker can leave, the tar is rewritten with the
committed samples only, atomically); a tar with no committed sample is removed. Every tar is
then a valid archive and every id is in exactly one of them; what was lost is redone.

Writers never append to a tar they did not create: each takes the next free number of its
prefix with an exclusive create, so Ray workers and ``--shard I/N`` runs (prefix
``train-shard-I-of-N``) write disjoint files, and a resumed run starts a new tar (a run
interrupted ``k`` times leaves ``k`` short tars; ``merge`` and the next ``export`` do not mind).
"""
from __future__ import annotations

import contextlib
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np

from pccfast.core.labelset import LabelSet
from pccfast.data.fileio import (FILE_MODE, append_line, atomic_link_or_copy, atomic_write, atomic_write_bytes,
                                 check_id, encode_image, encode_mask_png)
from pccfast.data.layout import (FORMATS, LOCATION_KEYS, MEMBERS, TAR_EXT, TAR_INDEX, TARS, detect_layout, file_prefix,
                                 numbered_name, output_dirs, parse_numbered_name)
from pccfast.data.manifest import Manifest, all_records, check_output_folder, dedup_records, make_output_folder, \
    record_order
from pccfast.data.provenance import check_run_file, write_run_file

__all__ = ["ShardWriter", "ShardStore", "check_format", "TarMember", "read_members", "group_samples", "repair_tar",
           "copy_tar", "check_tar_id", "write_index", "read_index", "tar_member_bytes", "DEFAULT_SHARD_SIZE",
           "END_OF_ARCHIVE"]

DEFAULT_SHARD_SIZE = 1000  # samples per tar (img2dataset and DataComp use 1k-30k)
BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


def check_format(out: str, fmt: str, allowed: tuple = FORMATS) -> None:
    """Before a run writes layout ``fmt`` into ``out``: ValueError (one line) if ``fmt`` is not
    one of ``allowed`` or ``out`` already holds a dataset of another layout."""
    if fmt not in allowed:
        raise ValueError(f"`format` has to be one of {', '.join(allowed)} but is {fmt!r}")
    if not os.path.isdir(out):
        return
    try:
        have = detect_layout(out)
    except ValueError:
        return  # nothing written yet
    if have != fmt:
        raise ValueError(f"{out}: holds a {have} dataset, not {fmt}; use another folder (python -m pccfast.export "
                         "converts a dataset between layouts)")


def check_tar_id(sample_id: str) -> str:
    """An id that names a tar member's key: a plain file name (:func:`check_id`) without a dot."""
    check_id(sample_id)
    if "." in sample_id:
        raise ValueError(f"`--format webdataset` needs ids without '.' (webdataset splits member names at the first "
                         f"dot) but id {sample_id!r} has one")
    return sample_id


def tar_member_bytes(name: str, data: bytes) -> bytes:
    """One tar member: header (PAX where a long name needs it), data, zero padding to a block."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same samples give the same tar bytes
    info.mode = FILE_MODE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + b"\0" * (-len(data) % BLOCK)


@dataclass(frozen=True)
class TarMember:
    """A complete member of a tar: ``name``, where its header starts (``start``), where its
    data starts (``data``), its ``size`` and where the next member starts (``end``)."""

    name: str
    start: int
    data: int
    size: int
    end: int

    @property
    def key(self) -> str:
        """The sample it belongs to (the name up to the first dot, as webdataset reads it)."""
        return os.path.basename(self.name).split(".", 1)[0]

    @property
    def ext(self) -> str:
        base = os.path.basename(self.name)
        return base.split(".", 1)[1] if "." in base else ""


def _ustar_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type flag) of a plain ustar header block; None for anything else (a zero
    block, a bad checksum, an extended header): the caller then asks :mod:`tarfile`."""
    try:
        checksum = int(block[148:156].strip(b"\0 ") or b"-1", 8)
        size = int(block[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(block[:148]) + 256 + sum(block[156:]):
        return None
    kind = block[156:157]
    if kind not in (b"0", b"\0", b"5") or block[257:262] != b"ustar":
        return None
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape"), size, kind


def read_members(path: str) -> list[TarMember]:
    """The complete regular-file members of a tar, in order, up to its end marker or to the
    first torn or unreadable header (what a killed writer leaves behind is not listed).
    Plain ustar headers (what :class:`ShardWriter` writes for names up to 100 bytes) are read
    directly; a tar with any other header is read with :mod:`tarfile`."""
    size = os.path.getsize(path)
    found, pos = [], 0
    with open(path, "rb") as f:
        while pos + BLOCK <= size:
            block = f.read(BLOCK)
            if block == bytes(BLOCK):
                return found  # the end marker
            header = _ustar_header(block)
            if header is None:
                break
            name, length, kind = header
            end = pos + BLOCK + length + (-length % BLOCK)
            if end > size:
                return found  # data cut short
            if kind != b"5":
                found.append(TarMember(name, pos, pos + BLOCK, length, end))
            pos = end
            f.seek(pos)
        else:
            return found  # the file ends at a member boundary (no marker yet) or in a header
    return _read_members_tarfile(path, size)


def _read_members_tarfile(path: str, size: int) -> list[TarMember]:
    found = []
    with open(path, "rb") as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError:
            return []  # empty, or torn before its first header
        while True:
            try:
                info = tf.next()
            except (tarfile.ReadError, EOFError, OSError):
                break
            if info is None:
                break
            end = info.offset_data + info.size + (-info.size % BLOCK)
            if end > size:
                break  # data cut short
            if info.isfile():
                found.append(TarMember(info.name, info.offset, info.offset_data, info.size, end))
    return found


def group_samples(members: list[TarMember]) -> list[tuple[str, list[TarMember]]]:
    """Consecutive members with one key -> (key, members), in order."""
    groups: list[tuple[str, list[TarMember]]] = []
    for m in members:
        if groups and groups[-1][0] == m.key:
            groups[-1][1].append(m)
        else:
            groups.append((m.key, [m]))
    return groups


def _chosen(groups: list, keep: set[str]) -> list[int]:
    """Positions of the samples to keep: keys in ``keep``, the last copy of each."""
    last = {key: i for i, (key, _) in enumerate(groups)}
    return [i for i, (key, _) in enumerate(groups) if key in keep and last[key] == i]


def _write_samples(src: str, kept: list, dst: str) -> None:
    """``dst`` := the members of ``kept`` samples of tar ``src`` and the end marker, atomically."""
    with open(src, "rb") as f, atomic_write(dst) as out:
        for _, ms in kept:
            f.seek(ms[0].start)
            out.write(f.read(ms[-1].end - ms[0].start))
        out.write(END_OF_ARCHIVE)


def copy_tar(src: str, dst: str, keep: set[str]) -> list[str]:
    """Put at ``dst`` a tar of the samples of ``src`` whose keys are in ``keep`` (``merge``):
    a hard link (or copy) when ``src`` holds exactly them, else a filtered copy; atomically.
    ``src`` is never changed. Returns the keys in ``dst``, in order."""
    groups = group_samples(read_members(src))
    chosen = _chosen(groups, keep)
    if not chosen:
        return []
    kept = [groups[i] for i in chosen]
    whole = len(chosen) == len(groups) and os.path.getsize(src) == kept[-1][1][-1].end + len(END_OF_ARCHIVE)
    if whole:
        atomic_link_or_copy(src, dst)
    else:
        _write_samples(src, kept, dst)
    return [k for k, _ in kept]


def repair_tar(path: str, keep: set[str]) -> list[str]:
    """Make ``path`` a valid tar holding exactly the samples whose keys are in ``keep`` (one
    copy each, the last one written), ending in the end-of-archive marker; removes it if none
    is left. Cuts the file back when the kept samples come first (the usual case after a kill),
    rewrites it atomically otherwise. Returns the kept keys in order."""
    groups = group_samples(read_members(path))
    chosen = _chosen(groups, keep)
    kept = [groups[i] for i in chosen]
    if not kept:
        os.unlink(path)
        return []
    end = kept[-1][1][-1].end
    if len(chosen) == len(groups) and os.path.getsize(path) == end + len(END_OF_ARCHIVE):
        return [k for k, _ in kept]  # already exactly right: not opened for writing
    # the kept samples come first: cut the rest off (in place, unless another name links the
    # file: merge's hard links must not change under it)
    if chosen == list(range(len(chosen))) and os.stat(path).st_nlink == 1:
        with open(path, "r+b") as f:
            f.seek(end)
            f.write(END_OF_ARCHIVE)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    else:
        _write_samples(path, kept, path)
    return [k for k, _ in kept]


class ShardWriter:
    """Appends samples to tar shards ``OUT/shards/<prefix>-NNNNNN.tar`` (the worker's side;
    the driver's :class:`ShardStore` commits). Same role and options as
    :class:`~pccfast.data.writer.SampleWriter`, plus ``shard_size`` (samples per tar) and the
    ``prefix`` of its tars. Call :meth:`end_batch` after each batch, before its records are
    committed. Picklable before its first sample (for Ray workers)."""

    def __init__(self, out: str, label_set: LabelSet, *, save_blocky: bool = False, save_captures: bool = False,
                 jpeg_quality: int = 95, shard_size: int = DEFAULT_SHARD_SIZE, prefix: str = "train"):
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise ValueError(f"`shard_size` has to be a positive int but is {shard_size!r}")
        self.out, self.label_set, self.prefix, self.shard_size = out, label_set, prefix, shard_size
        self.save_blocky, self.save_captures, self.jpeg_quality = save_blocky, save_captures, jpeg_quality
        self._file = None  # the open tar
        self._name = ""  # its file name
        self._count = 0  # samples in it
        self._end = 0  # where its next member goes (its end marker starts here)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_file=None, _name="", _count=0, _end=0)  # a copy opens tars of its own
        return state

    @property
    def folder(self) -> str:
        return os.path.join(self.out, TARS)

    def write_files(self, sample_id: str, image: np.ndarray, mask: np.ndarray, blocky: np.ndarray | None = None,
                    capture: dict | None = None, *, record: dict) -> dict:
        """Encode and append one sample (image (H, W, 3) uint8, mask/blocky (H, W) uint8,
        ``capture``: :func:`~pccfast.data.captures.encode_capture`'s arguments) with its
        ``record``; returns the record to commit (with ``shard``, the tar's name)."""
        pal = self.label_set.flat_palette()
        files = {"image": encode_image(image, self.jpeg_quality), "mask": encode_mask_png(mask, pal)}
        if self.save_blocky and blocky is not None:
            files["blocky"] = encode_mask_png(blocky, pal)
        if self.save_captures and capture is not None:
            from pccfast.data.captures import encode_capture

            files["capture"] = encode_capture(f"{sample_id}.safetensors", **capture)
        return self.write_encoded(sample_id, files, record)

    def write_encoded(self, sample_id: str, files: dict, record: dict) -> dict:
        """Append one sample's encoded files (``image`` JPEG, ``mask`` PNG, optional ``blocky``,
        ``capture``: bytes, stored as they are) and its ``record`` (``<id>.json``, without
        :data:`~pccfast.data.layout.LOCATION_KEYS`); returns the record to commit."""
        check_tar_id(sample_id)
        clean = {k: v for k, v in record.items() if k not in LOCATION_KEYS}
        files = dict(files, record=(json.dumps(clean, ensure_ascii=False) + "\n").encode())
        data = b"".join(tar_member_bytes(f"{sample_id}.{MEMBERS[k]}", files[k])
                        for k in ("image", "mask", "record", "blocky", "capture") if files.get(k) is not None)
        if self._file is None:
            self._open()
        start = self._end
        try:
            self._append(data)
        except BaseException:
            with contextlib.suppress(OSError):  # a failed sample leaves nothing behind
                self._file.truncate(start)
                self._end = start
            raise
        self._count += 1
        name = self._name
        if self._count >= self.shard_size:
            self._close_shard()
        return dict(clean, shard=name)

    def end_batch(self) -> None:
        """End of a batch: the open tar gets its end marker and is fsync'ed (its samples may
        now be committed)."""
        if self._file is not None:
            self._terminate()

    def close(self) -> None:
        if self._file is not None:
            self._close_shard()

    # the steps below are separate so that tests can kill the process between them
    def _open(self) -> None:
        """Create the next free ``<prefix>-NNNNNN.tar`` (exclusively: never another writer's)."""
        os.makedirs(self.folder, exist_ok=True)
        taken = [parse_numbered_name(n, TAR_EXT) for n in os.listdir(self.folder)]
        number = 1 + max((p[1] for p in taken if p is not None and p[0] == self.prefix), default=-1)
        while True:
            name = numbered_name(self.prefix, number, TAR_EXT)
            try:
                fd = os.open(os.path.join(self.folder, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, FILE_MODE)
                break
            except FileExistsError:
                number += 1
        self._file, self._name, self._count, self._end = os.fdopen(fd, "r+b"), name, 0, 0

    def _append(self, data: bytes) -> None:
        self._file.seek(self._end)
        self._file.write(data)
        self._end += len(data)

    def _terminate(self) -> None:
        self._file.seek(self._end)
        self._file.write(END_OF_ARCHIVE)
        self._file.truncate()
        self._file.flush()
        os.fsync(self._file.fileno())

    def _close_shard(self) -> None:
        self._terminate()
        self._file.close()
        self._file, self._name, self._count, self._end = None, "", 0, 0


class ShardStore(Manifest):
    """Resume, plan and commit of a webdataset dataset ``out`` (the driver's side; see the
    module docstring for the crash-safety scheme). Checks and arguments as
    :class:`~pccfast.data.manifest.Manifest`; the tars this store repairs are those of its
    ``prefix`` (:func:`~pccfast.data.layout.file_prefix` of ``shard``)."""

    folder_name = TARS
    ext = TAR_EXT

    def __init__(self, out: str, label_set: LabelSet, shard: tuple[int, int] | None = None, *,
                 defining: dict | None = None, expected: dict | None = None, overwrite: bool = False):
        self.out, self.label_set, self.shard = out, label_set, shard
        self.overwrite = overwrite
        self.prefix = file_prefix(shard)
        check_output_folder(out, label_set)
        if defining is not None:
            check_run_file(out, defining, overwrite=overwrite)
        self.stale = self._differing(expected or {})
        make_output_folder(out, label_set, (self.folder_name,), output_dirs(out) + [self.folder])
        if defining is not None:
            write_run_file(out, defining)
        self.kept = self.repair()  # file name -> the ids it holds (own prefix)

    @property
    def folder(self) -> str:
        return os.path.join(self.out, self.folder_name)

    def own_files(self) -> list[str]:
        """This store's files (its prefix), in number order."""
        if not os.path.isdir(self.folder):
            return []
        named = [(parse_numbered_name(n, self.ext), n) for n in os.listdir(self.folder)]
        return [n for p, n in sorted((p, n) for p, n in named if p is not None and p[0] == self.prefix)]

    def committed(self) -> dict[str, dict]:
        """id -> its last committed record (in any manifest of the dataset), stale ids left out."""
        return {r["id"]: r for r in dedup_records(all_records(self.out)) if r["id"] not in self.stale}

    def repair(self) -> dict[str, set[str]]:
        """Cut every file of this prefix back to its committed samples (module docstring);
        returns file name -> the ids it holds."""
        by_file: dict[str, set[str]] = {}
        for sid, r in self.committed().items():
            by_file.setdefault(str(r.get("shard")), set()).add(sid)
        trusted = self.verified_files()
        kept = {}
        for name in self.own_files():
            path, keep = os.path.join(self.folder, name), by_file.get(name, set())
            if keep and trusted.get(name) == (len(keep), os.path.getsize(path)):
                kept[name] = keep  # checked when the index was written; tars are never appended to later
                continue
            ids = self.repair_file(path, keep)
            if ids:
                kept[name] = set(ids)
        return kept

    def verified_files(self) -> dict[str, tuple[int, int]]:
        """name -> (samples, bytes) of the tars the index marks as checked (see :func:`write_index`)."""
        return verified_entries(self.out)

    def repair_file(self, path: str, keep: set[str]) -> list[str]:
        return repair_tar(path, keep)

    def write_index(self, records: list[dict]) -> None:
        write_index(self.out, records, verified=set(self.kept))

    def write_plan(self, ids: list[str]) -> None:
        for sid in ids:
            check_tar_id(sid)  # before any work: one line, not one failure per sample
        super().write_plan(ids)

    def done_ids(self) -> set[str]:
        """Ids committed to a file that holds them: checked member by member for this
        prefix's files (repaired), by the file's presence for other prefixes' (other shards)."""
        done = set()
        for sid, r in self.committed().items():
            name = r.get("shard")
            if not isinstance(name, str):
                continue
            p = parse_numbered_name(name, self.ext)
            if p is not None and p[0] == self.prefix:
                if sid in self.kept.get(name, ()):
                    done.add(sid)
            elif os.path.exists(os.path.join(self.folder, name)):
                done.add(sid)
        return done

    def commit(self, record: dict) -> None:
        """Append the record's manifest line, without an fsync of its own: the tar holding the
        sample was fsync'ed before (:meth:`ShardWriter.end_batch`), so a line lost in a power
        cut only means that sample is cut from its tar and made again; ``kill -9`` loses no
        written line. (One fsync per line was most of the time of writing a shard.)"""
        append_line(self.manifest_path, json.dumps(record, ensure_ascii=False), fsync=False)

    def paths(self, sample_id: str) -> list[str]:
        return []  # no file per sample: a dead worker's half-written members are cut off by repair

    def finalize(self) -> list[str]:
        """Repair this prefix's files (a dead worker's tail); unsharded runs also write the
        index (``shards.json``; sharded runs: ``merge`` does). Returns the committed ids."""
        self.kept = self.repair()
        records = sorted(self.committed().values(), key=record_order)
        if self.shard is None:
            self.write_index(records)
        return [r["id"] for r in records]


def write_index(out: str, records: list[dict], verified: set[str] = frozenset()) -> dict:
    """Write ``OUT/shards.json``: every tar of ``OUT/shards`` with its count of committed
    ``records`` and its byte size, in name order, and the total. Returns the index.

    ``verified`` names tars just checked member by member (repaired, or copied exactly); they,
    and tars the previous index marked so whose count and size are unchanged, get
    ``"verified": true``, and the next run's repair trusts them without reading them again
    (no writer appends to a tar after its run, so an unchanged size means unchanged content)."""
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.get("shard"))] = counts.get(str(r.get("shard")), 0) + 1
    d = os.path.join(out, TARS)
    names = sorted(n for n in os.listdir(d) if parse_numbered_name(n, TAR_EXT) is not None) if os.path.isdir(d) else []
    before = verified_entries(out)
    shards = []
    for n in names:
        entry = dict(name=n, samples=counts.get(n, 0), bytes=os.path.getsize(os.path.join(d, n)))
        entry["verified"] = n in verified or before.get(n) == (entry["samples"], entry["bytes"])
        shards.append(entry)
    index = dict(format="webdataset", samples=sum(s["samples"] for s in shards), shards=shards)
    atomic_write_bytes(os.path.join(out, TAR_INDEX), (json.dumps(index, indent=1) + "\n").encode())
    return index


def verified_entries(out: str) -> dict[str, tuple[int, int]]:
    """name -> (samples, bytes) of the tars that ``OUT/shards.json`` marks verified ({} if none)."""
    try:
        index = read_index(out) or {}
    except (OSError, ValueError):
        return {}
    return {s["name"]: (s.get("samples"), s.get("bytes")) for s in index.get("shards", [])
            if isinstance(s, dict) and s.get("verified") is True and "name" in s}


def read_index(out: str) -> dict | None:
    """The shard index of dataset ``out`` (None if it has none)."""
    path = os.path.join(out, TAR_INDEX)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
