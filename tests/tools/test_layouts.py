"""inspect and evaluate on every layout: one planted dataset as VOC files, WebDataset tars and
Parquet files gives the same statistics, sheets and scores."""
import base64
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from pccfast.cli.evaluate import main as evaluate_main
from pccfast.cli.inspect import main as inspect_main
from pccfast.data.labelsets import get_label_set
from pccfast.data.layout import MASKS, sample_paths
from pccfast.runs.export import run_export
from pccfast.testing.planted_datasets import planted_sample, write_planted_voc
from pccfast.tools.evaluate import evaluate_dirs
from pccfast.tools.inspection import dataset_label_set, dataset_stats, find_samples

pytest.importorskip("pyarrow")

VOC = get_label_set("voc")
LAYOUTS = ("voc", "webdataset", "parquet")
N_GT, N_PRED = 30, 34  # predictions: 4 ids the ground truth lacks


def _all_layouts(root, name, n, seed):
    """``name`` as planted VOC files (every 3rd sample with a blocky mask), then exported to
    tars (3 of them) and parquet files; layout -> folder."""
    voc = str(root / f"{name}-voc")
    write_planted_voc(voc, n, seed=seed, blocky_every=3)
    out = {"voc": voc}
    for to in LAYOUTS[1:]:
        out[to] = str(root / f"{name}-{to}")
        run_export(voc, to, out[to], shard_size=12, progress=False)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {"gt": _all_layouts(root, "gt", N_GT, 0), "pred": _all_layouts(root, "pred", N_PRED, 1), "root": root}


def test_the_layouts_really_differ(data):
    gt = data["gt"]
    assert os.listdir(os.path.join(gt["webdataset"], "shards")) and not os.path.exists(os.path.join(gt["webdataset"], MASKS))
    assert len(os.listdir(os.path.join(gt["parquet"], "data"))) == 3 and not os.path.exists(os.path.join(gt["parquet"], MASKS))


def test_inspect_statistics_are_the_same_in_every_layout(data, capsys):
    """The stats of the planted masks (counted here from the planted samples) in every layout,
    the same stdout but the first line (it names the folder), the same JSON."""
    stats = {lay: dataset_stats(find_samples(p), VOC) for lay, p in data["gt"].items()}
    counts = np.stack([np.bincount(planted_sample(i, 64, 0)[1].ravel(), minlength=256) for i in range(N_GT)])
    expected = counts[:, :21].sum(0) / counts.sum()
    for lay, st in stats.items():
        np.testing.assert_allclose(st.class_share, expected, err_msg=lay)
        assert [s.id for s in st.images] == [f"{i:06d}" for i in range(N_GT)], lay
        assert st.to_json() == stats["voc"].to_json(), lay
    assert stats["voc"].suspicious == []  # planted masks hold their prompt's classes
    outs = {}
    for lay, p in data["gt"].items():
        js = data["root"] / f"stats-{lay}.json"
        assert inspect_main([p, "--json", str(js)]) == 0
        outs[lay] = capsys.readouterr().out
        assert "no mask file" not in outs[lay] and f"{N_GT} ids, {N_GT} masks" in outs[lay]
    for lay in LAYOUTS[1:]:
        assert outs[lay].splitlines()[1:] == outs["voc"].splitlines()[1:]
        assert (data["root"] / f"stats-{lay}.json").read_bytes() == (data["root"] / "stats-voc.json").read_bytes()


def test_inspect_finds_prompt_classes_missing_from_tar_and_parquet_masks(data, tmp_path):
    """The suspicious list depends on each sample's prompt classes, read from the manifest (or,
    without one, from the tar's records): a class added to one record is reported missing."""
    for lay in LAYOUTS[1:]:
        src = tmp_path / lay
        shutil.copytree(data["gt"][lay], src)
        lines = (src / "manifest.jsonl").read_text().splitlines()
        r = json.loads(lines[5])
        r["classes"] = r["classes"] + ["unicorn"]
        lines.append(json.dumps(r))  # a later record of an id replaces the earlier one
        (src / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        stats = dataset_stats(find_samples(str(src)), VOC)
        assert [(s.id, s.reasons) for s in stats.suspicious] == [
            ("000005", ["prompt class 'unicorn' is not in label set 'voc'"])], lay
    tars = tmp_path / "no-manifest"
    shutil.copytree(data["gt"]["webdataset"], tars)
    os.unlink(tars / "manifest.jsonl")
    samples = find_samples(str(tars))
    assert not any(s.record_known for s in samples)
    stats = dataset_stats(samples, VOC)
    assert stats.to_json() == dataset_stats(find_samples(data["gt"]["voc"]), VOC).to_json()
    with open(os.path.join(data["gt"]["voc"], "manifest.jsonl")) as f:
        assert samples[3].classes == tuple(json.loads(f.readlines()[3])["classes"]) != ()


def test_contact_sheets_are_the_same_in_every_layout(data):
    sheets = {}
    for lay, p in data["gt"].items():
        png = data["root"] / f"sheet-{lay}.png"
        assert inspect_main([p, "--out", str(png), "--limit", "5", "--size", "48"]) == 0
        with Image.open(png) as im:
            sheets[lay] = np.asarray(im.convert("RGB"))
            box = tuple(int(v) for v in im.text["legend_box"].split(","))
    title = 24  # the title line names the folder; everything below is the same
    assert sheets["voc"].shape[1] == 4 + 3 * (48 + 4)  # image | blocky | refined: blocky masks were found
    for lay in LAYOUTS[1:]:
        assert sheets[lay].shape == sheets["voc"].shape
        assert np.array_equal(sheets[lay][title:], sheets["voc"][title:]), lay
    assert box[1] > title


def test_html_page_embeds_the_stored_files(data, tmp_path):
    """A tar or parquet dataset's page carries its images as data URIs of the stored bytes
    (the VOC files' bytes: export copies them), and refers to no file."""
    voc = data["gt"]["voc"]
    for lay in LAYOUTS[1:]:
        page = tmp_path / f"{lay}.html"
        assert inspect_main([data["gt"][lay], "--out", str(page), "--limit", "4"]) == 0
        text = page.read_text()
        rows = re.findall(r"<tr id='([^']+)'>", text)
        assert rows == ["000000", "000001", "000002", "000003"]
        srcs = re.findall(r"""src=['"]([^'"]+)['"]""", text)
        assert srcs and all(s.startswith("data:image/") for s in srcs) and "href='" not in text.split("<h2>Images")[1]
        blobs = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
        for sid in rows:
            p = sample_paths(voc, sid)
            for key in ("image", "mask") + (("blocky",) if sid in ("000000", "000003") else ()):
                with open(p[key], "rb") as f:
                    assert f.read() in blobs, (lay, sid, key)
        assert "<th>blocky mask</th>" in text


def test_parquet_label_set_from_its_metadata(tmp_path):
    voc = str(tmp_path / "voc")
    write_planted_voc(voc, 4, label_set="coco")
    run_export(voc, "parquet", str(tmp_path / "pq"), progress=False)
    os.unlink(tmp_path / "pq" / "labelset.json")
    assert dataset_label_set(str(tmp_path / "pq")).name == "coco"
    rep = evaluate_dirs(str(tmp_path / "pq"), voc, dataset_label_set(str(tmp_path / "pq")))
    assert rep.n_images == 4 and rep.miou == 1.0 and len(rep.classes) == 81


def _reference(pred_seed, gt_seed, ids):
    cm = np.zeros((21, 22), np.int64)
    for i in ids:
        p, g = planted_sample(i, 64, pred_seed)[1], planted_sample(i, 64, gt_seed)[1]
        keep = g != 255
        np.add.at(cm, (g[keep].astype(int), np.where(p[keep] < 21, p[keep], 21).astype(int)), 1)
    return cm


def test_evaluate_scores_are_the_same_for_every_pair_of_layouts(data, capsys):
    """Predictions (seed 1) against ground truth (seed 0): the same report for all nine
    pairs of layouts and a plain folder of PNGs, equal to a direct count."""
    ref = _reference(1, 0, range(N_GT))
    reports = {}
    for a, pred in data["pred"].items():
        for b, gt in data["gt"].items():
            reports[a, b] = evaluate_dirs(pred, gt, VOC, batch=7).to_json()
    plain = evaluate_dirs(os.path.join(data["pred"]["voc"], MASKS), os.path.join(data["gt"]["voc"], MASKS), VOC)
    first = plain.to_json()
    assert np.array_equal(plain.confusion, ref) and 0.02 < plain.miou < 0.9
    assert first["n_images"] == N_GT and first["only_in_pred"] == [f"{i:06d}" for i in range(N_GT, N_PRED)]
    for key, rep in reports.items():
        assert rep == first, key
    texts = {}
    for lay in LAYOUTS:
        assert evaluate_main([data["pred"][lay], data["gt"][LAYOUTS[-1 - LAYOUTS.index(lay)]]]) == 0
        texts[lay] = capsys.readouterr().out
    assert texts["voc"] == texts["webdataset"] == texts["parquet"] and f"({N_GT} images)" in texts["voc"]
    ids = data["root"] / "val.txt"
    ids.write_text("000004\n000011\n000029\nzz\n")
    rep = evaluate_dirs(data["pred"]["parquet"], data["gt"]["webdataset"], VOC, ids=ids.read_text().split())
    assert rep.n_images == 3 and rep.missing == ["zz"]
    assert np.array_equal(rep.confusion, _reference(1, 0, [4, 11, 29]))


def test_evaluate_names_the_tar_member_or_parquet_row(data, tmp_path):
    """A bad ground-truth label or size in a dataset is reported with where the mask is stored."""
    from pccfast.data.fileio import save_mask_png

    voc = tmp_path / "voc"
    shutil.copytree(data["gt"]["voc"], voc)
    save_mask_png(str(voc / MASKS / "000013.png"), np.full((64, 64), 40, np.uint8), VOC.flat_palette())
    run_export(str(voc), "webdataset", str(tmp_path / "wds"), shard_size=12, progress=False)
    run_export(str(voc), "parquet", str(tmp_path / "pq"), shard_size=12, progress=False)
    with pytest.raises(ValueError, match=r"wds/shards/train-000001\.tar\[000013\.png\]: `gt` has to hold labels "
                                         r"0\.\.20 or 255 \(ignored\) but holds \[40\]"):
        evaluate_dirs(data["pred"]["voc"], str(tmp_path / "wds"), VOC)
    with pytest.raises(ValueError, match=r"pq/data/train-000001\.parquet\[000013\]: `gt` has to hold"):
        evaluate_dirs(data["pred"]["parquet"], str(tmp_path / "pq"), VOC)


def test_one_line_errors_for_folders_that_are_no_dataset(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert inspect_main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a dataset folder?" in err
    assert evaluate_main([str(empty), data["gt"]["webdataset"]]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no image is in both {empty} and {data['gt']['webdataset']} (webdataset dataset)\n"
    no_tars = tmp_path / "no-tars"
    (no_tars / "shards").mkdir(parents=True)
    for main in (inspect_main, lambda a: evaluate_main(a + [data["gt"]["voc"]])):
        assert main([str(no_tars)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {no_tars}: a webdataset dataset with no committed sample (nothing readable in shards/)\n"
    assert evaluate_main([str(tmp_path / "nope"), data["gt"]["parquet"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a folder" in err and err.count("\n") == 1


def test_read_encoded_kinds_reads_only_the_files_asked_for(data):
    """What inspect's statistics and evaluate read: the masks (and records) only, the same bytes;
    every file by default."""
    from pccfast.data.readers import open_source, read_encoded

    full = {}
    for lay, p in data["gt"].items():
        source = open_source(p)
        every = read_encoded(source, source.items)
        masks = read_encoded(source, source.items, kinds=("mask",))
        assert [set(e.files) for e in masks] == [{"mask"}] * N_GT, lay
        assert {"image", "mask"} <= set(every[0].files) and "blocky" in every[0].files, lay
        assert [e.files["mask"] for e in masks] == [e.files["mask"] for e in every], lay
        assert [e.record for e in masks] == [e.record for e in every], lay
        full[lay] = [e.files for e in every]
        with pytest.raises(ValueError, match=r"`kinds` has to name files of .* but names \['png'\]"):
            read_encoded(source, source.items[:1], kinds=("png",))
    assert full["webdataset"] == full["voc"] == full["parquet"]


def test_a_folder_of_pngs_stays_a_folder_of_pngs(data, tmp_path):
    """PNG masks in a folder that also has a data/ or shards/ folder (which would make it look
    like a parquet or webdataset dataset) are scored as the PNG folder they are."""
    plain = tmp_path / "masks"
    shutil.copytree(os.path.join(data["pred"]["voc"], MASKS), plain)
    (plain / "data").mkdir()
    (plain / "shards").mkdir()
    rep = evaluate_dirs(str(plain), data["gt"]["parquet"], VOC)
    assert rep.n_images == N_GT and np.array_equal(rep.confusion, _reference(1, 0, range(N_GT)))
