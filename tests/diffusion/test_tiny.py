"""The tiny offline pipeline: topology like SD 2.1-base, seeded weights, generated tokenizer."""
import pytest
import torch

from pccfast.data.labelsets import get_label_set
from pccfast.diffusion.tiny import TINY_SPLIT_WORDS, build_tiny_pipeline, build_tiny_tokenizer, tiny_vocab_and_merges


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_topology(pipe):
    unet = pipe.unet
    up_self = [n for n in unet.attn_processors if n.startswith("up_blocks.") and ".attn1." in n]
    up_cross = [n for n in unet.attn_processors if n.startswith("up_blocks.") and ".attn2." in n]
    down_cross = [n for n in unet.attn_processors if n.startswith("down_blocks.") and ".attn2." in n]
    assert len(up_self) == 9 and len(up_cross) == 9 and len(down_cross) == 6
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    # heads per up block with attention: 20, 10, 5 (SD 2.1-base), head dim 8
    for block, heads in zip(unet.up_blocks[1:], (20, 10, 5)):
        for att in block.attentions:
            a1 = att.transformer_blocks[0].attn1
            assert a1.heads == heads and a1.to_q.out_features // a1.heads == 8
        assert att.use_linear_projection
    assert pipe.vae_scale_factor == 8
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    assert pipe.safety_checker is None
    assert type(unet.attn_processors[up_self[0]]).__name__ == "AttnProcessor2_0"


def test_seeded_and_leaves_global_rng_alone(pipe):
    state = torch.get_rng_state()
    again = build_tiny_pipeline(seed=0)
    other = build_tiny_pipeline(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    for module in ("unet", "vae", "text_encoder"):
        a, b, c = (getattr(p, module).state_dict() for p in (pipe, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(a[k].numel() > 1 and not torch.equal(a[k], c[k]) for k in a)


def test_generates_deterministically(pipe):
    def run():
        generators = [torch.Generator().manual_seed(5)]
        return pipe("a cat on a couch", num_inference_steps=2, height=64, width=64, generator=generators,
                    output_type="pt").images

    a, b = run(), run()
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0 and float(a.std()) > 0


def test_tokenizer_whole_words(tokenizer):
    """Every VOC/COCO class text word and class name is one token; BPE on our merges agrees with the tokenizer."""
    words = set()
    for name in ("voc", "coco"):
        ls = get_label_set(name)
        for t in list(ls.classes) + list(ls.texts):
            words.update(t.lower().split())
    words -= set(TINY_SPLIT_WORDS)
    for w in sorted(words):
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (w, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.convert_ids_to_tokens(ids)[0] == w + "</w>"


def test_tokenizer_split_and_fallback(tokenizer):
    for w in TINY_SPLIT_WORDS:
        assert len(tokenizer(w, add_special_tokens=False)["input_ids"]) > 1, w
    assert tokenizer.convert_ids_to_tokens(tokenizer("motorbike", add_special_tokens=False)["input_ids"]) == ["motor", "bike</w>"]
    # unknown words fall back to sub-word / byte tokens, never to the unknown token
    ids = tokenizer("xylophone qq 7%", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "xylophone qq 7 %"
    full = tokenizer("a cat")["input_ids"]
    assert full[0] == tokenizer.bos_token_id and full[-1] == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "!"


def test_vocab_layout():
    vocab, merges = tiny_vocab_and_merges()
    assert len(vocab) == 512 + len(merges) + 2  # bytes, bytes</w>, one token per merge, SoT, EoT
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert len(set(merges)) == len(merges)
