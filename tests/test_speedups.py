"""Tests of hf_scratchgpt/speedups_scratchgpt.py: each speed-up computes what the plain path computes."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.speedups_scratchgpt import DecodeLinear, KVCache


def make_lm(seed=0, **overrides) -> ScratchGPTForCausalLM:
    torch.manual_seed(seed)
    return ScratchGPTForCausalLM(ScratchGPTConfig.from_preset("tiny", **{"drop_rate": 0.0, **overrides})).eval()


@pytest.mark.slow
def test_kv_cache_appends_in_place_and_generates_what_dynamic_cache_generates():
    model = make_lm(eos_token_id=None, pad_token_id=0)
    ids = torch.randint(1, 1000, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row
    kwargs = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    for extra in ({}, dict(num_beams=3, num_return_sequences=2)):  # beam search reorders the cache every step
        ours = model.generate(ids, cache=KVCache(), **kwargs, **extra)
        theirs = model.generate(ids, cache=DynamicCache(), **kwargs, **extra)
        assert torch.equal(ours, theirs), extra

    # A step writes into storage that doubles when full: the 6 prompt tokens make a store for 12 tokens, the 13th
    # one for 26, which holds the 6 + 19 tokens fed in (the 20th new token is never fed back).
    cache = KVCache()
    model.generate(ids, cache=cache, **kwargs)
    for layer in cache.layers:
        assert layer.keys._base is layer.key_store and layer.values._base is layer.value_store
        assert layer.keys.shape[-2] == 25 and layer.key_store.shape[-2] == 26


def test_generate_decodes_with_kv_cache_unless_given_a_cache():
    model = make_lm(eos_token_id=None)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(type(kwargs["cache"])), with_kwargs=True)
    try:
        model.generate(torch.randint(1, 1000, (1, 4)), max_new_tokens=2, do_sample=False)
        model.generate(torch.randint(1, 1000, (1, 4)), max_new_tokens=2, do_sample=False, cache=DynamicCache())
    finally:
        hook.remove()
    assert seen == [KVCache, KVCache, DynamicCache, DynamicCache]


def test_kv_cache_under_autograd_keeps_gradients_right():
    model = make_lm(eos_token_id=None)
    ids = torch.randint(1, 1000, (1, 8))
    cache = KVCache()
    first = model(ids[:, :5], cache=cache, use_cache=True).logits
    second = model(ids[:, 5:], cache=cache, use_cache=True).logits
    (first.sum() + second.sum()).backward()  # the second step's keys include the first's: no in-place write broke them
    cached = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids, use_cache=False).logits.sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(cached[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_chunked_training_loss_equals_the_plain_loss_and_gradients(chunk_size):
    x = torch.randint(0, 1000, (3, 20))
    labels = x.clone()
    labels[0, :6] = -100
    results = []
    for loss_chunk_size in (chunk_size, 0):
        model = make_lm(loss_chunk_size=loss_chunk_size).train()
        out = model(x, labels=labels, num_items_in_batch=torch.tensor(40))
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (chunked, chunked_grads), (plain, plain_grads) = results
    assert chunked.logits is None and plain.logits is not None
    expected = F.cross_entropy(plain.logits[:, :-1].reshape(-1, 1000), labels[:, 1:].reshape(-1), reduction="sum") / 40
    torch.testing.assert_close(plain.loss, expected)
    torch.testing.assert_close(chunked.loss, plain.loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, msg=name)


def test_decode_linear_splits_over_threads_with_the_same_result():
    torch.manual_seed(0)
    layer = DecodeLinear(256, 5001)  # odd: two blocks of 2,500 outputs and one more; 1.3M weights, above the threshold
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
            for shape in [(1, 256), (3, 1, 256), (16, 256)]:  # decoding: a few rows, no autograd
                x = torch.randn(shape)
                with torch.no_grad():
                    out = layer(x)
                assert out.shape == (*shape[:-1], 5001)
                torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
            assert bmm.call_count == 3  # each of them took the split path
            bmm.reset_mock()
            x = torch.randn(2, 256, requires_grad=True)  # training
            layer(x).sum().backward()
            with torch.no_grad():
                layer(torch.randn(17, 256))  # more rows than decoding has
                DecodeLinear(256, 512)(torch.randn(1, 256))  # a small matrix
            assert bmm.call_count == 0  # each of them took F.linear
            assert x.grad is not None and x.grad.shape == x.shape
    finally:
        torch.set_num_threads(threads)
