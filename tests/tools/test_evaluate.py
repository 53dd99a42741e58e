import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion

from pccfast.cli.evaluate import main
from pccfast.tools.evaluate import EvalReport, confusion_matrix, evaluate_dirs, scores
from pccfast.data.fileio import save_mask_png
from pccfast.data.labelsets import get_label_set

VOC = get_label_set("voc")


def test_value_hand_checked():
    """2x4 masks, 3 classes (+ an absent 4th), 255 in both; expectations worked out by hand."""
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 255], [2, 0, 2, 1]])
    cm = confusion_matrix(pred, gt, 4)
    # pairs (gt, pred): (0,0) (0,1) (1,1) (1,255) (2,2) (2,0) [255 ignored] (1,1)
    expected = [[1, 1, 0, 0, 0], [0, 2, 0, 0, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert cm.tolist() == expected
    s = scores(cm)
    # IoU0 = 1/(2+2-1), IoU1 = 2/(3+3-2), IoU2 = 1/(2+1-1); class 3 absent -> NaN, left out
    assert s["iou"][:3] == pytest.approx([1 / 3, 1 / 2, 1 / 2])
    assert math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx(4 / 9)
    assert s["acc"][:3] == pytest.approx([1 / 2, 2 / 3, 1 / 2]) and math.isnan(s["acc"][3])
    assert s["pixel_acc"] == pytest.approx(4 / 7)


def _numpy_reference(pred, gt, c, ignore=255):
    """Direct count: every (g, p) pair by a mask comparison; invalid predictions in column c."""
    pred = np.where((pred >= 0) & (pred < c), pred, c)
    cm = np.zeros((c, c + 1), np.int64)
    for g in range(c):
        for p in range(c + 1):
            cm[g, p] = np.sum((gt == g) & (pred == p) & (gt != ignore))
    tp = np.diag(cm)
    union = cm.sum(1) + cm[:, :c].sum(0) - tp
    iou = np.array([tp[i] / union[i] if union[i] else np.nan for i in range(c)])
    return cm, iou


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_against_numpy_and_sklearn(seed, device):
    rng = np.random.default_rng(seed)
    c = 6
    gt = rng.integers(0, c, size=(3, 17, 23))
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = rng.integers(0, c, size=gt.shape)
    pred[rng.random(gt.shape) < 0.1] = 255
    pred[rng.random(gt.shape) < 0.02] = c + 3  # a label outside the set, also wrong
    gt[0, gt[0] == 5] = 4  # class 5 rarer; class c-1 may still appear in pred only
    cm = confusion_matrix(torch.as_tensor(pred, device=device), torch.as_tensor(gt, device=device), c)
    assert cm.device == device and cm.dtype == torch.int64
    ref, ref_iou = _numpy_reference(pred, gt, c)
    np.testing.assert_array_equal(cm.cpu().numpy(), ref)
    np.testing.assert_array_equal(confusion_matrix(pred.astype(np.uint8), gt.astype(np.uint8), c), ref)  # NumPy path
    keep = gt != 255
    sk = sk_confusion(gt[keep], np.where(pred[keep] < c, pred[keep], c), labels=list(range(c + 1)))
    np.testing.assert_array_equal(cm.cpu().numpy(), sk[:c])
    s = scores(cm)
    np.testing.assert_allclose(s["iou"], ref_iou)
    assert s["miou"] == pytest.approx(np.nanmean(ref_iou))
    assert s["pixel_acc"] == pytest.approx(np.trace(ref[:, :c]) / keep.sum())


def test_prediction_255_is_a_false_negative_only():
    gt = np.array([1, 1, 2, 2])
    pred = np.array([1, 255, 2, 2])
    s = scores(confusion_matrix(pred, gt, 3))
    assert s["iou"][1] == pytest.approx(0.5)  # 1 TP, 1 FN, no FP
    assert s["iou"][2] == pytest.approx(1.0)  # 255 is not a false positive of any class
    assert math.isnan(s["iou"][0])


def test_exceptions():
    with pytest.raises(ValueError, match=r"`gt` has to hold labels 0..2 or 255 \(ignored\) but holds \[3, 7\]"):
        confusion_matrix(np.zeros(3, int), np.array([3, 7, 255]), 3)
    with pytest.raises(ValueError, match=r"same shape but have \(2,\) and \(3,\)"):
        confusion_matrix(np.zeros(2, int), np.zeros(3, int), 3)
    with pytest.raises(TypeError, match="integer labels"):
        confusion_matrix(np.zeros(2), np.zeros(2, int), 3)
    with pytest.raises(ValueError, match="`num_classes`"):
        confusion_matrix(np.zeros(2, int), np.zeros(2, int), 0)
    with pytest.raises(ValueError, match=r"\(C, C \+ 1\)"):
        scores(np.zeros((3, 3)))


def _write(d, name, mask):
    save_mask_png(str(d / f"{name}.png"), np.asarray(mask, np.uint8), VOC.flat_palette())


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(7)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    masks = {}
    for i in ["a", "b", "c"]:
        g = rng.integers(0, 21, size=(12, 10)).astype(np.uint8)
        g[0] = 255
        p = g.copy()
        p[rng.random(p.shape) < 0.3] = rng.integers(0, 21)
        p[5, :4] = 255
        _write(gt, i, g)
        _write(pred, i, p)
        masks[i] = (p, g)
    _write(pred, "only_pred", np.zeros((12, 10)))
    _write(gt, "only_gt", np.zeros((12, 10)))
    return pred, gt, masks


def test_evaluate_dirs(folders):
    pred, gt, masks = folders
    rep = evaluate_dirs(str(pred), str(gt), VOC)
    ps = np.stack([m[0] for m in masks.values()])
    gs = np.stack([m[1] for m in masks.values()])
    ref, ref_iou = _numpy_reference(ps.astype(int), gs.astype(int), 21)
    np.testing.assert_array_equal(rep.confusion, ref)
    np.testing.assert_allclose(rep.iou, ref_iou)
    assert rep.n_images == 3 and rep.only_in_pred == ["only_pred"] and rep.only_in_gt == ["only_gt"]
    rep2 = evaluate_dirs(str(pred), str(gt), VOC, ids=["b", "zz"])
    assert rep2.n_images == 1 and rep2.missing == ["zz"] and rep2.only_in_pred == []


def test_evaluate_dirs_exceptions(folders, tmp_path):
    pred, gt, _ = folders
    _write(gt, "a", np.zeros((5, 5)))
    with pytest.raises(ValueError, match=r"a.png: the prediction is 12x10 but the ground truth .*a.png is 5x5"):
        evaluate_dirs(str(pred), str(gt), VOC)
    _write(gt, "a", np.full((12, 10), 30))
    with pytest.raises(ValueError, match=r"gt/a.png: `gt` has to hold labels 0..20 .* holds \[30\]"):
        evaluate_dirs(str(pred), str(gt), VOC)
    with pytest.raises(ValueError, match="not a folder"):
        evaluate_dirs(str(tmp_path / "nope"), str(gt), VOC)


def test_cli_table_and_json(folders, tmp_path, capsys):
    pred, gt, _ = folders
    out = tmp_path / "r.json"
    assert main([str(pred), str(gt), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rep = evaluate_dirs(str(pred), str(gt), VOC)
    assert f"mIoU {100 * rep.miou:.2f}" in text
    assert "aeroplane" in text and "1 images only in the predictions (not scored): only_pred" in text
    assert "predictions outside the label set" in text
    data = json.loads(out.read_text())
    assert data["miou"] == pytest.approx(rep.miou) and data["n_images"] == 3
    assert np.array_equal(np.array(data["confusion"]), rep.confusion)
    ids = tmp_path / "val.txt"
    ids.write_text("a\nc\n")
    assert main([str(pred), str(gt), "--ids", str(ids)]) == 0
    assert "(2 images)" in capsys.readouterr().out
    assert main([str(tmp_path / "nope"), str(gt)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_dataset_root_and_its_label_set(tmp_path, capsys):
    """A pccfast dataset root: masks from SegmentationClass, classes from labelset.json."""
    ls = get_label_set({"name": "fruit", "classes": ["background", "apple", "pear"]})
    root = tmp_path / "ds"
    (root / "SegmentationClass").mkdir(parents=True)
    (root / "labelset.json").write_text(json.dumps(ls.to_json()))
    gt = tmp_path / "gt"
    gt.mkdir()
    m = np.array([[0, 1], [2, 2]], np.uint8)
    save_mask_png(str(root / "SegmentationClass" / "x.png"), m, ls.flat_palette())
    save_mask_png(str(gt / "x.png"), m, ls.flat_palette())
    assert main([str(root), str(gt)]) == 0
    text = capsys.readouterr().out
    assert "label set: fruit" in text and "pear" in text and "mIoU 100.00" in text


def test_report_json_nan_is_null():
    rep = EvalReport.from_confusion(np.array([[2, 0, 0], [0, 0, 0]]), ["background", "x"], 1)
    d = rep.to_json()
    assert d["iou"] == {"background": 1.0, "x": None} and d["miou"] == 1.0
    json.dumps(d)
