import errno
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from pccfast.core.labelset import LabelSet
from pccfast.data.labelsets import get_label_set
from pccfast.cli.common import BROKEN_PIPE_STATUS
from pccfast.cli.prompts import main
from pccfast.data.prompt_bank import builtin_prompts, captions_to_prompts, find_classes, prompt_bank
from pccfast.data.prompt_words import PAIR_TEMPLATES, RELATION_TEMPLATES, SINGLE_TEMPLATES, VOC_PAIRS
from pccfast.data.prompts import EMPTY_PROMPT, PromptEntry, PromptError, read_prompts

VOC = get_label_set("voc")

JSON_LIST = """[
  {"id": 7, "prompt_sd": "a dog on a sofa", "classes": ["Dog", "sofa"]},
  {"id": 8, "prompt_sd": "", "classes": ["cat"]},
  {"id": 9,
   "prompt_sd": "two people", "classes": ["person", "person"]},
  {"id": "x10", "prompt_sd": "a boat", "classes": ["boat"]}
]
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_json_list_value(tmp_path):
    path = write(tmp_path, "p.json", JSON_LIST)
    got = read_prompts(path, VOC)
    # the empty prompt (id 8) is skipped but keeps its position: seeds are base + position
    assert [e.id for e in got] == ["7", "9", "x10"]
    assert [e.index for e in got] == [0, 2, 3]
    assert got[0] == PromptEntry("7", "a dog on a sofa", ("dog", "sofa"), 0, f"{path}:2: entry 0")
    assert got[1].classes == ("person", "person")  # repeats kept as in the reference
    assert got[1].source == f"{path}:4: entry 2"  # the line where the element starts
    assert got[2].source == f"{path}:6: entry 3"


def test_start_limit_count_kept_entries(tmp_path):
    path = write(tmp_path, "p.json", JSON_LIST)
    assert [e.id for e in read_prompts(path, VOC, start=1)] == ["9", "x10"]
    assert [e.index for e in read_prompts(path, VOC, start=1, limit=1)] == [2]
    assert [e.id for e in read_prompts(path, VOC, start=2, limit=9)] == ["x10"]


def test_jsonl(tmp_path):
    text = ('{"id": 1, "prompt": "a cat", "classes": ["cat"]}\n\n'
            '{"prompt_sd": "a bus", "classes": ["BUS"]}\n'
            '{"id": 3, "prompt": "", "classes": []}\n'
            '{"id": 4, "prompt": "a car", "classes": ["car"]}\n')
    path = write(tmp_path, "p.jsonl", text)
    got = read_prompts(path, VOC)
    assert [(e.id, e.prompt, e.classes, e.index, e.source) for e in got] == [
        ("1", "a cat", ("cat",), 0, f"{path}:1"),
        ("3", "a bus", ("bus",), 1, f"{path}:3"),  # no id: the line number
        ("4", "a car", ("car",), 3, f"{path}:5"),
    ]


def test_text_lines(tmp_path):
    text = "# my prompts\n\na cat on a sofa | cat, sofa\nbird7 | a bird on a boat | bird,boat\n  | dog\na dog | dog\n"
    path = write(tmp_path, "p.txt", text)
    got = read_prompts(path, VOC)
    assert [(e.id, e.prompt, e.classes, e.index) for e in got] == [
        ("3", "a cat on a sofa", ("cat", "sofa"), 0),
        ("bird7", "a bird on a boat", ("bird", "boat"), 1),
        ("6", "a dog", ("dog",), 3),  # the empty prompt on line 5 is skipped but counted
    ]
    assert got[2].source == f"{path}:6"


def test_format_override_and_custom_label_set(tmp_path):
    ls = get_label_set({"name": "fruit", "classes": ["background", "red apple", "pear"]})
    path = write(tmp_path, "p.prompts", "[not json] a red apple | Red Apple\n")
    got = read_prompts(path, ls, format="text")
    assert got[0].classes == ("red apple",) and got[0].prompt == "[not json] a red apple"


BAD = [
    ("p.json", '[{"id": 1, "prompt_sd": "x", "classes": ["dgo"]}]', ":1: entry 0: class 'dgo'", "did you mean 'dog'"),
    ("p.txt", "a couch | couch\n", ":1: class 'couch'", "did you mean 'sofa'"),
    ("p.txt", "ok | dog\nno separator here\n", ":2: expected 'prompt | class, class'", "found 0 '|'"),
    ("p.txt", "a | b | c | d\n", ":1: expected", "found 3 '|'"),
    ("p.txt", "a dog | \n", ":1: 'classes' has to name at least one class", "voc"),
    ("p.txt", "a dog | background, dog\n", ":1: 'background' is label 0", "list only"),
    ("p.txt", "../up | a dog | dog\n", ":1: id '../up' is not a plain file name", "path separators"),
    ("p.jsonl", '{"id": 1, "prompt": "a", "classes": ["dog"]}\n{"id": "1", "prompt": "b", "classes": ["cat"]}\n',
     ":2: duplicate id '1'", "p.jsonl:1)"),
    ("p.jsonl", '{"id": 1, "prompt": "a", "classes": ["dog"]}\n{"id": 2, "prompt": "b", "classes": ["cat"]\n',
     ":2: not valid JSON", "one object per line"),
    ("p.jsonl", '{"id": 1, "text": "a", "classes": ["dog"]}\n', ":1: expected a 'prompt_sd'", "['classes', 'id', 'text']"),
    ("p.jsonl", '{"id": 1.5, "prompt": "a", "classes": ["dog"]}\n', ":1: 'id' has to be an int or a string", "1.5"),
    ("p.jsonl", '{"id": 1, "prompt": "a", "classes": "dog"}\n', ":1: 'classes' has to be a list", "but is 'dog'"),
    ("p.jsonl", '{"id": 1, "prompt": "a"}\n', ":1: expected a 'classes' list", ""),
    ("p.jsonl", '{"id": 1, "prompt": 3, "classes": ["dog"]}\n', ":1: 'prompt' has to be a string", "3"),
    ("p.json", '[\n{"id": 1, "prompt_sd": "a", "classes": ["dog"]},\n{"id": 2, "prompt_sd": "b" "classes": []}\n]',
     ":3: not valid JSON", "delimiter"),
    ("p.json", '[{"id": 1, "prompt_sd": "a", "classes": ["dog"]}] extra', ":1: expected the end of the file", ""),
    ("p.json", '[1, 2]', ":1: entry 0: expected an object", "found 1"),
    ("p.json", '[\n{"id": 1, "prompt_sd": "a", "classes": ["dog"]},\n\n{"id": 1, "prompt_sd": "b", "classes": ["cat"]}]',
     ":4: entry 1: duplicate id '1'", "first at"),
]


@pytest.mark.parametrize("name, text, where, hint", BAD)
def test_exception_one_line_with_place(tmp_path, name, text, where, hint):
    path = write(tmp_path, name, text)
    with pytest.raises(PromptError) as exc:
        read_prompts(path, VOC)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(path + where), msg
    assert hint in msg, msg
    assert isinstance(exc.value, ValueError)


def test_exception_file_and_arguments(tmp_path):
    with pytest.raises(PromptError, match=r"/nonexistent/p.json: cannot be read"):
        read_prompts("/nonexistent/p.json", VOC)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe a")
    with pytest.raises(PromptError, match="not UTF-8"):
        read_prompts(str(tmp_path / "bin.txt"), VOC)
    path = write(tmp_path, "p.txt", "a | dog\n")
    with pytest.raises(ValueError, match="`start` has to be an int >= 0 but is -1"):
        read_prompts(path, VOC, start=-1)
    with pytest.raises(ValueError, match="`limit`"):
        read_prompts(path, VOC, limit=-2)
    with pytest.raises(TypeError, match="`warn`"):
        read_prompts(path, VOC, warn="stderr")
    with pytest.raises(ValueError, match="`format`"):
        read_prompts(path, VOC, format="csv")


def test_unknown_class_lists_classes_when_nothing_is_close(tmp_path):
    path = write(tmp_path, "p.txt", "a | zzzqqq\n")
    with pytest.raises(PromptError, match=r"\(classes: aeroplane, bicycle"):
        read_prompts(path, VOC)


# ------------------------------------------------------------------------------------------
# empty prompts and empty input (issue "dataset integrity")
# ------------------------------------------------------------------------------------------
def test_empty_prompts_are_reported_to_warn(tmp_path):
    """Regression: empty prompts were skipped silently; now each is one line to ``warn``."""
    path = write(tmp_path, "p.json", JSON_LIST)
    lines = []
    got = read_prompts(path, VOC, warn=lines.append)
    assert [e.index for e in got] == [0, 2, 3]  # the seeds rule is unchanged
    assert lines == [f"{path}:3: entry 1: empty prompt, skipped (its position still counts for the seeds)"]
    assert lines[0].endswith(EMPTY_PROMPT)
    text = write(tmp_path, "p.txt", "a cat | cat\n  | dog\n\n   | cat\na dog | dog\n")
    lines = []
    got = read_prompts(text, VOC, start=1, limit=1, warn=lines.append)  # start/limit do not hide warnings
    assert [e.index for e in got] == [3]
    assert lines == [f"{text}:2: {EMPTY_PROMPT}", f"{text}:4: {EMPTY_PROMPT}"]
    jsonl = write(tmp_path, "p.jsonl", '{"id": 1, "prompt": " ", "classes": ["cat"]}\n{"id": 2, "prompt": "a", "classes": ["cat"]}\n')
    lines = []
    read_prompts(jsonl, VOC, warn=lines.append)
    assert lines == [f"{jsonl}:1: {EMPTY_PROMPT}"]


def test_warn_is_not_called_when_the_file_fails(tmp_path):
    path = write(tmp_path, "p.txt", " | cat\na cat | kat\n")
    lines = []
    with pytest.raises(PromptError, match=":2: class 'kat'"):
        read_prompts(path, VOC, warn=lines.append)
    assert lines == []


EMPTY_INPUT = [
    ("p.txt", "", "holds no prompts"),
    ("p.json", "", "holds no prompts"),
    ("p.json", "[]", "holds no prompts"),
    ("p.json", " \n[ \n ]\n", "holds no prompts"),
    ("p.jsonl", "\n\n", "holds no prompts"),
    ("p.txt", "# only a comment\n\n# and another\n", "holds no prompts"),
    ("p.txt", " | cat\n\n | dog\n", "all 2 prompts are empty"),
    ("p.json", '[{"id": 1, "prompt_sd": "", "classes": ["cat"]}]', "its only prompt is empty"),
    ("p.jsonl", '{"prompt": "", "classes": []}\n{"prompt": "  ", "classes": []}\n{"prompt": "", "classes": []}\n',
     "all 3 prompts are empty"),
]


@pytest.mark.parametrize("name, text, reason", EMPTY_INPUT)
def test_exception_empty_input(tmp_path, name, text, reason):
    """Regression: an empty file, ``[]`` or all-empty prompts gave an empty list (exit 0, empty dataset)."""
    path = write(tmp_path, name, text)
    lines = []
    with pytest.raises(PromptError) as exc:
        read_prompts(path, VOC, warn=lines.append)
    assert str(exc.value) == f"{path}: {reason}"
    assert lines == []


def test_exception_start_beyond_the_prompts(tmp_path):
    """Regression: ``--start`` past the end gave an empty list (exit 0, empty dataset)."""
    path = write(tmp_path, "p.txt", "a | cat\nb | dog\nc | cow\n")
    with pytest.raises(PromptError) as exc:
        read_prompts(path, VOC, start=50)
    assert str(exc.value) == f"{path}: `--start` 50 is beyond its 3 prompts"
    with pytest.raises(PromptError, match=r"`--start` 3 is beyond its 3 prompts$"):
        read_prompts(path, VOC, start=3)  # at the end is beyond too
    assert [e.id for e in read_prompts(path, VOC, start=2)] == ["3"]
    path = write(tmp_path, "p.json", JSON_LIST)  # 4 records, one of them empty
    with pytest.raises(PromptError) as exc:
        read_prompts(path, VOC, start=3)
    assert str(exc.value) == f"{path}: `--start` 3 is beyond its 3 prompts (1 empty prompt not counted)"


@pytest.mark.parametrize("limit", [0, -1, True, 1.0])
def test_exception_limit_below_one(tmp_path, limit):
    """Regression: ``limit=0`` gave an empty list."""
    path = write(tmp_path, "p.txt", "a | cat\n")
    with pytest.raises(ValueError, match=r"`limit` has to be None or an int >= 1 but is"):
        read_prompts(path, VOC, limit=limit)


def test_shared_prompt_file(shared_prompts):
    """The reference's 44k-prompt file: every entry read, index = position, ids and classes as given."""
    ref = json.load(open(shared_prompts, encoding="utf-8"))
    got = read_prompts(shared_prompts, VOC)
    kept = [(i, r) for i, r in enumerate(ref) if r["prompt_sd"] != ""]
    assert len(got) == len(kept) == 44426
    for e, (i, r) in zip(got[::997], kept[::997]):
        assert (e.id, e.prompt, list(e.classes), e.index) == (str(r["id"]), r["prompt_sd"], r["classes"], i)
    part = read_prompts(shared_prompts, VOC, start=44420, limit=3)
    assert [e.index for e in part] == [44420, 44421, 44422]


# ------------------------------------------------------------------------------------------
# prompt bank
# ------------------------------------------------------------------------------------------
def test_bank_smoke_and_determinism():
    a = prompt_bank(VOC, 10, seed=1)
    assert len(a) == 200 and a == prompt_bank(VOC, 10, seed=1)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in prompt_bank(VOC, 10, seed=2)]
    assert a[:40] == prompt_bank(VOC, 2, seed=1)  # a smaller bank is a prefix
    assert [r["id"] for r in a] == list(range(200))


@pytest.mark.parametrize("ls, per_class", [("voc", 10), ("voc", 60), ("coco", 5)])
def test_bank_balance(ls, per_class):
    label_set = get_label_set(ls)
    bank = prompt_bank(label_set, per_class, seed=0)
    n = len(bank)
    assert n == per_class * (label_set.num_classes - 1)
    shares = Counter(r["template"] for r in bank)
    assert max(shares.values()) / n <= 0.2, shares.most_common(2)
    assert set(shares) <= set(SINGLE_TEMPLATES + PAIR_TEMPLATES + RELATION_TEMPLATES)
    pairs = [r for r in bank if len(r["classes"]) == 2]
    assert abs(len(pairs) / n - 0.4) <= 0.05
    # round-robin: each class anchors the same number of prompts in every round
    for j in range(per_class):
        rnd = bank[j * (label_set.num_classes - 1) : (j + 1) * (label_set.num_classes - 1)]
        for r, c in zip(rnd, label_set.classes[1:]):
            assert c in r["classes"]
    for r in bank:
        assert all(c in label_set.classes[1:] for c in r["classes"])


def test_bank_voc_pairs_are_plausible():
    allowed = {frozenset((a, b)) for a, b, _ in VOC_PAIRS}
    bank = prompt_bank(VOC, 30, seed=5)
    pairs = [r for r in bank if len(r["classes"]) == 2]
    assert pairs and all(frozenset(r["classes"]) in allowed for r in pairs)
    rel = [r for r in pairs if r["template"] in RELATION_TEMPLATES]
    assert rel and any("a person riding a horse" in r["prompt"] for r in bank)
    assert all(r["prompt"] == r["prompt"].strip() and "{" not in r["prompt"] for r in bank)
    assert any(r["prompt"].startswith("an airplane") or " an airplane" in r["prompt"] for r in bank)


def test_bank_exceptions():
    with pytest.raises(ValueError, match="`per_class` has to be an int >= 0 but is -1"):
        prompt_bank(VOC, -1)
    with pytest.raises(ValueError, match="`pair_share`"):
        prompt_bank(VOC, 1, pair_share=1.5)


def test_builtin_prompts():
    default = builtin_prompts(VOC)
    assert len(default) == 400 and len({e.id for e in default}) == 400
    assert [e.index for e in default] == list(range(400))
    assert builtin_prompts(VOC, 25) == default[:25]
    assert [e.classes[0] for e in default[:20]] == list(VOC.classes[1:])  # one per class first
    assert len(builtin_prompts("coco", 3)) == 3
    assert len(builtin_prompts(VOC, 1)) == 1


@pytest.mark.parametrize("n", [0, -3, False])
def test_builtin_prompts_exception_n(n):
    """Regression: ``n=0`` gave an empty bank."""
    with pytest.raises(ValueError, match=rf"`n` has to be None or an int >= 1 but is {n!r}"):
        builtin_prompts(VOC, n)


@pytest.mark.parametrize("n", [None, 1, 5])
def test_builtin_prompts_exception_background_only(n):
    bg = LabelSet("bg", ("background",), ("background",), VOC.palette)
    with pytest.raises(ValueError, match=r"`label_set` 'bg' has no class besides background \(classes: \['background'\]\)"):
        builtin_prompts(bg, n)


# ------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("A man riding a horse", ["person", "horse"]),
        ("two dogs sleeping on a couch", ["dog", "sofa"]),
        ("a hot dog on a plate", []),
        ("Buses and motorcycles near a woman's dining table", ["bus", "motorbike", "person", "diningtable"]),
        ("a TV monitor and a potted plant", ["tvmonitor", "pottedplant"]),
        ("an airplane above the plane trees", ["aeroplane"]),
        ("the children and their puppies", ["person", "dog"]),
        ("a woman", ["person"]),
        ("catalogue of cattle", ["cow"]),  # 'cat' inside a word is not a cat
    ],
)
def test_find_classes(text, expected):
    assert find_classes(text, VOC) == expected


def test_captions_custom_synonyms(tmp_path):
    ls = get_label_set({"name": "fruit", "classes": ["background", "apple", "pear"],
                        "synonyms": {"apple": ["granny smith"], "pear": "conference pear"}})
    recs = captions_to_prompts(["a Granny Smith on a table", "nothing here", "apples and a conference pear"], ls)
    assert recs == [
        {"id": 0, "prompt": "a Granny Smith on a table", "classes": ["apple"]},
        {"id": 1, "prompt": "apples and a conference pear", "classes": ["apple", "pear"]},
    ]
    plain = get_label_set({"name": "fruit", "classes": ["background", "apple", "pear"]})
    assert plain == ls and find_classes("a granny smith", plain) == []  # equal sets, other synonyms: no shared cache
    with pytest.raises(ValueError, match="'synonyms' names 'plum'"):  # refused when the label set is read
        get_label_set({"name": "fruit", "classes": ["background", "apple"], "synonyms": {"plum": ["x"]}})
    bad = LabelSet("fruit", ("background", "apple"), ("background", "apple"), ls.palette, synonyms={"plum": ["x"]})
    with pytest.raises(ValueError, match="'synonyms' names 'plum'"):  # and by the caption matcher if built by hand
        captions_to_prompts(["an apple"], bad)


def test_captions_per_class_cap():
    lines = ["a dog", "a dog and a cat", "another dog", "a cat", "a cat", "a bird"]
    recs = captions_to_prompts(lines, VOC, per_class=1)
    assert [r["prompt"] for r in recs] == ["a dog", "a dog and a cat", "a bird"]


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def test_cli_bank_roundtrip(tmp_path):
    out = tmp_path / "bank.jsonl"
    assert main(["--label-set", "voc", "--per-class", "3", "--seed", "4", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 60 and set(json.loads(lines[0])) == {"id", "prompt", "classes"}
    entries = read_prompts(str(out), VOC)
    assert [e.prompt for e in entries] == [r["prompt"] for r in prompt_bank(VOC, 3, seed=4)]


def test_cli_from_captions_and_stdout(tmp_path, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text("a man on a motorcycle\nan empty road\nTwo cats on a sofa\n")
    assert main(["--from", str(caps)]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert recs == [
        {"id": 0, "prompt": "a man on a motorcycle", "classes": ["person", "motorbike"]},
        {"id": 1, "prompt": "Two cats on a sofa", "classes": ["cat", "sofa"]},
    ]


def test_cli_check(tmp_path, capsys):
    good = write(tmp_path, "p.txt", "a cat | cat\na cat and a dog | cat, dog\n")
    assert main(["--check", good]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 prompts, indices 0..1") and "cat" in out
    bad = write(tmp_path, "q.txt", "a cat | kat\n")
    assert main(["--check", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:1: class 'kat'") and "\n" not in err
    assert main(["--from", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_cli_check_reports_empty_prompts(tmp_path, capsys):
    """Regression: ``--check`` did not mention empty prompts (the README says they are reported)."""
    path = write(tmp_path, "p.txt", "a cat | cat\n | dog\na dog | dog\n   | cow\n")
    assert main(["--check", path]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("2 prompts, indices 0..2, 2 empty prompts skipped (listed as warnings)\n")
    assert cap.err.splitlines() == [f"warning: {path}:2: {EMPTY_PROMPT}", f"warning: {path}:4: {EMPTY_PROMPT}"]
    good = write(tmp_path, "q.txt", "a cat | cat\n")
    assert main(["--check", good]) == 0
    cap = capsys.readouterr()
    assert "empty" not in cap.out and cap.err == ""


@pytest.mark.parametrize("text, reason", [("", "holds no prompts"), ("[]", "holds no prompts"),
                                          (" | cat\n | dog\n", "all 2 prompts are empty")])
def test_cli_check_empty_input(tmp_path, capsys, text, reason):
    path = write(tmp_path, "p.prompts", text)
    assert main(["--check", path]) == 2
    cap = capsys.readouterr()
    assert cap.err == f"error: {path}: {reason}\n" and cap.out == ""


def _fails_without_writing(capsys, argv, out, expected):
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and cap.err.startswith("error: "), cap.err
    assert expected in cap.err, cap.err
    assert not os.path.lexists(out) and not [p for p in os.listdir(os.path.dirname(out)) if p.startswith(".tmp")]


def test_cli_per_class_zero_is_an_error(tmp_path, capsys):
    """Regression: ``--per-class 0`` wrote an empty file with exit status 0."""
    out = str(tmp_path / "bank.jsonl")
    _fails_without_writing(capsys, ["--per-class", "0", "--out", out], out, "`--per-class` has to be >= 1 but is 0")
    _fails_without_writing(capsys, ["--per-class", "-2", "--out", out], out, "`--per-class` has to be >= 1 but is -2")
    caps = write(tmp_path, "caps.txt", "a dog\n")
    _fails_without_writing(capsys, ["--from", caps, "--per-class", "0", "--out", out], out, "`--per-class`")
    assert main(["--per-class", "0"]) == 2  # to standard output: nothing printed either
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("error: ")


def test_cli_captions_naming_no_class_is_an_error(tmp_path, capsys):
    """Regression: captions of which none names a class wrote an empty file with exit status 0."""
    out = str(tmp_path / "p.jsonl")
    caps = write(tmp_path, "caps.txt", "an empty road\n# a comment about a dog\n\na blue sky\n")
    _fails_without_writing(capsys, ["--from", caps, "--out", out], out,
                           f"error: {caps}: none of its 2 captions names a class of label set 'voc'; no prompts written")
    blank = write(tmp_path, "blank.txt", "\n# nothing\n")
    _fails_without_writing(capsys, ["--from", blank, "--out", out], out, f"error: {blank}: holds no captions")


def test_cli_out_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    """Regression: a directory, a missing folder or an unwritable ``--out`` ended in a traceback
    (a missing folder was even created)."""
    folder = tmp_path / "adir"
    folder.mkdir()
    assert main(["--per-class", "1", "--out", str(folder)]) == 2
    cap = capsys.readouterr()
    assert cap.err == f"error: {folder}: is a directory; `--out` has to name a file\n"
    assert os.listdir(folder) == [] and os.listdir(tmp_path) == ["adir"]
    missing = tmp_path / "nope" / "bank.jsonl"
    assert main(["--per-class", "1", "--out", str(missing)]) == 2
    cap = capsys.readouterr()
    assert cap.err == f"error: {missing}: its folder {tmp_path / 'nope'} does not exist (`--out`)\n"
    assert not (tmp_path / "nope").exists()
    afile = write(tmp_path, "afile", "x")
    assert main(["--per-class", "1", "--out", afile + "/bank.jsonl"]) == 2
    assert f"its folder {afile} is not a folder" in capsys.readouterr().err

    def denied(path, data):  # tests run as root: permissions cannot refuse, so refuse here
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".tmp-x"))

    monkeypatch.setattr("pccfast.cli.prompts.atomic_write_bytes", denied)
    out = str(tmp_path / "bank.jsonl")
    assert main(["--per-class", "1", "--out", out]) == 2
    cap = capsys.readouterr()
    assert cap.err == f"error: {out}: cannot be written: Permission denied\n" and cap.out == ""


def test_cli_stdout_closed_by_the_reader(tmp_path):
    """Regression: ``python -m pccfast.prompts | head -1`` ended in a BrokenPipeError traceback."""
    cmd = f"set -o pipefail; {sys.executable} -m pccfast.prompts --per-class 400 | head -1"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    # 141 (as `yes | head` under pipefail) when the write outlived head, 0 when the pipe took it all
    assert r.stderr == "" and r.returncode in (0, BROKEN_PIPE_STATUS), r.stderr
    assert set(json.loads(r.stdout)) == {"id", "prompt", "classes"}
    # the read end closed before anything is written
    p = subprocess.Popen([sys.executable, "-m", "pccfast.prompts", "--per-class", "2"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == BROKEN_PIPE_STATUS and err == "", err


def test_negative_prompt_field(tmp_path):
    """JSON and JSON Lines entries may carry a ``negative_prompt`` (string or null); text lines have none."""
    p = tmp_path / "n.jsonl"
    p.write_text('{"id": 1, "prompt": "a cat", "classes": ["cat"], "negative_prompt": "blurry"}\n'
                 '{"id": 2, "prompt": "a dog", "classes": ["dog"], "negative_prompt": null}\n'
                 '{"id": 3, "prompt": "a bus", "classes": ["bus"]}\n')
    assert [e.negative_prompt for e in read_prompts(str(p), "voc")] == ["blurry", None, None]
    bad = tmp_path / "b.json"
    bad.write_text('[{"id": 1, "prompt_sd": "a cat", "classes": ["cat"], "negative_prompt": 3}]')
    with pytest.raises(PromptError, match=r"b.json:1: entry 0: 'negative_prompt' has to be a string or null but is 3"):
        read_prompts(str(bad), "voc")
