"""Tests of hf_scratchgpt/modeling_scratchgpt.py: the math, generation, saving and loading, the heads."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM, ScratchGPTForSequenceClassification, ScratchGPTModel


def tiny(**overrides) -> ScratchGPTConfig:
    return ScratchGPTConfig.from_preset("tiny", **{"drop_rate": 0.0, **overrides})


def make_lm(seed=0, **overrides) -> ScratchGPTForCausalLM:
    torch.manual_seed(seed)
    return ScratchGPTForCausalLM(tiny(**overrides)).eval()


def test_loss_is_cross_entropy_of_shifted_logits_ignoring_minus_100():
    model = make_lm()
    x = torch.randint(1, 1000, (3, 12))
    labels = x.clone()
    labels[0, :4] = -100
    labels[2, -3:] = -100
    out = model(x, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 1000), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_eager_attention_is_the_book_math():
    """The eager path against chapter 3's CausalAttention written out with a tril mask, one head at a time."""
    model = make_lm(attn_implementation="eager")
    att = model.model.trf_blocks[0].att
    x = torch.randn(2, 7, 32)
    wq, wk, wv = att.qkv.weight.split(32)
    heads = []
    for h in range(4):
        sl = slice(8 * h, 8 * h + 8)
        q, k, v = x @ wq[sl].T, x @ wk[sl].T, x @ wv[sl].T
        scores = q @ k.transpose(1, 2)
        scores = scores.masked_fill(torch.triu(torch.ones(7, 7), diagonal=1).bool(), -torch.inf)
        heads.append(torch.softmax(scores / 8**0.5, dim=-1) @ v)
    expected = att.out_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(att(x)[0], expected)


def padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 1000, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    return ids, mask


def test_eager_and_sdpa_agree_on_padded_batches():
    ids, mask = padded_batch()
    eager = make_lm(attn_implementation="eager")
    sdpa = make_lm(attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    real = mask.bool()
    torch.testing.assert_close(
        eager(ids, attention_mask=mask).logits[real], sdpa(ids, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    x = torch.randint(0, 1000, (2, 16))
    results = []
    for checkpointing in (False, True):
        model = make_lm()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        loss = model(x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert model.model.trf_blocks[0].gradient_checkpointing
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], msg=name)


def greedy_loop(model, ids, steps):
    for _ in range(steps):
        next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def test_generate_with_and_without_cache_equals_a_plain_loop():
    model = make_lm(eos_token_id=None)
    prompt = torch.randint(1, 1000, (2, 6))
    loop = greedy_loop(model, prompt, 20)
    with_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True)
    without_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, loop)
    assert torch.equal(without_cache, loop)


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_generates_what_each_row_generates_alone(use_cache):
    model = make_lm(eos_token_id=None, pad_token_id=0)
    rows = [torch.randint(1, 1000, (n,)) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (width - len(r), 0), value=0) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0), value=0) for r in rows])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=use_cache)
    for i, row in enumerate(rows):
        alone = greedy_loop(model, row[None], 12)
        assert torch.equal(batch[i, width:], alone[0, len(row) :]), f"row {i}"


def test_generation_stops_at_eos():
    model = make_lm(eos_token_id=None)
    prompt = torch.randint(1, 1000, (1, 5))
    free = model.generate(prompt, max_new_tokens=10, do_sample=False)
    eos = int(free[0, 7])  # make the third new token the end of text
    model.generation_config.eos_token_id = eos
    stopped = model.generate(prompt, max_new_tokens=10, do_sample=False)
    first_eos = (free[0, 5:] == eos).nonzero()[0].item() + 5
    assert torch.equal(stopped[0], free[0, : first_eos + 1])


def test_sequence_longer_than_context_raises_value_error():
    model = make_lm(eos_token_id=None)
    with pytest.raises(ValueError, match="65 tokens .* context_length of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="context_length of 64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10, do_sample=False)


def test_tied_weights_are_one_tensor_and_untied_are_two(tmp_path):
    tied = make_lm()
    assert tied.lm_head.weight is tied.model.tok_emb.weight
    tied.save_pretrained(tmp_path / "tied")
    with safe_open(tmp_path / "tied" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.tok_emb.weight" in f.keys()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.tok_emb.weight.data_ptr()

    untied = make_lm(tie_word_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.model.tok_emb.weight.data_ptr()
    untied.save_pretrained(tmp_path / "untied")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
    torch.testing.assert_close(loaded.lm_head.weight, untied.lm_head.weight, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.tok_emb.weight.data_ptr()


def test_auto_classes_know_scratchgpt(tmp_path):
    model = make_lm()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), ScratchGPTForCausalLM)
    assert isinstance(AutoModel.from_pretrained(tmp_path), ScratchGPTModel)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert isinstance(classifier, ScratchGPTForSequenceClassification) and classifier.score.out_features == 3


LOAD_SCRIPT = """
import sys, torch
{block}
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith({module!r}), type(model).__module__
ids = torch.load(sys.argv[2])
# The same folder as a bare model and as a classifier (the book's chapter 6 starts from a language model).
base = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
classifier = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True, num_labels=2)
assert type(classifier).__name__ == "ScratchGPTForSequenceClassification", type(classifier)
assert classifier(ids).logits.shape == (2, 2)
torch.save({{"state": model.state_dict(), "logits": model(ids).logits, "hidden": base(ids).last_hidden_state}}, sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.parametrize("package_importable", [True, False], ids=["fresh-process", "trust-remote-code-without-package"])
def test_save_then_load_in_another_process(tmp_path, package_importable):
    model = make_lm(qkv_bias=True)
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 1000, (2, 10))
    torch.save(ids, tmp_path / "ids.pt")
    if package_importable:
        block, module = "import hf_scratchgpt", "hf_scratchgpt"
    else:  # hf_scratchgpt cannot be imported: the code must come from the saved folder
        block, module = "sys.modules['hf_scratchgpt'] = None", "transformers_modules"
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT.format(block=block, module=module))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    out = torch.load(tmp_path / "out.pt")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(out["state"][name], tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(out["logits"], model(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(out["hidden"], model.model(ids).last_hidden_state, rtol=0, atol=0)


def test_missing_or_corrupt_weights_name_the_file(tmp_path):
    make_lm().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(OSError, match=f"{weights}.* cannot be read"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_bfloat16_loading_runs_in_bfloat16(tmp_path):
    make_lm().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model(torch.randint(0, 1000, (1, 8))).logits.dtype == torch.bfloat16


def test_logits_to_keep_keeps_the_last_positions():
    model = make_lm()
    x = torch.randint(0, 1000, (2, 10))
    full = model(x).logits
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, full[:, -1:])


def make_classifier(**overrides):
    torch.manual_seed(0)
    return ScratchGPTForSequenceClassification(tiny(num_labels=3, **overrides)).eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_classification_logits_do_not_depend_on_padding(attn_implementation):
    pad = 0  # pad == eos, as in the book's chapter 6
    model = make_classifier(pad_token_id=pad, attn_implementation=attn_implementation)
    text = torch.randint(1, 1000, (6,))
    alone = model(text[None]).logits
    for left, right in [(0, 4), (3, 0), (2, 5), (7, 0)]:
        ids = F.pad(text, (left, right), value=pad)[None]
        mask = F.pad(torch.ones_like(text), (left, right), value=0)[None]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, alone, atol=1e-5, rtol=1e-5)
    # Without a mask, right padding with pad_token_id is found from the ids.
    torch.testing.assert_close(model(F.pad(text, (0, 3), value=pad)[None]).logits, alone, atol=1e-5, rtol=1e-5)


def test_classification_loss_and_head_survive_save_and_load(tmp_path):
    model = make_classifier()
    ids = torch.randint(1, 1000, (4, 8))
    labels = torch.tensor([0, 2, 1, 2])
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.score.weight, model.score.weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded(ids).logits, out.logits, rtol=0, atol=0)


def test_output_hidden_states():
    model = make_lm()
    out = model(torch.randint(0, 1000, (1, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layers + 1
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


@pytest.mark.slow
def test_torch_compile_sees_no_graph_break_in_training_or_inference():
    model = make_lm(attn_implementation="sdpa").train()
    ids = torch.randint(0, 1000, (2, 16))
    assert torch._dynamo.explain(model.model.trf_blocks[0])(torch.randn(2, 16, 32)).graph_break_count == 0
    assert torch._dynamo.explain(model)(ids, labels=ids).graph_break_count == 0
    model.eval()
    with torch.no_grad():
        assert torch._dynamo.explain(model)(ids).graph_break_count == 0


def test_book_init_scheme_is_pytorchs_default_and_survives_loading(tmp_path):
    model = make_lm(init_scheme="book", tie_word_embeddings=False)
    fc1 = model.model.trf_blocks[0].ff.fc1
    bound = 1 / fc1.in_features**0.5
    assert fc1.weight.abs().max() <= bound and fc1.weight.abs().max() > 0.9 * bound  # uniform in +-1/sqrt(fan_in)
    assert 0.9 < model.model.tok_emb.weight.std() < 1.1  # N(0, 1) embeddings, as nn.Embedding's default
    assert make_lm().model.tok_emb.weight.std() < 0.03  # GPT-2's N(0, 0.02)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # the loaded weights, not a new initialisation
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="ScratchGPTConfig.init_scheme"):
        tiny(init_scheme="xavier")


# transformers' generic model interface (issue 14; the generic tests themselves are in test_transformers_common.py).


@pytest.mark.parametrize("model_class", [ScratchGPTModel, ScratchGPTForCausalLM, ScratchGPTForSequenceClassification])
def test_attentions_hidden_states_and_tuples_as_transformers_models_return_them(model_class):
    torch.manual_seed(0)
    model = model_class(tiny(num_labels=2, attn_implementation="eager")).eval()
    ids = torch.randint(1, 1000, (2, 6))
    out = model(ids, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 6, 6)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 6))  # softmax rows
    assert len(out.hidden_states) == 3
    as_tuple = model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    first = out.last_hidden_state if model_class is ScratchGPTModel else out.logits
    torch.testing.assert_close(as_tuple[0], first)


def test_generate_returns_attentions_and_hidden_states_of_each_step():
    model = make_lm(eos_token_id=None, attn_implementation="eager")
    ids = torch.randint(1, 1000, (2, 5))
    out = model.generate(
        ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_attentions=True,
        output_hidden_states=True,
    )
    assert len(out.attentions) == len(out.hidden_states) == 3  # one per generated token
    assert out.attentions[0][0].shape == (2, 4, 5, 5) and out.attentions[-1][0].shape == (2, 4, 1, 7)
    assert len(out.hidden_states[0]) == 3


def test_past_key_values_is_the_deprecated_name_of_cache():
    from hf_scratchgpt.modeling_scratchgpt import KVCache

    model = make_lm()
    ids = torch.randint(1, 1000, (1, 6))
    expected = model(ids, cache=KVCache(), use_cache=True)
    for forward in (model, model.model):
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            out = forward(ids, past_key_values=KVCache(), use_cache=True)
        assert out.cache.get_seq_length() == 6
    torch.testing.assert_close(out.last_hidden_state, model.model(ids).last_hidden_state)
    torch.testing.assert_close(model(ids, past_key_values=KVCache()).logits, expected.logits)


@pytest.mark.parametrize("model_class", [ScratchGPTModel, ScratchGPTForCausalLM, ScratchGPTForSequenceClassification])
def test_unknown_keyword_is_an_error(model_class):
    model = model_class(tiny(num_labels=2)).eval()
    with pytest.raises(TypeError, match="unexpected keyword arguments: token_type_ids"):
        model(torch.randint(1, 1000, (1, 4)), token_type_ids=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("loss_chunk_size", [0, 5])
def test_shift_labels_replace_labels_in_the_plain_and_the_chunked_loss(loss_chunk_size):
    model = make_lm(loss_chunk_size=loss_chunk_size).train()
    x = torch.randint(0, 1000, (2, 10))
    shifted = F.pad(x[:, 1:], (0, 1), value=-100)
    reference = model(x, labels=x).loss  # labels shifted inside
    torch.testing.assert_close(model(x, shift_labels=shifted).loss, reference)
    torch.testing.assert_close(model(x, labels=torch.zeros_like(x), shift_labels=shifted).loss, reference)
    other = torch.randint(0, 1000, (2, 10))
    assert not torch.equal(model(x, labels=x, shift_labels=other).loss, reference)


def test_trainer_finds_labels_as_its_only_label_name():
    from transformers.utils import find_labels

    # Trainer reads every forward parameter named `*label*` as a label each batch must carry, or skips the eval loss.
    assert find_labels(ScratchGPTForCausalLM) == ["labels"]


def test_context_length_counts_positions_so_packed_sequences_pass():
    model = make_lm()  # context_length 64
    packed = torch.randint(1, 1000, (1, 100))  # two sequences of 50 tokens, one row, no padding
    positions = torch.cat([torch.arange(50), torch.arange(50)])[None]
    assert model(packed, position_ids=positions).logits.shape == (1, 100, 1000)
    with pytest.raises(ValueError, match="65 tokens .* context_length of 64"):
        model(packed[:, :65], position_ids=torch.arange(65)[None])


@pytest.mark.slow
def test_static_cache_compiles_in_one_graph_and_the_model_exports():
    from transformers import StaticCache

    model = make_lm(attn_implementation="sdpa")
    ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        explained = torch._dynamo.explain(model)(ids, cache=StaticCache(config=model.config, max_cache_len=16))
        assert explained.graph_break_count == 0
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        cache = StaticCache(config=model.config, max_cache_len=16)
        torch.testing.assert_close(compiled(ids[:, :7], cache=cache).logits, expected[:, :7])
        torch.testing.assert_close(compiled(ids[:, 7:], cache=cache).logits, expected[:, 7:], atol=1e-5, rtol=1e-5)
        exported = torch.export.export(model, (ids,), {"use_cache": False})
        torch.testing.assert_close(exported.module()(ids, use_cache=False).logits, expected)
