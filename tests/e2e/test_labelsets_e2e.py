"""Open-vocabulary label sets end to end on the tiny model: a custom set with multi-token
class names, and COCO; bad label-set files give one-line errors from every entry point."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pccfast.data.captures import read_capture
from pccfast.cli.generate import main as generate_main
from pccfast.data.labelsets import get_label_set
from pccfast.cli.relabel import main as relabel_main

TINY = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--no-progress", "--batch", "2"]


def test_custom_label_set_with_multi_token_classes(tmp_path):
    ls_file = tmp_path / "garden.json"
    # "zucchini" and "traffic cone" are split into several tokens by the tiny tokenizer
    ls_file.write_text(json.dumps({
        "name": "garden", "classes": ["background", "zucchini", "traffic cone", "dog"],
        "palette": [[0, 0, 0], [10, 200, 10], [250, 120, 0], [60, 60, 200]],
    }))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a zucchini next to a traffic cone | zucchini, traffic cone\na dog | dog\n")
    out = tmp_path / "o"
    code = generate_main(["--prompts", str(prompts), "--label-set", str(ls_file), "--out", str(out),
                          "--save-captures", *TINY])
    assert code == 0
    assert json.loads((out / "labelset.json").read_text())["classes"][2] == "traffic cone"
    ls = get_label_set(str(ls_file))
    cap = read_capture(str(out / "captures" / "1.safetensors"), label_set=ls)
    ca = cap.class_attention
    assert ca.shape[0] == 4
    # both multi-token classes got maps; the absent class is all zero; background from the start token
    assert ca[1].abs().sum() > 0 and ca[2].abs().sum() > 0 and ca[0].abs().sum() > 0
    assert torch.count_nonzero(ca[3]) == 0
    mask = Image.open(out / "SegmentationClass" / "1.png")
    assert mask.getpalette()[:12] == [0, 0, 0, 10, 200, 10, 250, 120, 0, 60, 60, 200]
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 1, 2, 3, 255}
    # relabelling the captures with the same label set works too
    rel = tmp_path / "rel"
    assert relabel_main(["--captures", str(out / "captures"), "--images", str(out / "JPEGImages"),
                         "--out", str(rel), "--label-set", str(ls_file), "--no-progress"]) == 0
    assert (rel / "SegmentationClass" / "1.png").exists()


def test_coco_label_set_end_to_end(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a giraffe next to a traffic light | giraffe, traffic light\n")
    out = tmp_path / "o"
    assert generate_main(["--prompts", str(prompts), "--label-set", "coco", "--out", str(out), "--save-captures",
                          *TINY]) == 0
    cap = read_capture(str(out / "captures" / "1.safetensors"), label_set=get_label_set("coco"))
    coco = get_label_set("coco")
    assert cap.class_attention.shape[0] == 81
    nonzero = {i for i in range(81) if cap.class_attention[i].abs().sum() > 0}
    assert nonzero == {0, coco.index("giraffe"), coco.index("traffic light")}
    vals = set(np.unique(np.asarray(Image.open(out / "SegmentationClass" / "1.png"))).tolist())
    assert vals <= set(range(81)) | {255}


@pytest.mark.parametrize("content, message", [
    ('{"classes": ["background", "cat", "cat"]}', "listed twice"),
    ('{"classes": ["cat", "dog"]}', "has to start with 'background'"),
    ('{"classes": ["background", "cat"], "palette": [[0, 0, 0], [300, 0, 0]]}', "palette entry 1"),
    ('{"classes": ["background", "cat"', "not valid JSON"),
])
def test_bad_label_set_file_one_line_error(tmp_path, capsys, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(SystemExit) as exc:
        generate_main(["--label-set", str(f), "--out", str(tmp_path / "o"), *TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(f) in err[0]


def test_too_many_classes(tmp_path):
    f = tmp_path / "big.json"
    f.write_text(json.dumps({"classes": ["background"] + [f"c{i}" for i in range(300)]}))
    with pytest.raises(ValueError, match="at most 255 classes"):
        get_label_set(str(f))
