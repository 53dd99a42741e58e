import json

import pytest

from pccfast.core.labelset import COCO_CLASSES, VOC_CLASSES, LabelSet, voc_palette
from pccfast.data.labelsets import get_label_set, load_label_set


def test_voc_palette_value():
    pal = voc_palette()
    assert len(pal) == 256
    # the standard VOC colour map (as in the devkit's PNGs)
    assert pal[0] == (0, 0, 0) and pal[1] == (128, 0, 0) and pal[2] == (0, 128, 0) and pal[3] == (128, 128, 0)
    assert pal[8] == (64, 0, 0) and pal[12] == (64, 0, 128) and pal[15] == (192, 128, 128)
    assert pal[20] == (0, 64, 128)


def test_voc_and_coco():
    voc = get_label_set("VOC")
    assert voc.name == "voc" and voc.classes == VOC_CLASSES and voc.num_classes == 21
    assert voc.palette[255] == (224, 224, 192) and voc.palette[15] == (192, 128, 128)
    assert voc.text_of("diningtable") == "table" and voc.text_of("PottedPlant") == "pot plant"
    assert voc.text_of("tvmonitor") == "monitor" and voc.text_of("aeroplane") == "airplane"
    assert voc.text_of("dog") == "dog"
    assert voc.index("Person") == 15 and voc.index(" sofa ") == 18
    assert len(voc.flat_palette()) == 768 and voc.flat_palette()[3 * 15 : 3 * 16] == [192, 128, 128]
    coco = get_label_set("coco")
    assert coco.num_classes == 81 and coco.classes == COCO_CLASSES and coco.classes[1] == "person"
    assert get_label_set(voc) is voc


@pytest.mark.parametrize("name", ["voc", "coco"])
def test_to_json_round_trip(name, tmp_path):
    ls = get_label_set(name)
    p = tmp_path / "ls.json"
    p.write_text(json.dumps(ls.to_json()))
    back = get_label_set(str(p))
    assert back == ls  # name, classes, texts, all 256 palette entries, ignore index


def test_custom_json_and_dict():
    data = {"name": "fruit", "classes": ["background", "red apple", "Pear"], "texts": {"red apple": "apple"},
            "palette": [[0, 0, 0], [200, 0, 0], [0, 200, 0]], "ignore_index": 250,
            "synonyms": {"pear": ["conference pear"]}}
    ls = get_label_set(data)
    assert ls.classes == ("background", "red apple", "Pear") and ls.texts == ("background", "apple", "Pear")
    assert ls.palette[1] == (200, 0, 0) and ls.palette[250] == (224, 224, 192) and ls.ignore_index == 250
    assert ls.palette[3] == voc_palette()[3]  # entries past the classes: the VOC colours
    assert ls.index("pear") == 2 and ls.synonyms == {"pear": ["conference pear"]}
    # frozen: usable as a dict key, equal sets hash equal, another set is another key
    again, coco = get_label_set(data), get_label_set("coco")
    assert hash(again) == hash(ls) and {ls: 1, again: 2, coco: 3} == {ls: 2, coco: 3}


def test_yaml(tmp_path):
    pytest.importorskip("yaml")
    p = tmp_path / "mine.yaml"
    p.write_text("classes: [background, cup, plate]\ntexts: {cup: mug}\n")
    ls = load_label_set(str(p))
    assert ls.name == "mine" and ls.texts == ("background", "mug", "plate") and ls.ignore_index == 255
    bad = tmp_path / "bad.yml"
    bad.write_text("classes: [background, cup\n")
    with pytest.raises(ValueError, match="bad.yml: not valid YAML"):
        load_label_set(str(bad))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"classes": ["cat", "background"]}, "'classes' has to start with 'background' but starts with ['cat']"),
        ({"classes": ["background", "cat", "Cat"]}, "class 'Cat' is listed twice"),
        ({"classes": ["background", ""]}, "'classes' has to be a list of non-empty strings"),
        ({"classes": "background,cat"}, "'classes' has to be a list of non-empty strings"),
        ({"names": ["background"]}, "a label set has to be an object with a 'classes' list"),
        ({"classes": ["background", "cat"], "ignore_index": 300}, "'ignore_index' has to be an int in [0, 255] but is 300"),
        ({"classes": ["background", "cat"], "ignore_index": 1}, "at most 255 classes below its ignore index 1 but has 2"),
        ({"classes": ["background", "cat"], "texts": {"dog": "hound"}}, "'texts' names 'dog', which is not in 'classes'"),
        ({"classes": ["background", "cat"], "texts": {"cat": " "}}, "the text of 'cat' has to be a non-empty string"),
        ({"classes": ["background", "cat"], "palette": [[0, 0, 0]]}, "one [r, g, b] per class (2) but holds 1"),
        ({"classes": ["background", "cat"], "palette": [[0, 0, 0], [0, 0, 256]]}, "palette entry 1 ('cat')"),
    ],
)
def test_exception(data, message):
    with pytest.raises(ValueError) as exc:
        get_label_set(data)
    assert message in str(exc.value)


def test_exception_files_and_names(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"classes": ["background",\n "cat",]}')
    with pytest.raises(ValueError, match=r"broken.json:2: not valid JSON"):
        get_label_set(str(p))
    with pytest.raises(ValueError, match="has to be one of voc, coco or an existing JSON/YAML file but is 'pascal'"):
        get_label_set("pascal")
    with pytest.raises(TypeError, match="but is int"):
        get_label_set(3)
    with pytest.raises(ValueError, match="class 'unicorn' is not in label set 'voc'"):
        get_label_set("voc").index("unicorn")


def test_frozen():
    ls = get_label_set("voc")
    with pytest.raises(AttributeError):
        ls.name = "x"
    assert isinstance(ls, LabelSet)


def test_synonyms_survive_to_json_and_are_validated(tmp_path):
    from pccfast.data.labelsets import get_label_set as _get

    ls = _get({"name": "fruit", "classes": ["background", "apple"], "synonyms": {"apple": ["pippin"]}})
    assert _get(ls.to_json()).synonyms == {"apple": ["pippin"]}
    with pytest.raises(ValueError, match="'synonyms' names 'pear', which is not in 'classes'"):
        _get({"classes": ["background", "apple"], "synonyms": {"pear": "x"}})
    with pytest.raises(ValueError, match="has to be one of voc, coco"):
        _get(str(tmp_path))  # a folder is not a label-set file
