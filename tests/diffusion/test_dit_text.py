"""Tiny DiT pipelines, their T5-style tokenizer, and the SD3/FLUX class-text encoding."""
import pytest
import torch

from pccfast.core.labelset import as_label_set
from pccfast.diffusion.dit_text import encode_dit_class_texts, t5_class_tokens
from pccfast.diffusion.tiny_dit import build_tiny_dit_pipeline, build_tiny_t5_tokenizer
from pccfast.diffusion.tokens import DROP

VOC = as_label_set("voc")
GARDEN = as_label_set({"name": "garden", "classes": ["background", "zucchini", "traffic cone"],
                       "texts": {"traffic cone": "traffic cone"}})


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_dit_pipeline("tiny-sd3")


@pytest.fixture(scope="module")
def flux():
    return build_tiny_dit_pipeline("tiny-flux")


def test_t5_tokenizer_whole_and_split_words():
    tok = build_tiny_t5_tokenizer()
    assert tok.convert_ids_to_tokens(tok("a cat on a sofa")["input_ids"]) == ["▁a", "▁cat", "▁on", "▁a", "▁so", "fa", "</s>"]
    assert tok.convert_ids_to_tokens(tok("Airplane", add_special_tokens=False)["input_ids"]) == ["▁air", "plane"]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.bos_token_id is None
    ids = tok(["a cat", "a dog"], padding="max_length", max_length=6, return_tensors="pt").input_ids
    assert ids.shape == (2, 6) and ids[0, -1] == 0


def test_tiny_models_are_seeded():
    a, b = build_tiny_dit_pipeline("tiny-flux"), build_tiny_dit_pipeline("tiny-flux")
    c = build_tiny_dit_pipeline("tiny-flux", seed=1)
    wa, wb, wc = (p.transformer.transformer_blocks[0].attn.to_q.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert build_tiny_dit_pipeline("tiny-flux-schnell").transformer.config.guidance_embeds is False
    with pytest.raises(ValueError, match="`name` has to be one of tiny-sd3, tiny-flux, tiny-flux-schnell but is 'tiny-x'"):
        build_tiny_dit_pipeline("tiny-x")


def test_t5_class_tokens_multi_token_classes():
    tok = build_tiny_t5_tokenizer(GARDEN)
    ids, classes = t5_class_tokens(tok, ["aeroplane", "pottedplant"], VOC, end_class=0)
    assert tok.convert_ids_to_tokens(ids) == ["▁air", "plane", "▁pot", "▁plant", "</s>"]
    assert classes == [1, 1, 16, 16, 0]
    ids, classes = t5_class_tokens(tok, ["traffic cone", "zucchini"], GARDEN)
    assert len(ids) == 4 and classes == [2, 2, 1, DROP]
    with pytest.raises(TypeError, match="a list of class names but is the string 'cat'"):
        t5_class_tokens(tok, "cat", VOC)


def test_sd3_class_text_equals_pipeline_prompt_encoding(sd3):
    """The CLIP part of an SD3 class text is what the pipeline makes of the same text (its real
    tokens, after the context embedder); the T5 part follows with its pieces and </s>."""
    names = [["cat", "sofa"], ["aeroplane"]]
    embeds, mask, tok = encode_dit_class_texts(sd3, names, VOC)
    assert tok.texts == ["cat sofa", "airplane"]
    # CLIP: SoT, cat, s, of, a, EoT | T5: cat, so, fa, </s>
    assert tok.classes[0].tolist() == [0, 8, 18, 18, 18, DROP, 8, 18, 18, DROP]
    assert tok.classes[1].tolist()[:7] == [0, 1, 1, DROP, 1, 1, DROP] and mask[1].sum() == 7
    for i, text in enumerate(tok.texts):
        pe, _, _, _ = sd3.encode_prompt(text, text, text, do_classifier_free_guidance=False)
        ref = sd3.transformer.context_embedder(pe)[0]  # (77 + 256, C)
        n_clip = int((tok.classes[i] == DROP).nonzero()[0]) + 1  # through the CLIP EoT
        assert torch.allclose(embeds[i, :n_clip], ref[:n_clip], atol=1e-5)
    assert embeds.shape[-1] == sd3.transformer.config.caption_projection_dim
    assert not embeds[1, 7:].any()  # zero padding


def test_flux_class_text_t5_only_end_token_is_background(flux):
    embeds, mask, tok = encode_dit_class_texts(flux, [["cat"], ["aeroplane", "dog"]], VOC)
    assert tok.classes[0].tolist()[:2] == [8, 0] and mask[0].sum() == 2
    assert tok.classes[1].tolist() == [1, 1, 12, 0]
    ids = tok.ids[1:2]
    ref = flux.transformer.context_embedder(flux.text_encoder_2(ids)[0])[0]
    assert torch.allclose(embeds[1], ref, atol=1e-6)
    assert embeds.shape == (2, 4, flux.transformer.inner_dim)


def test_sd3_without_t5_uses_the_clip_part_only():
    pipe = build_tiny_dit_pipeline("tiny-sd3")
    full, _, tok_full = encode_dit_class_texts(pipe, [["cat"]], VOC)
    pipe.text_encoder_3 = None  # SD3 can run without its T5 encoder (it then feeds zeros)
    clip, mask, tok = encode_dit_class_texts(pipe, [["cat"]], VOC)
    assert tok.classes[0].tolist() == [0, 8, DROP] and mask.sum() == 3
    assert torch.allclose(clip[0], full[0, :3]) and tok_full.classes[0].tolist() == [0, 8, DROP, 8, DROP]
