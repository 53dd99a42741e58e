"""Output layouts: write N planted samples as VOC files, WebDataset shards and Parquet, read them back.

The samples (seeded noise-and-gradient JPEGs and rectangle masks, :mod:`pccfast.testing.planted_datasets`)
are encoded once, untimed, so every layout writes the same bytes and the timings compare the
layouts, not the encoders. Each layout is written through its real writer and store (VOC:
``SampleWriter`` + ``Manifest``, one fsync'ed file per image and mask; WebDataset:
``ShardWriter`` + ``ShardStore``, one fsync per batch; Parquet: ``ParquetWriter`` +
``ParquetStore``, one file per ``--shard-size`` rows) into a fresh folder, committing each
record as generate and export do; then read back with :func:`pccfast.data.readers.iter_encoded`
(the stored bytes) and :func:`pccfast.data.load_dataset` (decoded to arrays). Median of
``--repeats`` runs; the ratios are to VOC in the same run. Reads follow the writes, so the files
are in the page cache: the read figures measure the layouts' overheads, not the disk.

    python benchmarks/bench_formats.py --n 1000 --size 256 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from pccfast.core.labelset import as_label_set
from pccfast.data.fileio import encode_image, encode_mask_png
from pccfast.data.manifest import Manifest
from pccfast.data.parquet import ParquetStore, ParquetWriter
from pccfast.data.readers import iter_encoded, load_dataset
from pccfast.data.shards import ShardStore, ShardWriter
from pccfast.data.writer import SampleWriter
from pccfast.testing.planted_datasets import planted_sample
from pccfast.testing.timing import git_version

__all__ = ["main"]

LAYOUTS = ("voc", "webdataset", "parquet")


def _samples(n: int, size: int):
    ls = as_label_set("voc")
    out = []
    for i in range(n):
        image, mask, labels = planted_sample(i, size)
        sid = f"{i:06d}"
        record = dict(id=sid, index=i, prompt=f"a planted scene {i}", classes=[ls.classes[v] for v in labels],
                      seed=2024 + i, model="planted", steps=None, height=size, width=size, seconds=0.0)
        out.append((sid, {"image": encode_image(image), "mask": encode_mask_png(mask, ls.flat_palette())}, record))
    return ls, out


def _write(layout: str, out: str, ls, samples, batch: int, shard_size: int) -> None:
    if layout == "voc":
        store, writer = Manifest(out, ls), SampleWriter(out, ls)
        for sid, files, record in samples:
            writer.write_encoded(sid, files)
            store.commit(record)
    elif layout == "webdataset":
        store, writer = ShardStore(out, ls), ShardWriter(out, ls, shard_size=shard_size)
        for k in range(0, len(samples), batch):
            records = [writer.write_encoded(sid, files, record) for sid, files, record in samples[k:k + batch]]
            writer.end_batch()
            for r in records:
                store.commit(r)
        writer.close()
    else:
        store, writer = ParquetStore(out, ls), ParquetWriter(out, ls)
        for k in range(0, len(samples), shard_size):
            for r in writer.write_file(samples[k:k + shard_size]):
                store.commit(r)
    store.finalize()


def _count_files(out: str) -> tuple[int, int]:
    files = size = 0
    for d, _, names in os.walk(out):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(d, name))
    return files, size


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="samples (default: %(default)s)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64,
                   help="samples per batch (one fsync) for webdataset (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar / rows per parquet file "
                   "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per layout, the median is shown (default: %(default)s)")
    p.add_argument("--dir", default=None, help="folder to write into (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    ls, samples = _samples(args.n, args.size)
    root = tempfile.mkdtemp(prefix="bench-formats-", dir=args.dir)
    results = {}
    try:
        for layout in LAYOUTS:
            writes, raw, decoded = [], [], []
            for rep in range(args.repeats):
                out = os.path.join(root, f"{layout}-{rep}")
                writes.append(_timed(lambda: _write(layout, out, ls, samples, args.batch, args.shard_size)))
                files, size = _count_files(out)
                got = []
                raw.append(_timed(lambda: got.extend(s.id for s in iter_encoded(out))))
                assert got == [s[0] for s in samples], f"{layout}: read back other samples"
                decoded.append(_timed(lambda: sum(1 for _ in load_dataset(out))))
                shutil.rmtree(out)
            results[layout] = dict(write_s=statistics.median(writes), files=files, bytes=size,
                                   read_bytes_per_s=args.n / statistics.median(raw),
                                   read_decoded_per_s=args.n / statistics.median(decoded))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = results["voc"]
    print(f"bench_formats {git_version()}: {args.n} samples of {args.size}x{args.size} (JPEG + PNG), "
          f"median of {args.repeats}, batch {args.batch}, shard size {args.shard_size}")
    print("| layout | write s | VOC s / this | files | MB | read samples/s (bytes) | this / VOC | "
          "read samples/s (decoded) | this / VOC |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layout, r in results.items():
        print(f"| {layout} | {r['write_s']:.2f} | {base['write_s'] / r['write_s']:.1f}x | {r['files']} | "
              f"{r['bytes'] / 1e6:.1f} | {r['read_bytes_per_s']:.0f} | "
              f"{r['read_bytes_per_s'] / base['read_bytes_per_s']:.1f}x | "
              f"{r['read_decoded_per_s']:.0f} | {r['read_decoded_per_s'] / base['read_decoded_per_s']:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results, version=git_version()), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
