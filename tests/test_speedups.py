"""Tests of hf_scratchgpt/speedups_scratchgpt.py: each speed-up computes what the plain path computes."""

import os
import platform
import time
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from hf_scratchgpt import ScratchGPTConfig, ScratchGPTForCausalLM
from hf_scratchgpt import decode_kernel_scratchgpt, modeling_scratchgpt, speedups_scratchgpt
from hf_scratchgpt.decode_kernel_scratchgpt import build_decode_kernels, decode_kernels
from hf_scratchgpt.speedups_scratchgpt import (
    ChunkedLinearCrossEntropy,
    DecodeLinear,
    KVCache,
    KVCacheLayer,
    _decode_sdpa,
    chunked_causal_lm_loss,
    decode_sdpa_attention,
)


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


@pytest.mark.slow
def test_compiled_chunked_loss_gives_the_eager_gradients():
    # torch 2.11's compile sent the gradient of an output changed in place inside an autograd.Function to the wrong
    # slot (pytorch#180642): with the chunked loss's `loss += ...`, a compiled model did not learn on an H100
    hidden, weight = torch.randn(16, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    assert ChunkedLinearCrossEntropy.apply(hidden, weight, torch.randint(0, 50, (16,)), 4)._version == 0  # not in place
    x = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        model = make_lm(loss_chunk_size=8).train()
        forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        loss = forward(x, labels=x).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager)
    assert all(grad.abs().sum() > 0 for grad in eager_grads.values())
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=name)


@pytest.fixture
def two_threads(monkeypatch):
    """Two threads, and no decode-linear measurement kept from an earlier test."""
    monkeypatch.setattr(DecodeLinear, "fastest_way", {})
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
            torch.testing.assert_close(layer(x[:, None]), expected[:, None], atol=1e-5, rtol=1e-5)  # any way


@pytest.fixture(scope="module")
def kernels():
    """ScratchGPT's decoding kernels, built for this machine (about 20 s the first time on a machine). CI has a
    compiler, so there they must build; elsewhere the tests that need them skip with the reason."""
    built = decode_kernels()
    if built is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the decoding kernel could not be built in CI (see the warning above)")
        pytest.skip("the decoding kernel cannot be built on this machine")
    return built


@pytest.fixture(scope="module")
def kernel(kernels):
    """The matrix-vector kernel alone: F.linear's arguments and result."""
    return kernels.decode_linear


def assert_bf16_products_as_close_as_f_linear(kernel, layer, x):
    """bfloat16 weights and input, float32 sums: as close to the exact product as bfloat16's own F.linear."""
    w16, x16 = layer.weight.bfloat16(), x.bfloat16()
    b16 = layer.bias.bfloat16() if layer.bias is not None else None
    exact = F.linear(x16.double(), w16.double(), b16.double() if b16 is not None else None)
    ours = kernel(x16, w16, b16)
    assert ours.dtype == torch.bfloat16
    error = (ours.double() - exact).abs().max()
    assert error <= 1.5 * (F.linear(x16, w16, b16).double() - exact).abs().max() + 1e-3, error


@pytest.mark.slow
# The kernel takes in_features four vectors of 16 floats (or 32 bfloat16) at a time, then one vector at a time, then
# one value: 777 = 12 x 64 + 9 (float32) = 6 x 128 + 9 (bfloat16); 336 = 5 x 64 + 16 = 2 x 128 + 2 x 32 + 16
@pytest.mark.parametrize("out_features, in_features", [(5001, 256), (1001, 777), (1002, 336), (1003, 64), (1004, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_kernel_gives_the_linear_result(kernel, two_threads, out_features, in_features, bias):
    torch.manual_seed(0)
    layer = DecodeLinear(in_features, out_features, bias=bias)
    for rows in (1, 3, 16):
        x = torch.randn(rows, 2 * in_features)[:, ::2]  # not contiguous
        with torch.no_grad():
            torch.testing.assert_close(kernel(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias),
                                       atol=1e-4, rtol=1e-4)
            assert_bf16_products_as_close_as_f_linear(kernel, layer, x)
    x = torch.randn(2, 3, in_features)  # (batch, tokens, in) -> (batch, tokens, out), as F.linear takes it
    with torch.no_grad():
        torch.testing.assert_close(kernel(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias),
                                   atol=1e-4, rtol=1e-4)
        # the non-temporal prefetch changes where the weights are cached, not the sums
        assert torch.equal(kernel(x, layer.weight, layer.bias, non_temporal=True), kernel(x, layer.weight, layer.bias))


@pytest.mark.slow
def test_decode_kernel_refuses_what_it_cannot_compute(kernel):
    """A one-line error, not a crash or a read past the end (the kernel runs without the GIL)."""
    weight = torch.randn(8, 32)
    for x, w, b, message in [
        (torch.randn(1, 16), weight, None, "shapes do not fit"),
        (torch.randn(2, 32), weight[0], None, "shapes do not fit"),
        (torch.randn(1, 32), weight, torch.randn(7), "bias"),
        (torch.randn(1, 32).double(), weight.double(), None, "float32 or bfloat16"),
        (torch.randn(1, 32).bfloat16(), weight, None, "differ in dtype"),
        (torch.randn(1, 32, device="meta"), weight.to("meta"), None, "CPU"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            kernel(x, w, b)


@pytest.mark.slow
def test_fused_step_functions_refuse_a_way_they_do_not_know(kernels):
    x, norm, qkv = torch.randn(1, 1, 32), torch.ones(32), torch.randn(96, 32)
    with pytest.raises(RuntimeError, match="no product way bogus"):
        kernels.block_attention_input(x, norm, norm, 1e-5, qkv, None, 4, "bogus", None, None, 0)
    with pytest.raises(TypeError):  # the ways are names now, no longer "kernel or not"
        kernels.block_attention_input(x, norm, norm, 1e-5, qkv, None, 4, True, None, None, 0)
    for heads in (0, 5):  # an error, not a division by zero that kills the process
        with pytest.raises(RuntimeError, match="not a multiple of the heads"):
            kernels.block_attention_input(x, norm, norm, 1e-5, qkv, None, heads, "kernel", None, None, 0)


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as file:
        return set(next(line for line in file if line.startswith("flags")).split(":")[1].split())


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or "avx512_bf16" not in cpu_flags(),
                    reason="the other bfloat16 path is the one built here already")
def test_decode_kernel_bf16_without_avx512_bf16(kernel, two_threads):
    """This CPU's build takes AVX-512 BF16's pair products for bfloat16 weights; a build without them takes the
    path every other CPU takes (each 16-bit half of a word turned into a float32), which must be as close."""
    portable = build_decode_kernels(("-mno-avx512bf16",)).decode_linear
    torch.manual_seed(0)
    for in_features in (777, 336):  # 336: the single-vector loop after the fours (see the test above)
        layer = DecodeLinear(in_features, 1001)
        for rows in (1, 3, 16):
            with torch.no_grad():
                assert_bf16_products_as_close_as_f_linear(portable, layer, torch.randn(rows, in_features))


def slowed(way, seconds=0.02):  # far longer than any way takes, even on a busy machine
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return way(*args, **kwargs)

    return slow


def stand_in_kernel() -> mock.Mock:
    """A stand-in for the built kernel, `decode_linear(x, weight, bias, non_temporal=False)`: builds nothing."""
    return mock.Mock(side_effect=lambda x, weight, bias, non_temporal=False: F.linear(x, weight, bias))


@pytest.mark.parametrize("fast_way", ["linear", "split", "kernel", "kernel-nt"])
def test_decode_linear_takes_the_way_measured_fastest_once_per_shape(two_threads, fast_way):
    torch.manual_seed(0)
    layer = DecodeLinear(256, 5000)  # even: the split is one bmm alone
    x = torch.randn(1, 256)
    kernel = stand_in_kernel()
    real_ways = layer._ways

    def ways(flat, threads):  # every way but `fast_way` slowed
        return {name: way if name == fast_way else slowed(way) for name, way in real_ways(flat, threads).items()}

    with torch.no_grad(), mock.patch.object(speedups_scratchgpt, "decode_kernel", return_value=kernel):
        with mock.patch.object(layer, "_ways", side_effect=ways) as measured:
            layer(x)
            layer(x)  # the same shape: measured once
            layer(torch.randn(2, 256))  # another number of rows: measured again
        assert measured.call_count == 2
        assert DecodeLinear.fastest_way == {(rows, 5000, 256, torch.float32, 2): fast_way for rows in (1, 2)}
        kernel.reset_mock()
        with mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
            out = layer(x)
    assert bmm.call_count == (fast_way == "split") and kernel.call_count == fast_way.startswith("kernel")
    if kernel.called:
        assert kernel.call_args.args[3] == (fast_way == "kernel-nt")  # the prefetch of the way measured
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slower", [None, "kernel-nt", "kernel"])
def test_decode_linear_prefers_the_non_temporal_kernel_unless_the_other_is_faster(two_threads, slower):
    """Non-temporal prefetches leave the caches to the rest of a decode step, which the timing of one product does
    not see: "kernel-nt" is taken where it is as fast, "kernel" only where 25% faster."""
    layer = DecodeLinear(256, 5000)
    real_ways = layer._ways

    def ways(flat, threads):  # both kernels slowed alike (their own speeds tie), linear and split and one more
        delays = {"linear": 0.06, "split": 0.06, "kernel": 0.02, "kernel-nt": 0.02} | ({slower: 0.04} if slower else {})
        return {name: slowed(way, delays[name]) for name, way in real_ways(flat, threads).items()}

    with torch.no_grad(), mock.patch.object(speedups_scratchgpt, "decode_kernel", return_value=stand_in_kernel()):
        with mock.patch.object(layer, "_ways", side_effect=ways):
            layer(torch.randn(1, 256))
    expected = "kernel" if slower == "kernel-nt" else "kernel-nt"
    assert DecodeLinear.fastest_way[(1, 5000, 256, torch.float32, 2)] == expected


@pytest.mark.parametrize("seconds, expected", [
    (dict(linear=1.0, kernel=0.5, nt=0.6), "nt"),  # the preferred one, within 25% of the fastest
    (dict(linear=1.0, kernel=0.4, nt=0.6), "kernel"),  # the fastest, 33% faster than the preferred one
    (dict(linear=1.0, kernel=0.8, nt=0.95), "kernel"),  # the preferred one is not 10% faster than the default
    (dict(linear=1.0, kernel=0.97, nt=0.93), "linear"),  # neither is 10% faster than the default
    (dict(linear=1.0, kernel=0.7, nt=0.5), "nt"),
])
def test_measure_fastest_takes_the_default_and_the_preferred_way_unless_another_is_faster(seconds, expected):
    clock = mock.Mock(now=0.0)
    clock.perf_counter = lambda: clock.now

    def costing(cost):  # a way that takes `cost` seconds on the clock
        return lambda: setattr(clock, "now", clock.now + cost)

    ways = {name: costing(cost) for name, cost in seconds.items()}
    with mock.patch.object(speedups_scratchgpt, "time", clock):
        assert speedups_scratchgpt.measure_fastest(ways, default="linear", prefer={"nt": "kernel"}) == expected


def test_decode_linear_measures_nothing_outside_decoding(two_threads):
    layer = DecodeLinear(256, 5000)
    with mock.patch.object(layer, "_measure") as measure, mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
        x = torch.randn(2, 256, requires_grad=True)  # training
        layer(x).sum().backward()
        with torch.no_grad():
            layer(torch.randn(17, 256))  # more rows than decoding has
            with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: F.linear's business
                assert layer(torch.randn(1, 256)).dtype == torch.bfloat16
            small = DecodeLinear(256, 512)
            with mock.patch.object(small, "_measure") as measure_small:
                small(torch.randn(1, 256))  # a small matrix
    assert measure.call_count == measure_small.call_count == bmm.call_count == 0
    assert x.grad is not None and x.grad.shape == x.shape


def test_decode_linear_without_a_kernel_measures_the_other_ways(two_threads, monkeypatch, caplog):
    """Where the kernel cannot be built, a one-line warning says why, and decoding goes on with the other ways;
    `SCRATCHGPT_DECODE_KERNEL=0` builds nothing."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load_inline", mock.Mock(side_effect=RuntimeError("Error building extension\nmore")))
    with caplog.at_level("WARNING", logger=decode_kernel_scratchgpt.__name__):
        assert decode_kernels.__wrapped__() is None
    assert "could not be built here (Error building extension)" in caplog.text
    monkeypatch.setenv("SCRATCHGPT_DECODE_KERNEL", "0")
    assert decode_kernels.__wrapped__() is None and cpp_extension.load_inline.call_count == 1

    layer = DecodeLinear(256, 5000)
    with mock.patch.object(speedups_scratchgpt, "decode_kernel", return_value=None), torch.no_grad():
        assert set(layer._ways(torch.randn(1, 256), 2)) == {"linear", "split"}
        assert set(layer._ways(torch.randn(1, 256), 1)) == {"linear"}
        x = torch.randn(1, 256)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert DecodeLinear.fastest_way[(1, 5000, 256, torch.float32, 2)] in ("linear", "split")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_with_the_kernel_gives_the_logits_of_f_linear(kernel, two_threads, dtype):
    """A model wide enough for `DecodeLinear` to measure (qkv 1,536 x 512, feed-forward 2,048 x 512): decode steps
    with every product on the kernel against every product on `F.linear`."""
    model = make_lm(emb_dim=512, n_heads=8, n_layers=2, vocab_size=2048).to(dtype)
    ids = torch.randint(0, 2048, (2, 5))

    measured = [m for m in model.modules() if isinstance(m, DecodeLinear) and m.weight.numel() >= 2**19]
    counted = mock.Mock(wraps=kernel)

    def decode(way):
        # every shape decided beforehand, the prefill's 10 rows too: nothing is measured, one way runs throughout;
        # the blocks' own forward, which calls DecodeLinear (the fused decode step calls the kernel from C++)
        shapes = [(rows, m.out_features, m.in_features, dtype, 2) for m in measured for rows in (1, 2, 10)]
        DecodeLinear.fastest_way = dict.fromkeys(shapes, way)
        with torch.no_grad(), mock.patch.object(speedups_scratchgpt, "decode_kernel", return_value=counted), \
                mock.patch.object(modeling_scratchgpt, "fused_decode_block", return_value=None):
            cache = KVCache()
            out = model(ids, cache=cache)
            logits = []
            for step in range(3):
                out = model(ids[:, step : step + 1], cache=cache)  # (2, 1): two rows a step
                logits.append(out.logits.float())
        return torch.cat(logits, dim=1)

    theirs = decode("linear")
    assert counted.call_count == 0
    for way in ("kernel", "kernel-nt"):
        ours = decode(way)
        assert counted.call_count == 4 * len(measured)  # the prefill and 3 steps, every large product
        assert all(call.args[3] == (way == "kernel-nt") for call in counted.call_args_list)
        counted.reset_mock()
        tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
        torch.testing.assert_close(ours, theirs, **tolerance)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])  # in inference mode views lack `_base`
def test_kv_cache_of_one_generate_call_grows_by_doubling_in_the_next(mode):
    """generate() bounds the storage by its own length; a cache passed on to a later call still doubles (up to the
    context), not one position at a time."""
    model = make_lm(eos_token_id=None, pad_token_id=0)  # context 64
    ids = torch.randint(1, 1000, (1, 10))
    with mode():
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    assert all(layer.key_store.shape[-2] == 14 for layer in cache.layers)  # 10 + 4: the length generated to
    stores = set()
    for step in range(20):
        with mode():
            model(out.sequences[:, -1:] if step == 0 else torch.randint(1, 1000, (1, 1)), cache=cache)
        stores.add(cache.layers[0].key_store.data_ptr())
    assert cache.layers[0].keys.shape[-2] == 33 and cache.layers[0].key_store.shape[-2] == 62  # 14 -> 30 -> 62
    assert len(stores) == 3


def test_kv_cache_layer_offers_room_only_in_its_own_storage():
    """`room_for`: where the fused decode step may write the next keys and values itself, and where `update` must."""
    layer = KVCacheLayer()
    step = torch.randn(2, 1, 12)  # (B, T, C) of 3 heads of 4
    assert layer.room_for(step, 3) is None  # nothing stored yet
    prompt = torch.randn(2, 3, 5, 4)
    layer.update(prompt, prompt)
    assert layer.room_for(step, 3) is None  # the prompt's storage is its own size: full
    layer.update(prompt[:, :, :1], prompt[:, :, :1])  # 6 of 12 places
    key_store, value_store, past = layer.room_for(step, 3)
    assert key_store is layer.key_store and value_store is layer.value_store and past == 6
    assert layer.room_for(torch.randn(2, 7, 12), 3) is None  # 6 + 7 > 12
    assert layer.room_for(torch.randn(1, 1, 12), 3) is None  # another batch
    assert layer.room_for(step.bfloat16(), 3) is None  # another dtype
    layer.reorder_cache(torch.tensor([1, 0]))  # beam search: the keys are replaced, the storage no longer theirs
    assert layer.room_for(step, 3) is None


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
        model.generate(torch.randint(1, 1000, (1, 40)), max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert all(layer.key_store.shape[-2] == 45 for layer in seen[-1].layers)  # the length generated to, not 80
    finally:
        hook.remove()


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


@pytest.mark.parametrize("bf16_autocast", [False, True])
def test_chunked_loss_with_the_vocabulary_padded_is_the_same_loss_and_gradients(bf16_autocast):
    """CUDA pads the vocabulary to a multiple of 64 (aligned tensor-core matmuls); the padding takes no share of
    the softmax and gets no gradient. Checked here on the CPU, 1,000 -> 1,024, with ignored targets."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(96, 32), torch.randn(1000, 32) / 4
    labels = torch.randint(0, 1000, (96,))
    labels[::7] = -100
    results = []
    for pad_to in (1, 64):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = ChunkedLinearCrossEntropy.apply(h, w, labels, 40, pad_to)  # chunks of 40, 40 and 16 rows
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss, grad_h, grad_w), (padded_loss, padded_grad_h, padded_grad_w) = results
    assert padded_grad_w.shape == weight.shape and padded_grad_h.shape == hidden.shape
    torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(padded_grad_h, grad_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(padded_grad_w, grad_w, rtol=1e-5, atol=1e-7)
    expected = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")  # plain float32
    assert abs(padded_loss.item() - expected.item()) / expected.item() < (1e-2 if bf16_autocast else 1e-5)


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


@pytest.fixture
def decoding():
    """Gradients off, as in generate()."""
    with torch.no_grad():
        yield


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("upcast", [False, True])
def test_decode_sdpa_attention_gives_sdpa_result_either_way(monkeypatch, mask, upcast):
    """One bfloat16 query per sequence over 40 keys, 2 sequences, the second padded on the left by 5."""
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 4, n, 16).bfloat16() for n in (1, 40, 40))
    keep = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    keep[1, ..., :5] = False
    masks = {None: None, "bool": keep, "float": torch.zeros(keep.shape).masked_fill(~keep, -1e9).bfloat16()}
    shape = (2, 4, (40).bit_length(), torch.bfloat16, torch.get_num_threads())
    monkeypatch.setattr(speedups_scratchgpt, "DECODE_SDPA_UPCAST_IS_FASTER", {shape: upcast})
    module = torch.nn.Module().eval()
    with torch.no_grad(), mock.patch.object(speedups_scratchgpt, "_decode_sdpa", wraps=_decode_sdpa) as run:
        out, _ = decode_sdpa_attention(module, query, key, value, masks[mask], scaling=0.25)
    assert run.call_args.args[-1] is upcast  # the way asked for is the way taken
    exact = F.scaled_dot_product_attention(
        query.double(), key.double(), value.double(), attn_mask=None if mask is None else keep, scale=0.25
    ).transpose(1, 2)  # (B, T, nh, hs), as transformers' attention returns it
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 4, 16)
    torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fast", ["bfloat16", "float32"])
def test_decode_sdpa_attention_runs_the_dtype_measured_faster_once_per_shape(monkeypatch, decoding, fast):
    monkeypatch.setattr(speedups_scratchgpt, "DECODE_SDPA_UPCAST_IS_FASTER", {})
    real = speedups_scratchgpt.sdpa_attention_forward
    dtypes = []

    def sdpa(module, query, *args, **kwargs):  # the other dtype made 20 ms slower, as `slowed` does
        dtypes.append(query.dtype)
        if str(query.dtype).removeprefix("torch.") != fast:
            time.sleep(0.02)
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(speedups_scratchgpt, "sdpa_attention_forward", sdpa)
    query, key, value = (torch.randn(1, 4, n, 16).bfloat16() for n in (1, 40, 40))
    module = torch.nn.Module().eval()
    decode_sdpa_attention(module, query, key, value, None, scaling=0.25)
    assert speedups_scratchgpt.DECODE_SDPA_UPCAST_IS_FASTER == {
        (1, 4, 6, torch.bfloat16, torch.get_num_threads()): fast == "float32"
    }
    dtypes.clear()
    decode_sdpa_attention(module, query, key[:, :, :35], value[:, :, :35], None, scaling=0.25)  # 35 keys: 6 bits too
    assert dtypes == [getattr(torch, fast)]  # one call, not measured again
    decode_sdpa_attention(module, query.float(), key.float(), value.float(), None, scaling=0.25)  # float32: as it is
    assert dtypes[-1] == torch.float32 and len(speedups_scratchgpt.DECODE_SDPA_UPCAST_IS_FASTER) == 1


def test_decode_sdpa_attention_leaves_float32_float64_and_training_alone(monkeypatch):
    monkeypatch.setattr(speedups_scratchgpt, "DECODE_SDPA_UPCAST_IS_FASTER", {})
    module = torch.nn.Module()
    for dtype in (torch.float32, torch.float64):
        query, key, value = (torch.randn(1, 4, n, 16, dtype=dtype) for n in (1, 40, 40))
        with torch.no_grad():
            out, _ = decode_sdpa_attention(module.eval(), query, key, value, None, scaling=0.25)
        assert out.dtype == dtype
    query, key, value = (torch.randn(1, 4, n, 16).bfloat16().requires_grad_() for n in (1, 40, 40))
    decode_sdpa_attention(module.train(), query, key, value, None, scaling=0.25, dropout=0.1)  # training
    assert speedups_scratchgpt.DECODE_SDPA_UPCAST_IS_FASTER == {}  # nothing measured


def test_bf16_sdpa_decode_step_gives_eager_attention_logits(monkeypatch):
    """A bf16 model's decode step with SDPA run in float32 (forced; measured otherwise) and as it is, against the
    book's attention: the same logits, to bf16's precision."""
    torch.manual_seed(0)
    model = make_lm().to(torch.bfloat16)
    prompt, token = torch.randint(1, 1000, (2, 12)), torch.randint(1, 1000, (2, 1))
    logits = {}
    monkeypatch.setattr(modeling_scratchgpt, "fused_decode_block", lambda *args: None)  # the blocks' own forward
    for implementation, upcast in (("eager", None), ("sdpa", False), ("sdpa", True)):
        model.set_attn_implementation(implementation)
        monkeypatch.setattr(speedups_scratchgpt, "DECODE_SDPA_UPCAST_IS_FASTER", DictAnswering(upcast))
        with torch.no_grad():
            cache = model(prompt, use_cache=True).cache
            logits[implementation, upcast] = model(token, cache=cache, use_cache=True).logits.float()
    scale = logits["eager", None].abs().max()
    for upcast in (False, True):
        assert (logits["sdpa", upcast] - logits["eager", None]).abs().max() < 0.02 * scale


class DictAnswering(dict):
    """Every key present, with one answer: which way `decode_sdpa_attention` takes, without measuring."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return self.answer


# --- a decode step of a block in two calls of C++ -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [None, "bool", "float", "per head"])
def test_decode_attention_gives_sdpa_result(kernels, dtype, mask):
    """One query per sequence and head over 37 keys and values that are views of a cache's storage (64 places),
    2 sequences, the second padded on the left by 5; head size 24: one vector of 16 and a tail of 8."""
    torch.manual_seed(0)
    key_store, value_store = (torch.randn(2, 3, 64, 24, dtype=dtype) for _ in range(2))
    key, value = key_store[:, :, :37], value_store[:, :, :37]
    query = torch.randn(2, 3, 1, 24, dtype=dtype)
    keep = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    keep[1, ..., :5] = False
    if mask == "per head":  # (B, nh, 1, Tk): each head its own keys
        keep = torch.rand(2, 3, 1, 37) < 0.7
        keep[..., -1] = True
    masks = {None: None, "bool": keep, "per head": keep,
             "float": torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)}
    out = kernels.decode_attention(query, key, value, masks[mask], 0.3)
    exact = F.scaled_dot_product_attention(
        query.double(), key.double(), value.double(), attn_mask=None if mask is None else keep, scale=0.3
    )
    assert out.dtype == dtype and out.shape == (2, 3, 1, 24)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.double(), exact, **tolerance)

    keep[0] = False  # a sequence with every key masked: zeros, not NaN
    out = kernels.decode_attention(query, key, value, keep, 0.3)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and not out.isnan().any()


@pytest.mark.slow
@pytest.mark.parametrize("way", ["kernel", "linear", "mixed"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_block_gives_the_logits_of_the_blocks_forward(kernels, two_threads, way, implementation, dtype):
    """Decode steps of a model wide enough for the kernel (qkv 1,536 x 512, feed-forward 2,048 x 512), 2 sequences,
    the first padded on the left, with the fused decode step against the blocks' own forward, every product the
    kernel's or ATen's, or the three ways in turn (decided beforehand: nothing measured)."""
    torch.manual_seed(0)
    model = make_lm(emb_dim=512, n_heads=8, n_layers=2, vocab_size=2048).to(dtype)
    model.set_attn_implementation(implementation)
    products = [m for m in model.modules() if isinstance(m, DecodeLinear)]
    # mixed, by shape: qkv and fc2 non-temporal, fc1 (and the head, of its shape) the other kernel, out_proj linear
    # (512 x 512 is below DecodeLinear's size)
    mixed = {(1536, 512): "kernel-nt", (2048, 512): "kernel", (512, 2048): "kernel-nt", (512, 512): "linear"}
    DecodeLinear.fastest_way = {
        (2, m.out_features, m.in_features, dtype, 2): mixed[m.out_features, m.in_features] if way == "mixed" else way
        for m in products
    }
    ids, tokens = torch.randint(0, 2048, (2, 6)), torch.randint(0, 2048, (2, 4))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    real = speedups_scratchgpt.fused_decode_block

    def decode(fused: bool):
        taken = []

        def step(*args):
            out = real(*args) if fused else None
            taken.append(out is not None)
            return out

        with torch.no_grad(), mock.patch.object(modeling_scratchgpt, "fused_decode_block", step), \
                mock.patch.object(kernels, "block_attention_input", wraps=kernels.block_attention_input) as inputs, \
                mock.patch.object(kernels, "block_output", wraps=kernels.block_output) as outputs:
            cache = KVCache()
            model(ids, attention_mask=mask, cache=cache)
            logits = []
            for step_mask, token in zip((mask.new_ones(2, n) for n in range(1, 5)), tokens.T):
                out = model(token[:, None], attention_mask=torch.cat([mask, step_mask], 1), cache=cache)
                logits.append(out.logits.float())
        # the ways C++ was given: qkv's (the eighth argument, after the heads), and out_proj's, fc1's and fc2's (last)
        calls = zip(inputs.call_args_list, outputs.call_args_list)
        ways = {(first.args[7], *second.args[-1]) for first, second in calls}
        return torch.cat(logits, 1), taken, ways

    ours, taken, ways = decode(fused=True)
    theirs, _, _ = decode(fused=False)
    assert taken == [False] * 2 + [True] * 8  # the prefill's two blocks, then every block of every step fused
    expected = ("kernel-nt", "linear", "kernel", "kernel-nt") if way == "mixed" else (way, "linear", way, way)
    assert ways == {expected}
    scale = theirs.abs().max()
    tolerance = 1e-5 if dtype == torch.float32 else 0.02
    assert (ours - theirs).abs().max() <= tolerance * scale


@pytest.fixture
def decoding_block(kernels):
    """A tiny model's first block (every product F.linear: nothing to measure), a decode step's input, and a call of
    `fused_decode_block` on them with 5 positions already in the cache, the first sequence padded by 2."""
    torch.manual_seed(0)
    model = make_lm()
    block = model.model.trf_blocks[0]
    batch, past, width = 2, 5, model.config.emb_dim
    keep = torch.ones(batch, 1, 1, past + 1, dtype=torch.bool)
    keep[0, ..., :2] = False

    keys, values = (torch.randn(batch, model.config.n_heads, past, width // model.config.n_heads) for _ in range(2))

    def cache():
        filled = KVCache()
        filled.update(keys.clone(), values.clone(), block.att.layer_idx)
        return filled

    x = torch.randn(batch, 1, width)

    def decode(x=x, kwargs=None):
        return speedups_scratchgpt.fused_decode_block(block, x, keep, cache(), kwargs or {})

    return model, block, x, keep, cache, decode


def test_fused_decode_block_computes_the_blocks_step(decoding_block):
    model, block, x, keep, cache, decode = decoding_block
    with torch.no_grad():
        fused = decode()
        with mock.patch.object(modeling_scratchgpt, "fused_decode_block", return_value=None):
            own = block(x, attention_mask=keep, cache=cache())  # the block's own forward
    assert fused is not None
    torch.testing.assert_close(fused, own, atol=1e-5, rtol=1e-5)


def test_fused_decode_block_steps_aside_where_the_blocks_forward_differs(decoding_block):
    """Anything the fused step would not see or do hands the step back to the block's own forward."""
    model, block, x, keep, cache, decode = decoding_block
    with torch.no_grad():
        assert decode() is not None
        assert decode(x.repeat(1, 2, 1)) is None  # two new tokens
        assert decode(x.half()) is None
        assert decode(kwargs={"output_attentions": True}) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert decode() is None
        for register in (block.ff.fc1.register_forward_hook, block.norm2.register_forward_pre_hook,
                         torch.nn.modules.module.register_module_forward_hook):
            handle = register(lambda *args: None)
            assert decode() is None
            handle.remove()
        block.att.qkv.forward = lambda x: x  # a forward replaced on the instance, as accelerate's offloading does
        assert decode() is None
        del block.att.qkv.forward
        with mock.patch.object(DecodeLinear, "decode_way", return_value="split"):
            assert decode() is None
        block.att.train()
        assert decode() is None
        block.att.eval()
        block.ff.act.approximate = "none"
        assert decode() is None
        block.ff.act.approximate = "tanh"
        gelu = block.ff.act
        block.ff.act = torch.nn.ReLU()  # another activation
        assert decode() is None
        block.ff.act = gelu
        qkv = block.att.qkv
        block.att.qkv = torch.nn.Linear(qkv.in_features, qkv.out_features)  # what an adapter would put there
        assert decode() is None
        block.att.qkv = qkv
        assert decode() is not None
    assert decode() is None  # gradients on


def test_generate_decodes_fused_also_after_a_call_capturing_outputs(kernels):
    """`generate()` takes the fused step for every block of every step after the first; the hooks transformers
    leaves on a model after a call with `output_attentions` do nothing outside such calls, and do not stop it."""
    model = make_lm(eos_token_id=None)
    model.set_attn_implementation("eager")  # attention weights to capture
    ids = torch.randint(1, 1000, (1, 5))
    with torch.no_grad():
        captured = model(ids, output_attentions=True, output_hidden_states=True)
    assert len(captured.attentions) == model.config.n_layers  # the hooks are on the model now
    assert any(block.att._forward_hooks for block in model.model.trf_blocks)
    taken = []
    real = speedups_scratchgpt.fused_decode_block

    def step(*args):
        out = real(*args)
        taken.append(out is not None)
        return out

    with mock.patch.object(modeling_scratchgpt, "fused_decode_block", step):
        model.generate(ids, max_new_tokens=4, do_sample=False)
    layers = model.config.n_layers
    assert taken == [False] * layers + [True] * 3 * layers  # the prefill, then 3 decode steps


# --- the fused step's own operators --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_steps_gelu_and_layer_norm_are_torchs(kernels, dtype):
    """GELU (tanh) and LayerNorm as the fused step computes them, 16 values at a time and the rest one by one, over the
    range of activations: from -60 (GELU's exponential underflows) to 60 (it would overflow), in rows of 53 (3 x 16
    + 5, each row on its own: the tail sees the whole range) and all 318 at once; LayerNorm over rows of 53 with means
    up to 500."""
    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-60, 60, 3 * 53), torch.randn(3 * 53) * 3]).view(6, 53).to(dtype)
    expected = F.gelu(x.double(), approximate="tanh")
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert kernels.gelu_tanh(x).dtype == dtype
    torch.testing.assert_close(kernels.gelu_tanh(x).double(), expected, **tolerance)
    by_row = torch.stack([kernels.gelu_tanh(row) for row in x])
    torch.testing.assert_close(by_row.double(), expected, **tolerance)
    nan = kernels.gelu_tanh(torch.tensor([float("nan")] * 17, dtype=dtype))
    assert nan.isnan().all()  # NaN stays NaN, in the vector and in the tail

    rows = (x + torch.arange(6).view(6, 1).to(dtype) * 100).view(2, 3, 53)  # (B, T, C), means up to 500
    weight, bias = torch.randn(53, dtype=dtype), torch.randn(53, dtype=dtype)
    exact = F.layer_norm(rows.double(), (53,), weight.double(), bias.double(), 1e-5)
    ours, torchs = kernels.layer_norm(rows, weight, bias, 1e-5), F.layer_norm(rows, (53,), weight, bias, 1e-5)
    assert ours.dtype == dtype
    # as close to the exact norm as torch's own (whose float32 sums lose 2e-5 here, with means up to 500)
    assert (ours.double() - exact).abs().max() <= 1.5 * (torchs.double() - exact).abs().max() + 1e-7
    if dtype == torch.bfloat16:  # a norm whose weights are float32 (a bfloat16 x): ATen's
        mixed = kernels.layer_norm(rows, weight.float(), bias.float(), 1e-5)
        assert torch.equal(mixed, F.layer_norm(rows, (53,), weight.float(), bias.float(), 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_with_sharp_scores(kernels, dtype):
    """Scores from -1,000 to 1,000 (the exponentials of most keys underflow to 0) and 40 keys (2 x 16 + 8): the
    weights still sum to one."""
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    query, key, value = (t.to(dtype) for t in (query * 30, key, value))
    out = kernels.decode_attention(query, key, value, None, 1.0)
    exact = F.scaled_dot_product_attention(query.double(), key.double(), value.double(), scale=1.0)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), exact, **tolerance)


def test_decode_attention_gives_nan_for_a_nan_key_unless_masked(kernels):
    """A NaN key makes its head's output NaN, as in ATen's kernels; masked out, it changes nothing."""
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 2, 1, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    key[0, 0, 7] = float("nan")
    out = kernels.decode_attention(query, key, value, None, 0.125)
    assert out[0, 0].isnan().all() and not out[0, 1].isnan().any()
    keep = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    keep[..., 7] = False
    out = kernels.decode_attention(query, key, value, keep, 0.125)
    exact = F.scaled_dot_product_attention(query.double(), key.nan_to_num().double(), value.double(), attn_mask=keep,
                                           scale=0.125)
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)


def test_block_attention_input_writes_several_tokens_after_the_past_ones(kernels):
    """3 new tokens of 2 sequences after 4 in a storage of 10 places: norm1 and the query/key/value product split into
    4 heads, the keys and values written at places 4-6 of each head, the earlier ones kept."""
    torch.manual_seed(0)
    B, T, C, heads, past = 2, 3, 64, 4, 4
    x, norm_w, norm_b = torch.randn(B, T, C), torch.randn(C), torch.randn(C)
    qkv_w, qkv_b = torch.randn(3 * C, C), torch.randn(3 * C)
    key_store, value_store = torch.randn(B, heads, 10, C // heads), torch.randn(B, heads, 10, C // heads)
    earlier = key_store[:, :, :past].clone(), value_store[:, :, :past].clone()
    query, key, value = kernels.block_attention_input(x, norm_w, norm_b, 1e-5, qkv_w, qkv_b, heads, "linear",
                                                      key_store, value_store, past)
    qkv = F.linear(F.layer_norm(x, (C,), norm_w, norm_b, 1e-5), qkv_w, qkv_b)
    expected = qkv.view(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
    torch.testing.assert_close(query, expected[0], atol=1e-5, rtol=1e-5)
    assert key.shape == value.shape == (B, heads, past + T, C // heads)
    torch.testing.assert_close(key, torch.cat([earlier[0], expected[1]], 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value, torch.cat([earlier[1], expected[2]], 2), atol=1e-5, rtol=1e-5)
    assert key.data_ptr() == key_store.data_ptr() and value.data_ptr() == value_store.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_block_at_a_width_not_of_16(kernels, dtype):
    """Width 40 in 2 heads of 20 (each operator's 16 values at a time and its tail), 2 sequences, a cache with room
    (the step's keys and values written into its storage from C++): the block's output and the cache's keys and
    values are those of the block's own forward."""
    torch.manual_seed(0)
    model = make_lm(emb_dim=40, n_heads=2).to(dtype)
    block = model.model.trf_blocks[0]
    keys, values = (torch.randn(2, 2, 5, 20, dtype=dtype) for _ in range(2))
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., :2] = False
    x = torch.randn(2, 1, 40, dtype=dtype)

    def cache():  # 4 positions, then a fifth: the storage has grown to 10 places
        filled = KVCache()
        filled.update(keys[:, :, :4].clone(), values[:, :, :4].clone(), 0)
        filled.update(keys[:, :, 4:].clone(), values[:, :, 4:].clone(), 0)
        return filled

    fused_cache, own_cache = cache(), cache()
    assert fused_cache.layers[0].room_for(x, 2) is not None
    with torch.no_grad():
        fused = speedups_scratchgpt.fused_decode_block(block, x, keep, fused_cache, {})
        with mock.patch.object(modeling_scratchgpt, "fused_decode_block", return_value=None):
            own = block(x, attention_mask=keep, cache=own_cache)
    assert fused is not None and fused.dtype == dtype
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(fused, own, **tolerance)
    for ours, theirs in ((fused_cache.layers[0].keys, own_cache.layers[0].keys),
                         (fused_cache.layers[0].values, own_cache.layers[0].values)):
        assert ours.shape == (2, 2, 6, 20)
        torch.testing.assert_close(ours, theirs, **tolerance)


# --- weights on 2 MB pages ------------------------------------------------------------------------------------


def test_decoding_moves_the_weights_onto_huge_pages_once_keeping_the_parameters(kernels, two_threads, monkeypatch):
    """With `huge_pages` on, the first decode step moves each large weight (2 MB and more) onto 2 MB-aligned memory
    (advised for huge pages; whether Linux gives them is its business): the same Parameter objects (the head still
    tied to the embedding), the same values and logits, moved once, and trainable afterwards, also when decoding ran
    in inference mode. A second model of the shape decodes fused from its first step: its blocks' weights move too."""
    monkeypatch.setattr(DecodeLinear, "huge_pages", True)
    monkeypatch.setattr(speedups_scratchgpt, "transparent_huge_pages", lambda: True)

    def decoder(seed):  # the head and embedding 8 MB; qkv 3 MB, fc1 and fc2 4 MB; out_proj 1 MB (not moved)
        return make_lm(seed, emb_dim=512, n_heads=8, vocab_size=4096)

    model = decoder(0)
    head, out_proj = model.lm_head.weight, model.model.trf_blocks[0].att.out_proj.weight
    assert head is model.model.tok_emb.weight
    values, addresses = head.detach().clone(), (head.data_ptr(), out_proj.data_ptr())
    ids = torch.randint(0, 4096, (1, 5))
    expected = model(ids).logits.detach()  # with gradients: F.linear, nothing moved
    assert head.data_ptr() == addresses[0]
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert model.lm_head.weight is head is model.model.tok_emb.weight
    assert head.data_ptr() != addresses[0] and head.data_ptr() % 2**21 == 0 and torch.equal(head, values)
    assert not head.is_inference()
    assert out_proj.data_ptr() == addresses[1]  # 1 MB: its pages are shared anyway
    moved_to = head.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected)
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert head.data_ptr() == moved_to  # once
    model.train()
    model(ids, labels=ids).loss.backward()
    assert head.grad is not None and head.grad.shape == head.shape

    second = decoder(1)
    block = second.model.trf_blocks[0]
    prompt = torch.randint(0, 4096, (1, 20))  # more rows than decoding has: the prefill runs F.linear, moves nothing
    with torch.no_grad(), mock.patch.object(DecodeLinear, "_measure", side_effect=AssertionError("measured again")):
        second.generate(prompt, max_new_tokens=2, do_sample=False)
    assert all(layer.weight.data_ptr() % 2**21 == 0 for layer in (block.att.qkv, block.ff.fc1, block.ff.fc2))


def test_decoding_leaves_small_weights_views_and_switched_off(kernels, two_threads, monkeypatch):
    """Nothing moves a bfloat16 768 x 768 weight (decoded by DecodeLinear, 1.2 MB), a view into a tensor twice its
    size (another tensor's storage), or any weight with `huge_pages` off; a weight of its own of 8 MB moves."""
    monkeypatch.setattr(DecodeLinear, "huge_pages", True)
    monkeypatch.setattr(speedups_scratchgpt, "transparent_huge_pages", lambda: True)
    small = DecodeLinear(768, 768).to(torch.bfloat16)
    view = DecodeLinear(256, 8192)
    view.weight.data = torch.randn(2 * 8192, 256)[:8192]
    own = DecodeLinear(256, 8192)
    addresses = [layer.weight.data_ptr() for layer in (small, view, own)]
    with torch.no_grad():
        small(torch.randn(1, 768, dtype=torch.bfloat16))
        view(torch.randn(1, 256))
        own(torch.randn(1, 256))
    assert [layer.weight.data_ptr() for layer in (small, view, own)][:2] == addresses[:2]
    assert own.weight.data_ptr() != addresses[2] and own.weight.data_ptr() % 2**21 == 0
    off = DecodeLinear(256, 8192)
    address = off.weight.data_ptr()
    monkeypatch.setattr(DecodeLinear, "huge_pages", False)
    with torch.no_grad():
        off(torch.randn(1, 256))
    assert off.weight.data_ptr() == address
