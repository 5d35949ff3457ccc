"""Tests of hf_scratchgpt/configuration_scratchgpt.py: presets, aliases, validation, save and load."""

import pytest
import torch

from hf_scratchgpt import PRESETS, ScratchGPTConfig, ScratchGPTForCausalLM


def test_aliases_read_and_write_the_book_fields():
    config = ScratchGPTConfig(hidden_size=64, num_attention_heads=8, num_hidden_layers=3, max_position_embeddings=32)
    assert (config.emb_dim, config.n_heads, config.n_layers, config.context_length) == (64, 8, 3, 32)
    assert config.head_dim == 8
    config.num_hidden_layers = 5
    assert config.n_layers == 5


@pytest.mark.parametrize(
    "name, emb_dim, n_layers, n_heads",
    [("gpt2-small", 768, 12, 12), ("gpt2-medium", 1024, 24, 16), ("gpt2-large", 1280, 36, 20), ("gpt2-xl", 1600, 48, 25)],
)
def test_gpt2_presets_have_gpt2_shapes(name, emb_dim, n_layers, n_heads):
    config = ScratchGPTConfig.from_preset(name)
    assert (config.emb_dim, config.n_layers, config.n_heads) == (emb_dim, n_layers, n_heads)
    assert (config.vocab_size, config.context_length, config.qkv_bias) == (50257, 1024, True)


@pytest.mark.parametrize(
    "name, parameters",
    # GPT-2's released sizes with the output head tied to the token embedding, as transformers' GPT2LMHeadModel
    # counts them; the tiny shape by hand: token and position embeddings, then per block the qkv projection (no
    # bias), out_proj, fc1 and fc2 with biases and two LayerNorms, then the final LayerNorm.
    [
        ("gpt2-small", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("tiny", (1000 + 64) * 32 + 2 * (3 * 32 * 32 + 32 * 32 + 32 + 2 * 4 * 32 * 32 + 4 * 32 + 32 + 4 * 32) + 2 * 32),
    ],
)
def test_presets_have_their_published_sizes(name, parameters):
    with torch.device("meta"):
        model = ScratchGPTForCausalLM(ScratchGPTConfig.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_preset_overrides_and_unknown_preset():
    config = ScratchGPTConfig.from_preset("gpt2-small", context_length=256, drop_rate=0.0)
    assert config.context_length == 256 and config.drop_rate == 0.0 and config.emb_dim == 768
    with pytest.raises(ValueError, match="unknown ScratchGPT preset 'gpt3'.*gpt2-small"):
        ScratchGPTConfig.from_preset("gpt3")


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(emb_dim=100, n_heads=12), "emb_dim"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(context_length=0), "context_length"),
        (dict(n_heads=0), "n_heads"),
        (dict(hidden_size=0), "emb_dim"),
        (dict(drop_rate=1.0), "drop_rate"),
        (dict(drop_rate=-0.1), "drop_rate"),
    ],
)
def test_config_that_cannot_work_names_the_field(fields, field):
    with pytest.raises(ValueError, match=rf"ScratchGPTConfig\.{field}"):
        ScratchGPTConfig(**fields)


def test_save_and_load_round_trip(tmp_path):
    config = ScratchGPTConfig.from_preset("tiny", qkv_bias=True, tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    loaded = ScratchGPTConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
