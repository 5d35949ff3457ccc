"""Tests of hf_scratchgpt/conversion.py: GPT-2 and the book's checkpoints in and out, to fp32 precision."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from book_gpt import GPTModel
from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM

GPT2_SHAPES = [  # (layers, heads, width, vocab, context, tied)
    (1, 1, 16, 50, 16, True),
    (2, 4, 32, 1000, 64, True),
    (3, 2, 48, 257, 32, False),
    (4, 8, 64, 5003, 128, True),
]


def random_gpt2(n_layer, n_head, n_embd, vocab_size, n_positions, tied, seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions,
        tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2 initialises biases and LayerNorms to constants: randomise them so they count
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("shape", GPT2_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_from_gpt2_gives_gpt2s_logits(shape):
    gpt2 = random_gpt2(*shape)
    ours = ScratchGPTForCausalLM.from_gpt2(gpt2)
    assert ours.config.tie_word_embeddings == shape[-1]
    ids = torch.randint(0, shape[3], (3, shape[4]))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding: the positions are the same for both models
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, gpt2(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours(ids, attention_mask=mask).logits[mask.bool()],
            gpt2(ids, attention_mask=mask).logits[mask.bool()], atol=1e-5, rtol=1e-5,
        )


@pytest.mark.parametrize("shape", GPT2_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_to_gpt2_round_trips_exactly(shape):
    gpt2 = random_gpt2(*shape)
    back = ScratchGPTForCausalLM.from_gpt2(gpt2).to_gpt2()
    assert isinstance(back, GPT2LMHeadModel)
    theirs, ours = gpt2.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


def test_to_gpt2_of_a_book_shaped_model_without_qkv_bias():
    torch.manual_seed(0)
    model = ScratchGPTForCausalLM(ScratchGPTConfig.from_preset("tiny", qkv_bias=False, tie_word_embeddings=False))
    model.eval()
    gpt2 = model.to_gpt2()
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(gpt2(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert not gpt2.config.tie_word_embeddings


def test_from_gpt2_loads_a_saved_gpt2_folder(tmp_path):
    gpt2 = random_gpt2(*GPT2_SHAPES[1])
    gpt2.save_pretrained(tmp_path)
    ours = ScratchGPTForCausalLM.from_gpt2(str(tmp_path))
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, gpt2(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_from_book_state_dict_gives_the_books_logits(tmp_path, qkv_bias):
    cfg = dict(vocab_size=300, context_length=32, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=qkv_bias)
    torch.manual_seed(0)
    book = GPTModel(cfg).eval()
    torch.save(book.state_dict(), tmp_path / "model.pth")
    ours = ScratchGPTForCausalLM.from_book_state_dict(tmp_path / "model.pth", n_heads=4)
    assert (ours.config.qkv_bias, ours.config.tie_word_embeddings) == (qkv_bias, False)
    ids = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, book(ids), atol=1e-5, rtol=1e-5)


def test_book_state_dict_needs_heads_for_an_unknown_width():
    book = GPTModel(dict(vocab_size=50, context_length=8, emb_dim=20, n_heads=2, n_layers=1, drop_rate=0.0,
                         qkv_bias=False))
    with pytest.raises(ValueError, match="20 wide: pass n_heads="):
        ScratchGPTForCausalLM.from_book_state_dict(book.state_dict())
    with pytest.raises(ValueError, match="not a state dict of the book's GPTModel"):
        ScratchGPTForCausalLM.from_book_state_dict({"foo.weight": torch.zeros(1)})
