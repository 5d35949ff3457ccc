"""Tests of hf_scratchgpt/speedups_scratchgpt.py: each speed-up computes what the plain path computes."""

import time
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt.speedups_scratchgpt import DecodeLinear, KVCache, chunked_causal_lm_loss


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

    # A step writes into storage that doubles when full: the 6 prompt tokens make a store of their size, the 7th
    # token one for 14, the 15th one for 30, which holds the 6 + 19 tokens fed in (the 20th is never fed back).
    cache = KVCache()
    model.generate(ids, cache=cache, **kwargs)
    for layer in cache.layers:
        assert layer.keys._base is layer.key_store and layer.values._base is layer.value_store
        assert layer.keys.shape[-2] == 25 and layer.key_store.shape[-2] == 30


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


@pytest.fixture
def two_threads(monkeypatch):
    """Two threads, and no decode-linear measurement kept from an earlier test."""
    monkeypatch.setattr(DecodeLinear, "split_is_faster", {})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_decode_linear_split_gives_the_linear_result(two_threads):
    torch.manual_seed(0)
    layer = DecodeLinear(256, 5001)  # odd: two blocks of 2,500 outputs and one more; 1.3M weights, above the threshold
    for rows in (1, 3, 16):
        x = torch.randn(rows, 256)
        with torch.no_grad():
            expected = F.linear(x, layer.weight, layer.bias)
            torch.testing.assert_close(layer._split_linear(x, 2), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer(x[:, None]), expected[:, None], atol=1e-5, rtol=1e-5)  # either way


def slowed(way, seconds=0.02):  # far longer than either way takes, even on a busy machine
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return way(*args, **kwargs)

    return slow


@pytest.mark.parametrize("slow_way", ["split", "plain"])
def test_decode_linear_takes_the_way_measured_faster_once_per_shape(two_threads, slow_way):
    torch.manual_seed(0)
    layer = DecodeLinear(256, 5000)  # even: the split is one bmm alone, F.linear is the plain way alone
    x = torch.randn(1, 256)
    slow_split = mock.patch.object(layer, "_split_linear", slowed(layer._split_linear))
    slow_plain = mock.patch("torch.nn.functional.linear", slowed(F.linear))
    with torch.no_grad(), (slow_split if slow_way == "split" else slow_plain):
        with mock.patch.object(layer, "_measure_split", wraps=layer._measure_split) as measure:
            layer(x)
            layer(x)  # the same shape: measured once
            layer(torch.randn(2, 256))  # another number of rows: measured again
    assert measure.call_count == 2
    assert DecodeLinear.split_is_faster == {
        (rows, 5000, 256, torch.float32, 2): slow_way == "plain" for rows in (1, 2)
    }
    with torch.no_grad(), mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
        out = layer(x)
    assert bmm.call_count == (slow_way == "plain")
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_decode_linear_measures_nothing_outside_decoding(two_threads):
    layer = DecodeLinear(256, 5000)
    with mock.patch.object(layer, "_measure_split") as measure, mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
        x = torch.randn(2, 256, requires_grad=True)  # training
        layer(x).sum().backward()
        with torch.no_grad():
            layer(torch.randn(17, 256))  # more rows than decoding has
            small = DecodeLinear(256, 512)
            with mock.patch.object(small, "_measure_split") as measure_small:
                small(torch.randn(1, 256))  # a small matrix
    assert measure.call_count == measure_small.call_count == bmm.call_count == 0
    assert x.grad is not None and x.grad.shape == x.shape


def test_kv_cache_never_holds_more_than_the_context():
    model = make_lm(eos_token_id=None, pad_token_id=0)  # context 64
    cache = KVCache(model.config.context_length)
    model.generate(torch.randint(1, 1000, (1, 50)), cache=cache, max_new_tokens=14, min_new_tokens=14, do_sample=False)
    for layer in cache.layers:  # 50 prompt tokens, then 51 would have made a store of 102 positions
        assert layer.keys.shape[-2] == 63 and layer.key_store.shape[-2] == 64
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["cache"]), with_kwargs=True
    )
    try:
        model.generate(torch.randint(1, 1000, (1, 40)), max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    assert all(layer.key_store.shape[-2] == 64 for layer in seen[-1].layers)  # generate() bounds it by the context


def chunked_loss_and_grads(hidden, weight, labels, chunk_size, bf16_autocast):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
        if chunk_size:
            loss = chunked_causal_lm_loss(hidden[None], weight, labels[None], chunk_size)
        else:  # the plain path: all the logits, then transformers' cross-entropy in float32
            logits = F.linear(hidden, weight).float()
            loss = F.cross_entropy(logits[:-1], labels[1:])
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def relative_error(value, reference):
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


@pytest.mark.parametrize("case", ["autocast", "bf16 weights"])
def test_chunked_loss_in_bfloat16_is_as_close_to_float32_as_the_plain_path(case):
    torch.manual_seed(0)
    hidden, weight = torch.randn(256, 64), torch.randn(1000, 64) / 8
    labels = torch.randint(0, 1000, (256,))
    reference = chunked_loss_and_grads(hidden, weight, labels, 0, bf16_autocast=False)  # float32
    if case == "bf16 weights":  # a model cast with .to(torch.bfloat16): no autocast, everything in bfloat16
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    autocast = case == "autocast"
    plain = chunked_loss_and_grads(hidden, weight, labels, 0, bf16_autocast=autocast)
    chunked = chunked_loss_and_grads(hidden, weight, labels, 8, bf16_autocast=autocast)  # 32 chunks
    for ours, theirs, expected, name in zip(chunked, plain, reference, ("loss", "hidden grad", "weight grad")):
        assert ours.dtype == theirs.dtype, name  # float32 loss; each gradient in its input's dtype
        assert relative_error(ours, expected) <= 1.5 * relative_error(theirs, expected) + 1e-6, name
    if autocast:  # the matmuls ran in bfloat16: not float32's result to the last bit
        assert relative_error(chunked[2], reference[2]) > 1e-4
