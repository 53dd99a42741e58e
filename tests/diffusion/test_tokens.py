"""Class texts and the token -> class map."""
import itertools

import pytest
import torch

from pccfast.data.labelsets import get_label_set
from pccfast.diffusion.tiny import build_tiny_tokenizer
from pccfast.diffusion.tokens import (
    DROP,
    batch_class_tokens,
    class_text,
    class_tokens,
    encode_class_texts,
    tokens_to_classes,
)

VOC = get_label_set("voc")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_class_text():
    assert class_text(["person", "pottedplant", "diningtable"], "voc") == "person pot plant table"
    assert class_text(["dog", "dog"], VOC) == "dog dog"
    assert class_text(["aeroplane", "tvmonitor"], VOC) == "airplane monitor"


def test_multi_token_words_and_pot_plant(tokenizer):
    ids, cls = class_tokens(tokenizer, ["pottedplant", "motorbike", "cat"], VOC)
    toks = tokenizer.convert_ids_to_tokens(ids)
    assert toks == ["<|startoftext|>", "pot</w>", "plant</w>", "motor", "bike</w>", "cat</w>", "<|endoftext|>"]
    assert cls == [0, 16, 16, 14, 14, 8, DROP]
    ids, cls = class_tokens(tokenizer, ["sofa"], VOC)  # "s" "of" "a</w>"
    assert len(ids) == 5 and cls == [0, 18, 18, 18, DROP]


def test_matches_joined_text_encoding(tokenizer):
    """Per-class encoding concatenated == encoding the joined text; classes follow the words."""
    names = list(VOC.classes[1:])
    combos = [names] + [list(c) for c in itertools.combinations(names, 3)][::37] + [["bus", "bus", "person"]]
    for combo in combos:
        ids, cls = class_tokens(tokenizer, combo, VOC)
        enc = tokenizer(class_text(combo, VOC))
        assert ids == enc["input_ids"], combo
        # independent alignment: the fast tokenizer's word ids, words -> classes by word counts
        word_class = [VOC.index(c) for c in combo for _ in VOC.text_of(c).split()]
        expect = [0 if w is None and i == 0 else DROP if w is None else word_class[w]
                  for i, w in enumerate(enc.word_ids())]
        assert cls == expect, combo


def test_truncated_to_model_length(tokenizer):
    ids, cls = class_tokens(tokenizer, ["sofa"] * 40, VOC)  # 3 tokens each: 120 > 77
    assert len(ids) == 77 and ids[-1] == tokenizer.eos_token_id and cls[-1] == DROP
    assert cls[:-1] == [0] + [18] * 75


def test_batch_padding(tokenizer):
    tok = batch_class_tokens(tokenizer, [["cat"], ["pottedplant", "motorbike"]], "voc")
    assert tok.ids.shape == (2, 6) and tok.texts == ["cat", "pot plant motorbike"]
    assert tok.mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert tok.classes.tolist() == [[0, 8, DROP, DROP, DROP, DROP], [0, 16, 16, 14, 14, DROP]]
    assert (tok.ids[0, 3:] == tokenizer.pad_token_id).all()


def test_exceptions(tokenizer):
    with pytest.raises(ValueError, match="'unicorn' is not in label set 'voc'"):
        class_tokens(tokenizer, ["unicorn"], VOC)
    with pytest.raises(TypeError, match="list of class names"):
        class_tokens(tokenizer, "cat", VOC)
    with pytest.raises(ValueError, match="at least one image"):
        batch_class_tokens(tokenizer, [], VOC)
    with pytest.raises(ValueError, match="have to agree"):
        tokens_to_classes(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, dtype=torch.long), 5)


def test_tokens_to_classes_value():
    maps = torch.arange(1, 6, dtype=torch.float32).view(1, 5, 1, 1).repeat(1, 1, 2, 2)  # token t -> t + 1
    maps[0, 2, 0, 0] = 10.0
    classes = torch.tensor([[0, 3, 3, 1, DROP]])
    out = tokens_to_classes(maps, classes, 4)
    assert out.shape == (1, 4, 2, 2)
    expect = torch.tensor([[1, 1, 1, 1], [4, 4, 4, 4], [0, 0, 0, 0], [10, 3, 3, 3]], dtype=torch.float32)
    assert torch.equal(out[0].flatten(1), expect)


def test_encode_class_texts_unpadded_then_zero_padded(tiny_pipe):
    """Each text is encoded alone (as the reference does): padding neither enters the text
    encoder nor the embeddings."""
    pipe = tiny_pipe
    names = [["cat"], ["pottedplant", "motorbike"]]
    embeds, mask, tok = encode_class_texts(pipe, names, VOC)
    assert embeds.shape == (2, 6, 32) and embeds.dtype == pipe.unet.dtype
    assert torch.equal(mask, tok.mask) and tok.texts == ["cat", "pot plant motorbike"]
    with torch.no_grad():
        for i, n in enumerate(names):
            ids = torch.tensor([pipe.tokenizer(class_text(n, VOC))["input_ids"]])  # (1, T_i)
            alone = pipe.text_encoder(ids)[0][0]  # (T_i, C)
            assert torch.equal(embeds[i, : alone.shape[0]], alone)
            assert torch.equal(embeds[i, alone.shape[0] :], torch.zeros(6 - alone.shape[0], 32))
