"""Chapters 3-5, the speed work beside the book's model: a decode-friendly linear layer, a fused decode step, an
in-place KV cache and a chunked training loss.

None of it changes what the model computes; each piece changes how fast, or in how much memory:

- `DecodeLinear`: `nn.Linear`, with the matrix-vector products of decoding run the way measured fastest on the CPU
  (one of them ScratchGPT's own kernel, `decode_kernel_scratchgpt.py`), and its weight moved onto 2 MB pages when
  asked (`SCRATCHGPT_HUGE_PAGES=1`);
- `KVCache` / `KVCacheLayer`: the book's KV cache as a transformers `Cache` that appends in place, instead of
  copying all earlier keys and values at every generated token;
- `ChunkedLinearCrossEntropy` / `chunked_causal_lm_loss`: the training loss without the (tokens x vocabulary)
  logits in memory;
- `fused_decode_block`: a transformer block's decode step on the CPU in two calls of C++ (the kernels' file), not
  some 25 operators called from Python; `KVCacheLayer.room_for` lets it write the step's keys and values itself;
- `decode_sdpa_attention`: a decode step's SDPA in float32 for a 16-bit model on the CPU, where measured faster
  (for the steps `fused_decode_block` leaves to the block's own forward);
- `packed_sdpa_attention`: packed sequences attended one by one, each with SDPA's causal kernel, instead of the
  whole row under a block-diagonal mask (flash attention's variable-length kernels, for any device).

`modeling_scratchgpt.py` imports this file, so `save_pretrained` copies it (and the kernel's file) beside the model's
code: it imports only torch, transformers and that sibling.
"""

import functools
import glob
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .decode_kernel_scratchgpt import decode_kernel, decode_kernels


class DecodeLinear(nn.Linear):
    """`nn.Linear`, with the matrix-vector products of decoding run the fastest way on this machine.

    Generating a token multiplies each weight matrix by one vector per sequence: a product bound by reading the
    weights. Three ways can run it:

    - `"linear"`: `F.linear`, the BLAS library's product (MKL threads it on Intel CPUs, not on AMD ones);
    - `"split"`: the output features in one block per thread, the blocks multiplied by one `bmm`, which runs them
      on all cores;
    - `"kernel"`: ScratchGPT's own matrix-vector kernel (`decode_kernel_scratchgpt.py`), built for this CPU on first
      use, which reads the weights at about the speed of the memory (float32 and bfloat16 weights);
    - `"kernel-nt"`: the same with the weights prefetched non-temporally, which leaves the caches to the rest of a
      decode step where the CPU allows it (a whole step 1-7% faster on an AMD EPYC, the products alone as fast),
      and halves the products' speed where it does not (an Intel Xeon). Taken unless `"kernel"` is 25% faster:
      timing one product cannot see the rest of the step, and small products' timings differ by 10% by chance.

    Which wins depends on the CPU, its BLAS and the shape, so it is measured: the first product of each shape times
    the ways, and the process keeps the fastest (as cuDNN's benchmark mode does) in `DecodeLinear.fastest_way`.
    `F.linear` is replaced only by a way 10% faster. Training, GPUs, autocast, `torch.compile` and small matrices
    take `F.linear`.

    With `huge_pages` on (`SCRATCHGPT_HUGE_PAGES=1`), the layer first moves its weight onto 2 MB pages where Linux
    allows it (`_to_huge_pages`): a decode step reads all the weights, and on 4 KB pages nearly every page of them
    costs a page walk. Off by default: the move costs the first decode step 0.3-1 s at GPT-2 small on this
    project's virtual machines (faulting in fresh memory), more than short `generate()` calls win back.
    """

    # (rows, out_features, in_features, dtype, threads) -> "linear", "split", "kernel" or "kernel-nt", for the process
    fastest_way: dict[tuple, str] = {}
    max_rows = 16  # more rows than this are not decoding: F.linear
    min_weights = 2**19  # 512K weights, from GPT-2 small's 768 x 768 up; fewer: F.linear
    huge_pages = os.environ.get("SCRATCHGPT_HUGE_PAGES", "0") == "1"  # True: decoding moves the weights (above)
    _huge_pages_tried = False  # the move is tried once a layer (a weight swapped in on every call is not copied)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # each `self.weight` is a lookup: read once (a step makes 49 calls)
        rows = x.numel() // x.shape[-1]
        if (
            rows > self.max_rows
            or self.in_features * self.out_features < self.min_weights
            or torch.is_grad_enabled()
            or not x.is_cpu
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()
        ):
            return F.linear(x, weight, bias)
        weight = self._decoding_weight()
        threads = torch.get_num_threads()
        shape = (rows, self.out_features, self.in_features, weight.dtype, threads)
        way = self.fastest_way.get(shape)
        if way is None:
            way = self.fastest_way[shape] = self._measure(x.reshape(rows, self.in_features), threads)
        if way in ("kernel", "kernel-nt"):
            return decode_kernel()(x, weight, bias, way == "kernel-nt")  # (..., in) -> (..., out), as F.linear
        if way == "split":
            out = self._split_linear(x.reshape(rows, self.in_features), threads)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, bias)

    def decode_way(self, rows: int, threads: int) -> str | None:
        """The way `forward` runs this layer's product of `rows` rows in decoding (no gradients, CPU, no autocast),
        None where it has not been measured yet."""
        if rows > self.max_rows or self.in_features * self.out_features < self.min_weights:
            return "linear"
        dtype = self._parameters["weight"].dtype  # not `self.weight`: a decode step asks 48 times
        return self.fastest_way.get((rows, self.out_features, self.in_features, dtype, threads))

    def _decoding_weight(self) -> torch.Tensor:
        """The weight as decoding reads it: moved onto 2 MB pages first, once, where `huge_pages` asks for it."""
        if self.huge_pages and not self._huge_pages_tried:
            return self._to_huge_pages()
        return self._parameters["weight"]

    def _to_huge_pages(self) -> torch.Tensor:
        """The weight, moved onto 2 MB pages (Linux's transparent huge pages, `huge_page_copy` of the kernels' build)
        where `movable_to_huge_pages` says it can help and the kernels are built. The Parameter stays the same
        object (tied weights stay tied, an optimizer keeps it); only its data moves, once. A process that decodes
        with one model from several threads should make the first decode step before starting them: the old data
        is freed."""
        weight = self._parameters["weight"]
        kernels = decode_kernels()
        if kernels is not None and movable_to_huge_pages(weight):
            with torch.no_grad(), torch.inference_mode(False):  # a plain tensor, even inside inference mode
                weight.data = kernels.huge_page_copy(weight.data)
        self._huge_pages_tried = True
        return weight

    def _split_linear(self, flat: torch.Tensor, parts: int) -> torch.Tensor:
        """`F.linear(flat, weight, bias)` as one `bmm` over `parts` blocks of output features."""
        rows = flat.shape[0]
        split = self.out_features - self.out_features % parts  # GPT-2's 50,257 outputs: 2 x 25,128 and 1 more
        blocks = self.weight[:split].view(parts, split // parts, self.in_features)  # (p, out/p, in)
        out = torch.bmm(blocks, flat.T.expand(parts, -1, -1)).permute(2, 0, 1).reshape(rows, split)  # (rows, out)
        if split < self.out_features:
            out = torch.cat([out, F.linear(flat, self.weight[split:])], dim=-1)
        if self.bias is not None:
            out = out + self.bias
        return out

    def _ways(self, flat: torch.Tensor, threads: int) -> dict[str, Callable[[], torch.Tensor]]:
        """The ways this product can run here: the split needs two threads, the kernel a build and fp32/bf16."""
        ways = {"linear": lambda: F.linear(flat, self.weight, self.bias)}
        if threads >= 2:
            ways["split"] = lambda: self._split_linear(flat, threads)
        kernel_fits = self.weight.dtype in (torch.float32, torch.bfloat16) and self.weight.is_contiguous()
        if kernel_fits and (kernel := decode_kernel()) is not None:
            ways["kernel"] = lambda: kernel(flat, self.weight, self.bias)
            ways["kernel-nt"] = lambda: kernel(flat, self.weight, self.bias, True)
        return ways

    def _measure(self, flat: torch.Tensor, threads: int) -> str:
        """The way that runs this product fastest here (`measure_fastest`: `"linear"` unless another is 10% faster,
        `"kernel-nt"` over `"kernel"` unless that is 25% faster). Decoding reads each weight from memory, not from a
        cache (a step reads more weights than any cache holds), so a read of twice the last-level cache evicts the
        weight before each timing. Some milliseconds, once per shape and process."""
        ways = self._ways(flat, threads)
        if len(ways) == 1:
            return "linear"
        evict = torch.ones(2 * last_level_cache_bytes() // 4)
        return measure_fastest(ways, default="linear", before_each=evict.sum, prefer={"kernel-nt": "kernel"})


def measure_fastest(
    ways: dict[str, Callable[[], object]],
    default: str,
    runs: int = 5,
    before_each: Callable[[], object] = lambda: None,
    prefer: dict[str, str] | None = None,
) -> str:
    """The name of the way that ran fastest here, `default` unless another was at least 10% faster. Where the
    fastest is a way that `prefer` maps a preferred one to, the preferred one is taken instead unless the fastest
    was 25% faster than it (for a gain that timing one call cannot see) or it is not 10% faster than `default`.
    One untimed call of each first (first use: allocations, lazy set-up), then the best of `runs` timings each,
    taken in turn."""
    for way in ways.values():
        way()
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(runs):
        for name, way in ways.items():
            before_each()
            start = time.perf_counter()
            way()
            best[name] = min(best[name], time.perf_counter() - start)
    fastest = min(best, key=best.get)
    for preferred, other in (prefer or {}).items():
        if fastest == other and best.get(preferred, float("inf")) < min(best[other] / 0.75, 0.9 * best[default]):
            fastest = preferred
    return fastest if best[fastest] < 0.9 * best[default] else default


def movable_to_huge_pages(weight: torch.Tensor) -> bool:
    """Whether a move onto 2 MB pages can help this weight: Linux gives such pages, and the weight is contiguous, 2 MB
    or more (a smaller one shares its pages anyway) and has a storage of its own (not a view into another tensor's,
    which would then no longer see it)."""
    return (
        transparent_huge_pages()
        and weight.is_cpu
        and weight.is_contiguous()
        and weight.nbytes >= 2**21
        and weight.untyped_storage().nbytes() == weight.nbytes
    )


@functools.cache
def transparent_huge_pages() -> bool:
    """Whether Linux backs memory advised so with 2 MB pages: its setting says `[always]` or `[madvise]`."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            setting = file.read()
    except OSError:  # another system
        return False
    return "[always]" in setting or "[madvise]" in setting


@functools.cache
def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache, from Linux's sysfs (such as "32768K"); 64 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as file:
            text = file.read().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=64 * 2**20)


class KVCacheLayer(DynamicLayer):
    """The keys and values one block has seen (the book's KV cache), appended in place.

    transformers' `DynamicLayer` concatenates each new token's keys and values to all the earlier ones, so every
    decoding step copies the whole cache. This layer writes them into storage that doubles when full, so a step
    copies only what is new; `keys` and `values` are views of the filled part. The first storage holds the prompt
    exactly, and none outgrows `max_len` positions (the model's context) unless the tokens do, nor `expected_len`
    (the length `generate()` goes to) until the tokens pass it: never more than `DynamicLayer` holds, but for the
    room to grow. Under autograd it concatenates like its parent (a later in-place write would invalidate the views
    a backward pass still needs).
    """

    def __init__(self, max_len: int | None = None, expected_len: int | None = None):
        super().__init__()
        self.max_len = max_len
        self.expected_len = expected_len

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_store = self.value_store = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            return super().update(key_states, value_states)
        past = self.get_seq_length()
        total = past + key_states.shape[-2]
        if not self._store_holds(key_states.shape[:2], key_states.dtype, total):  # first call, full, or replaced
            capacity = total if not past else 2 * total  # a prompt: its own size, as `DynamicLayer` holds it
            if self.expected_len is not None and total <= self.expected_len:
                capacity = min(capacity, self.expected_len)
            capacity = capacity if self.max_len is None else max(total, min(capacity, self.max_len))
            self.key_store = self._grow(self.keys, key_states, past, capacity)
            self.value_store = self._grow(self.values, value_states, past, capacity)
        self.key_store.narrow(-2, past, total - past).copy_(key_states)
        self.value_store.narrow(-2, past, total - past).copy_(value_states)
        self.keys, self.values = self.key_store.narrow(-2, 0, total), self.value_store.narrow(-2, 0, total)
        return self.keys, self.values

    def _store_holds(self, batch_heads: tuple[int, int], dtype: torch.dtype, total: int) -> bool:
        """Whether the storage takes `total` positions of keys and values of this batch, heads and dtype, and is
        still this layer's (`crop` keeps the views of it; reordering or selecting rows, as beam search does, replaces
        them)."""
        store = self.key_store
        return (
            store is not None
            and _first_places_of(self.keys, store)
            and _first_places_of(self.values, self.value_store)
            and store.shape[:2] == batch_heads
            and store.dtype == dtype
            and total <= store.shape[-2]
        )

    def room_for(self, hidden_states: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The storage of keys and of values, and the places filled, where it has room for the keys and values of
        `hidden_states`' tokens (B, T, C); None where `update` must take them. For `fused_decode_block`, which
        writes them into the storage from C++ and then sets `keys` and `values` to all of them so far."""
        if not self.is_initialized or self.key_store is None:
            return None
        past = self.keys.shape[-2]
        if not self._store_holds((hidden_states.shape[0], heads), hidden_states.dtype, past + hidden_states.shape[1]):
            return None
        return self.key_store, self.value_store, past

    @staticmethod
    def _grow(past_states: torch.Tensor, new_states: torch.Tensor, past: int, capacity: int) -> torch.Tensor:
        batch, heads, _, head_dim = new_states.shape
        store = new_states.new_empty(batch, heads, capacity, head_dim)
        if past:
            store[..., :past, :] = past_states
        return store


def _first_places_of(view: torch.Tensor, store: torch.Tensor) -> bool:
    """Whether `view` is the storage's first positions of every sequence and head, as `narrow` makes them. Not by
    `view._base`: a view made under `torch.inference_mode()` has none, and there the cache copied itself into new
    storage at every step (a GPT-2 small step after a 1,000-token prompt took 17.2-17.5 ms instead of 14.0-14.5)."""
    return view.data_ptr() == store.data_ptr() and view.stride() == store.stride() and view.shape[:2] == store.shape[:2]


class KVCache(DynamicCache):
    """A `DynamicCache` of `KVCacheLayer`s: what ScratchGPT decodes with, in `generate()` and in a plain forward.
    `max_len` (the model's context) bounds each layer's storage, and `expected_len` (the length `generate()` goes
    to) until the tokens pass it."""

    def __init__(self, max_len: int | None = None, expected_len: int | None = None):
        Cache.__init__(self, layer_class_to_replicate=functools.partial(KVCacheLayer, max_len, expected_len))



class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (-100 ignored), without all the logits at once.

    The logits are made `chunk_size` rows at a time. Each chunk's gradient, softmax minus one-hot, is turned into
    the gradients of `hidden` and `weight` right away, so backward only scales them. The matmuls are the plain
    path's (one forward, two for the gradients); the memory is one (chunk_size, vocab) buffer instead of several
    (B * T, vocab) ones: logits, log-softmax, and their gradients.

    The matmuls run in autocast's dtype when it is on (bfloat16 under `--bf16`), else in the weight's, like the
    plain path's; the softmax in float32. The weight's gradient is summed over the chunks in float32.

    `pad_to`: the vocabulary is padded with zero rows to a multiple of it, whose logits are set to -inf (no share
    of the softmax, no gradient). GPT-2's 50,257 makes rows of logits whose bytes are not a multiple of 16, which
    keeps cuBLAS off its fastest tensor-core kernels; `chunked_causal_lm_loss` pads to 64 on CUDA (as nanoGPT's
    vocabulary of 50,304 does), not on the CPU (MKL measured the same either way, and the copy costs memory).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, pad_to=1):  # hidden (N, C), weight (V, C), labels (N,)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        hidden_in, weight_in = hidden.to(dtype), weight.to(dtype)  # autocast skips `out=` and in-place matmuls
        vocab, pad = weight.shape[0], -weight.shape[0] % pad_to
        if pad:
            weight_in = F.pad(weight_in, (0, 0, 0, pad))  # (V + pad, C)
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight_in, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden_in[start : start + chunk_size], labels[start : start + chunk_size]
            valid = (y != -100).unsqueeze(1)  # (n, 1)
            target = y.clamp(min=0).unsqueeze(1)  # (n, 1), ignored rows point at token 0 and are masked
            logits = (h @ weight_in.T).float()  # (n, V + pad)
            if pad:
                logits[:, vocab:] = float("-inf")
            target_logits = logits.gather(1, target)  # (n, 1)
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()  # in place: one (n, V) buffer all along
            sum_exps = exps.sum(dim=-1, keepdim=True)
            # log-sum-exp minus target logit; not `+=`: torch 2.11's compile routes the gradient of an output
            # changed in place to the wrong slot (pytorch#180642), so nothing would train
            loss = loss + ((row_max + sum_exps.log() - target_logits) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = softmax - one-hot, and 0 on ignored rows: scale by valid / sum, subtract valid.
            grad_logits = exps.mul_(valid / sum_exps).scatter_add_(1, target, -valid.float()).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad_logits @ weight_in
            if grad_weight is not None and dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, h)
            elif grad_weight is not None:
                grad_weight += grad_logits.T @ h  # a bfloat16 product, summed in float32
        if grad_weight is not None:
            grad_weight = grad_weight[:vocab].to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        grad_weight = grad_weight * grad_loss.to(grad_weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None


def chunked_causal_lm_loss(
    hidden_states, weight, labels, chunk_size, num_items_in_batch=None, shift_labels=None
) -> torch.Tensor:
    """The causal LM loss (mean over non-ignored next-token targets, or sum / `num_items_in_batch` when gradient
    accumulation gives it) computed by `ChunkedLinearCrossEntropy`. Labels are shifted here, as transformers does,
    unless `shift_labels` gives the targets already aligned with the positions (sequence/context parallelism shifts
    the whole sequence before splitting it); `labels` is then unused."""
    targets = shift_labels
    if targets is None:  # position t predicts token t + 1; the last predicts nothing
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B * T, C)
    pad_to = 64 if hidden.device.type == "cuda" else 1  # see ChunkedLinearCrossEntropy
    loss_sum = ChunkedLinearCrossEntropy.apply(hidden, weight, targets.reshape(-1), chunk_size, pad_to)
    denominator = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return loss_sum / denominator


# (batch, heads, bit length of the number of keys, dtype, threads) -> whether float32 is faster, for the process
DECODE_SDPA_UPCAST_IS_FASTER: dict[tuple, bool] = {}


def decode_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention for a decode step (one query per sequence), run in float32 where that is
    measured faster for a 16-bit model on the CPU.

    torch's CPU kernel takes one bfloat16 query far slower than a float32 one: 52 against 14 us a layer at 100
    keys of GPT-2 small, 559 against 71 at 1,000, on an AMD EPYC (Zen 5), so casting the keys and values up (one
    more read of them) and the output back is 2-4 times faster. Which wins is measured, once per shape and
    power-of-two number of keys (`measure_fastest`, as `DecodeLinear` measures its ways); the answers are kept
    in `DECODE_SDPA_UPCAST_IS_FASTER`.
    """
    if (
        query.dtype not in (torch.bfloat16, torch.float16)
        or not query.is_cpu
        or dropout > 0  # training: timing runs would draw dropout masks
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    upcast = decode_sdpa_upcasts(module, query, key, value, attention_mask, scaling, **kwargs)
    return _decode_sdpa(module, query, key, value, attention_mask, scaling, dropout, upcast, **kwargs)


def decode_sdpa_upcasts(module, query, key, value, attention_mask, scaling, **kwargs) -> bool:
    """Whether a decode step's SDPA of these 16-bit tensors runs faster in float32: measured once per shape and
    power-of-two number of keys, then kept in `DECODE_SDPA_UPCAST_IS_FASTER`."""
    shape = (*key.shape[:2], key.shape[-2].bit_length(), query.dtype, torch.get_num_threads())
    if shape not in DECODE_SDPA_UPCAST_IS_FASTER:
        ways = {
            name: functools.partial(_decode_sdpa, module, query, key, value, attention_mask, scaling, 0.0, upcast,
                                    **kwargs)
            for name, upcast in (("as it is", False), ("float32", True))
        }
        DECODE_SDPA_UPCAST_IS_FASTER[shape] = measure_fastest(ways, default="as it is", runs=3) == "float32"
    return DECODE_SDPA_UPCAST_IS_FASTER[shape]


def _decode_sdpa(module, query, key, value, attention_mask, scaling, dropout, upcast, **kwargs):
    """transformers' SDPA as it is, or with query, keys, values and a float mask in float32 (`upcast`)."""
    if not upcast:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, _ = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), attention_mask, dropout, scaling, **kwargs
    )
    return out.to(query.dtype), None


def fused_decode_block(
    block: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None,
    kwargs: dict
) -> torch.Tensor | None:
    """A decode step of a `ScratchGPTBlock` (one new token per sequence) in two calls of C++, `block_attention_input`
    and `block_output` (`decode_kernel_scratchgpt.py`), with the cache updated between them; None where the block's
    own forward must run.

    It computes what the block's forward does, with each part's weights, but without calling the parts. So it runs
    only where that is the same: no gradients, eval mode, the CPU, float32 or bfloat16, no autocast, compiling or
    tracing, no keyword argument (output flags, packed sequences), eager or SDPA attention, every part the class the
    block was built with (not a LoRA adapter, not another activation) and called as it is (no hook, no forward
    replaced, as accelerate's offloading does), and each product's way measured by `DecodeLinear` (the first
    steps, run by the block's forward, measure them) and not the split. The cost: 11 us of checks and calls a block
    in a loop of their own (AMD EPYC, 2026-11-26; more inside a step, whose weights evict them from the caches).
    """
    if (
        hidden_states.shape[1] != 1
        or kwargs
        or torch.is_grad_enabled()
        or hidden_states.dtype not in (torch.float32, torch.bfloat16)
        or not hidden_states.is_cpu
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
    ):
        return None
    # The parts straight from `_modules`: `block.att` is a call of nn.Module.__getattr__, and the checks would
    # otherwise cost a step a quarter of a millisecond.
    modules = block._modules
    norm1, att, norm2, ff, drop = (modules.get(name) for name in ("norm1", "att", "norm2", "ff", "drop_shortcut"))
    att_modules, ff_modules = getattr(att, "_modules", {}), getattr(ff, "_modules", {})
    qkv, out_proj = att_modules.get("qkv"), att_modules.get("out_proj")
    fc1, act, fc2 = ff_modules.get("fc1"), ff_modules.get("act"), ff_modules.get("fc2")
    parts = zip((norm1, att, norm2, ff, drop, qkv, out_proj, fc1, act, fc2), _stock_classes(type(block)))
    if (
        any(type(part) is not cls or part.training or _hooked(part) for part, cls in parts)
        or act.approximate != "tanh"
        or len(att_modules) != 2
        or len(ff_modules) != 3
        or _global_forward_hooks()
        or att.config._attn_implementation not in ("eager", "sdpa")
        or (kernels := decode_kernels()) is None
    ):
        return None
    rows, threads = hidden_states.shape[0], torch.get_num_threads()
    ways = [layer.decode_way(rows, threads) for layer in (qkv, out_proj, fc1, fc2)]
    if not all(way in ("kernel", "kernel-nt", "linear") for way in ways):
        return None
    for layer in (qkv, out_proj, fc1, fc2):  # the products below do not pass through DecodeLinear.forward
        layer._decoding_weight()
    # A KVCache's layer with room: this step's keys and values are written into its storage from C++.
    layer = cache.layers[att.layer_idx] if type(cache) is KVCache and att.layer_idx < len(cache.layers) else None
    room = layer.room_for(hidden_states, att.n_heads) if layer is not None else None
    query, key, value = kernels.block_attention_input(
        hidden_states, *_weights(norm1), norm1.eps, *_weights(qkv), att.n_heads, ways[0],
        *(room or (None, None, 0)),
    )
    if room is not None:
        layer.keys, layer.values = key, value  # all of them so far, as `update` leaves them
    elif cache is not None:  # append this step's keys and values; get back all of them so far
        key, value = cache.update(key, value, att.layer_idx)
    return kernels.block_output(
        hidden_states, query, key, value, attention_mask, att.scaling, *_weights(out_proj), *_weights(norm2),
        norm2.eps, *_weights(fc1), *_weights(fc2), ways[1:],
    )


def _weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    parameters = module._parameters  # not `module.weight`: nn.Module.__getattr__, 48 times a step
    return parameters["weight"], parameters["bias"]


@functools.cache
def _stock_classes(block_class: type) -> tuple[type | None, ...]:
    """The classes of a block's parts as its file builds them, in `fused_decode_block`'s order: that file is
    modeling_scratchgpt, wherever it was loaded from (the package, or a saved model's folder). None for a class a
    subclass's file does not have: no part is of it, and the block runs its own forward."""
    code = sys.modules[block_class.__module__]
    return tuple(
        getattr(code, name, None) if isinstance(name, str) else name
        for name in ("LayerNorm", "MultiHeadAttention", "LayerNorm", "FeedForward", nn.Dropout,
                     DecodeLinear, DecodeLinear, DecodeLinear, "GELU", DecodeLinear)
    )


def _hooked(part: nn.Module) -> bool:
    """Whether calling `part` runs more than its class's forward: a pre-hook, a forward replaced on the instance
    (accelerate's offloading does so), or a forward hook other than the ones transformers' output capture leaves on
    a model after its first call with `output_attentions` or `output_hidden_states`, which do nothing while no
    call captures."""
    if part._forward_pre_hooks or "forward" in part.__dict__:
        return True
    hooks = part._forward_hooks.values()
    return any(getattr(hook, "__name__", None) != "output_capturing_hook" for hook in hooks) or (
        bool(hooks) and _capturing_outputs()
    )


def _global_forward_hooks() -> bool:
    """Whether any hook was registered for every module's forward (`register_module_forward_hook` and the like)."""
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def _capturing_outputs() -> bool:
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers: take its hooks as hooks
        return True
    return bool(_active_collector.get())  # a call's outputs to collect (an empty dict while it collects none)


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention over one row of packed sequences, one sequence at a time.

    query, key, value: (1, nh, T, hs), the sequences side by side; `cu_seq_lens_q` their boundaries
    ([0, len_1, len_1 + len_2, ..., T], as flash attention's variable-length kernels take them). The block-diagonal
    mask (`attention_mask`) computes the same thing, but over the whole (T, T) square; here each sequence costs
    what it costs alone, so a packed row is as cheap as its real tokens.
    """
    lengths = cu_seq_lens_q.diff().tolist()
    dropout = dropout if module.training else 0.0
    # split and cat (not slices written into one tensor): their gradients are one copy each, not one per sequence
    out = torch.cat(
        [
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
            for q, k, v in zip(*(x.split(lengths, dim=2) for x in (query, key, value)))  # (1, nh, len, hs) each
        ],
        dim=2,
    )
    return out.transpose(1, 2), None  # (1, T, nh, hs)


__all__ = [
    "ChunkedLinearCrossEntropy",
    "DecodeLinear",
    "KVCache",
    "KVCacheLayer",
    "chunked_causal_lm_loss",
    "decode_sdpa_attention",
    "fused_decode_block",
    "measure_fastest",
    "packed_sdpa_attention",
]
