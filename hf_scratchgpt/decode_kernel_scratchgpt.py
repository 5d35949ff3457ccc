"""Chapter 5's text generation, at memory speed: C++ decoding kernels, built for this CPU on first use.

A decode step multiplies every weight matrix by one vector per sequence, so its time is the time to read the
weights. BLAS libraries read them well below the machine's bandwidth there (MKL's fp32 product reads about 17 GB/s
on an AMD EPYC that reads 50-80 GB/s, and bfloat16 weights no faster). The matrix-vector kernel below reads the
weight rows in order, each against every row of the input, asking for the weights a few kilobytes ahead of its
reads, all threads each on their own rows: each weight is read from memory once, whatever the number of sequences.
`DecodeLinear` (in `speedups_scratchgpt.py`) times it against the other ways and takes it only where it is faster.

Between the products, a decode step spent more time in Python than in its other operators: GPT-2 small's 49
products took 9.4 ms of a 12.0 ms step at 55 GB/s, and replaced by zeros, the model's step still took 1.3 ms.
So the same build holds a transformer block's decode step in two calls, `block_attention_input` and
`block_output` (`fused_decode_block` in `speedups_scratchgpt.py` calls them): the block's math operator by
operator, ATen's operators and the products called from C++, and the attention of one query over the cache by
`decode_attention` (ATen's SDPA took 40-50 us a layer there at 100 keys, with the keys and values no longer in the
caches; this kernel 15-30). The step now takes 10.6-10.9 ms.

It is C++ with the compilers' vector extensions, built by PyTorch's own `torch.utils.cpp_extension` with
`-march=native` for the machine at hand (about 20 s once, then loaded from `TORCH_EXTENSIONS_DIR`), the first time a
model decodes; where it cannot be built (no compiler, no OpenMP) decoding goes on without it. Set
`SCRATCHGPT_DECODE_KERNEL=0` to never build or use any of it.

This file is copied beside a saved model's code, like `speedups_scratchgpt.py`: it imports only torch.
"""

import functools
import hashlib
import logging
import os
import platform
import sysconfig
import time
from collections.abc import Callable
from types import ModuleType

import torch


logger = logging.getLogger(__name__)

STALE_LOCK_SECONDS = 600  # a build takes about 20 s; a lock file this old belongs to a build that was killed

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// 16 floats loaded from any address (and allowed to read memory of another type); GCC and Clang turn them into the
// machine's vectors (AVX-512, 2 x AVX2, NEON).
typedef float f16v __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint32_t u16v __attribute__((vector_size(64), aligned(2), may_alias));

inline float hsum(f16v v) {  // a tree of adds (8, 4, 2, 1 at a time), not 15 in a row
  float lanes[16];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int width = 8; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

// c10's own conversions: a bfloat16 is a float32's top 16 bits; back, rounded to nearest even, NaN kept.
inline float bf16_to_float(uint16_t bits) { return c10::detail::f32_from_bits(bits); }
inline uint16_t float_to_bf16(float v) { return c10::detail::round_to_nearest_even(v); }

// Weights, bias and output in float32; x as it comes: 16 weights a step.
struct F32 {
  using T = float;
  static constexpr int64_t kStep = 16;
  static const void* prepare(const at::Tensor& x, at::Tensor&) { return x.data_ptr<float>(); }
  static f16v dot(const float* w, const void* xr, int64_t k, f16v acc) {
    const float* x = static_cast<const float*>(xr);
    return acc + *reinterpret_cast<const f16v*>(w + k) * *reinterpret_cast<const f16v*>(x + k);
  }
  static float tail(const float* w, const void* xr, int64_t k) { return w[k] * static_cast<const float*>(xr)[k]; }
  static float to_float(float v) { return v; }
  static float from_float(float v) { return v; }
};

// Weights, bias and output in bfloat16: 32 weights a step, summed in float32.
#if defined(__AVX512BF16__)
// CPUs with AVX-512 BF16 (and AMX) multiply 32 bfloat16 pairs and add them to 16 float32 sums in one instruction,
// taking x as it comes.
struct BF16 {
  using T = uint16_t;
  static constexpr int64_t kStep = 32;
  static const void* prepare(const at::Tensor& x, at::Tensor&) { return x.data_ptr<at::BFloat16>(); }
  static f16v dot(const uint16_t* w, const void* xr, int64_t k, f16v acc) {
    const uint16_t* x = static_cast<const uint16_t*>(xr);
    return (f16v)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_loadu_si512(w + k),
                                  (__m512bh)_mm512_loadu_si512(x + k));
  }
  static float tail(const uint16_t* w, const void* xr, int64_t k) {
    return bf16_to_float(w[k]) * bf16_to_float(static_cast<const uint16_t*>(xr)[k]);
  }
#else
// Elsewhere, 16 words of two weights: a word's low half is the even weight (x86 and Arm are little-endian) and its
// high half the odd one; shifted or masked, each half is a float32 as it stands. x is laid out to match, in float32:
// the 16 even entries of each 32, then the 16 odd ones.
struct BF16 {
  using T = uint16_t;
  static constexpr int64_t kStep = 32;
  static const void* prepare(const at::Tensor& x, at::Tensor& buffer) {
    const int64_t rows = x.size(0), in = x.size(1), whole = in - in % kStep;
    buffer = torch::empty({rows, in}, x.options().dtype(at::kFloat));
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    float* dst = buffer.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r, src += in, dst += in) {
      for (int64_t k = 0; k < whole; k += kStep)
        for (int64_t i = 0; i < 16; ++i) {
          dst[k + i] = bf16_to_float(src[k + 2 * i]);
          dst[k + 16 + i] = bf16_to_float(src[k + 2 * i + 1]);
        }
      for (int64_t k = whole; k < in; ++k) dst[k] = bf16_to_float(src[k]);
    }
    return buffer.data_ptr<float>();
  }
  static f16v dot(const uint16_t* w, const void* xr, int64_t k, f16v acc) {
    const float* x = static_cast<const float*>(xr);
    const u16v words = *reinterpret_cast<const u16v*>(w + k);
    const f16v even = (f16v)(words << 16), odd = (f16v)(words & 0xFFFF0000u);
    return acc + even * *reinterpret_cast<const f16v*>(x + k) + odd * *reinterpret_cast<const f16v*>(x + k + 16);
  }
  static float tail(const uint16_t* w, const void* xr, int64_t k) {
    return bf16_to_float(w[k]) * static_cast<const float*>(xr)[k];
  }
#endif
  static float to_float(uint16_t v) { return bf16_to_float(v); }
  static uint16_t from_float(float v) { return float_to_bf16(v); }
};

// How far ahead of its reads a thread asks for the weights (software prefetch, one request per 64 bytes read). On
// an AMD EPYC (Zen 5) whose `sum` reads 50 GB/s, GPT-2 small's products read 48-50 GB/s (float32) and 47-48
// (bfloat16) with the hardware's prefetchers alone, 53-54 with 2, 4 or 8 KB; 8 KB was best with 8 rows of x. A
// prefetch never faults, past the end of the weight too. `-DSCRATCHGPT_PREFETCH_BYTES=N` in `build_decode_kernels`'
// `extra_cflags` sets it for a build of one's own (0: none).
#ifndef SCRATCHGPT_PREFETCH_BYTES
#define SCRATCHGPT_PREFETCH_BYTES 8192
#endif
constexpr int64_t kPrefetchBytes = SCRATCHGPT_PREFETCH_BYTES;
static_assert(kPrefetchBytes >= 0, "SCRATCHGPT_PREFETCH_BYTES: 0 (no prefetch) or more");

// Into which caches the prefetch brings the weights is the caller's choice (`non_temporal`), as the best one
// depends on the CPU: non-temporal (locality 0) leaves the caches to the rest of a decode step, whose whole step was
// 7% faster for it on the AMD EPYC above (1% in its faster bandwidth state), the products alone as fast; on an Intel
// Xeon with AMX it halved the products' speed (2 threads: 10.6 against 22.9 GB/s into all levels, `sum` 23.5; 16
// threads: 35 against 94). DecodeLinear measures both.

// y[r, o] = x[r] . w[o] (+ bias[o]) for the weight rows o in [begin, end), one after another as they lie in memory,
// each against every row of x (a weight row is read from memory once, then from the L1 cache). Four sums a row, so
// the additions overlap. `x` holds the rows of x as `prepare` made them.
template <typename K, int Locality>
void weight_rows(const typename K::T* w, const void* x, int64_t x_row_bytes, const typename K::T* bias,
                 typename K::T* y, int64_t rows, int64_t out, int64_t in, int64_t begin, int64_t end) {
  const int64_t by_four = in - in % (4 * K::kStep), whole = in - in % K::kStep;
  for (int64_t o = begin; o < end; ++o) {
    const typename K::T* wr = w + o * in;
    for (int64_t r = 0; r < rows; ++r) {
      const void* xr = static_cast<const char*>(x) + r * x_row_bytes;
      f16v a0 = {}, a1 = {}, a2 = {}, a3 = {};
      int64_t k = 0;
      for (; k < by_four; k += 4 * K::kStep) {
        if (kPrefetchBytes > 0 && r == 0) {  // as an integer: a pointer past the end of the weight is undefined
          const uintptr_t ahead = reinterpret_cast<uintptr_t>(wr + k) + kPrefetchBytes;
          for (int line = 0; line < 4; ++line)
            __builtin_prefetch(reinterpret_cast<const void*>(ahead + 64 * line), 0, Locality);
        }
        a0 = K::dot(wr, xr, k, a0);
        a1 = K::dot(wr, xr, k + K::kStep, a1);
        a2 = K::dot(wr, xr, k + 2 * K::kStep, a2);
        a3 = K::dot(wr, xr, k + 3 * K::kStep, a3);
      }
      for (; k < whole; k += K::kStep) a0 = K::dot(wr, xr, k, a0);
      float sum = hsum((a0 + a1) + (a2 + a3));
      for (; k < in; ++k) sum += K::tail(wr, xr, k);
      y[r * out + o] = K::from_float(sum + (bias ? K::to_float(bias[o]) : 0.f));
    }
  }
}

template <typename K, typename Scalar>
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, bool non_temporal) {
  const int64_t rows = x.size(0), out = weight.size(0), in = weight.size(1);
  torch::Tensor buffer;
  const void* xp = K::prepare(x, buffer);
  const int64_t x_row_bytes = buffer.defined() ? in * sizeof(float) : in * x.element_size();
  const auto* w = reinterpret_cast<const typename K::T*>(weight.data_ptr<Scalar>());
  const auto* b = bias.defined() ? reinterpret_cast<const typename K::T*>(bias.data_ptr<Scalar>()) : nullptr;
  torch::Tensor y = torch::empty({rows, out}, x.options());
  auto* yp = reinterpret_cast<typename K::T*>(y.data_ptr<Scalar>());
  at::parallel_for(0, out, 64, [&](int64_t first, int64_t last) {  // each thread its own rows of the weight
    if (non_temporal)
      weight_rows<K, 0>(w, xp, x_row_bytes, b, yp, rows, out, in, first, last);
    else
      weight_rows<K, 3>(w, xp, x_row_bytes, b, yp, rows, out, in, first, last);
  });
  return y;
}

// x (..., in) @ weight (out, in).T + bias -> (..., out), as F.linear: float32 or bfloat16, all three alike; float32
// sums. The weights are prefetched non-temporally or into all cache levels (above).
torch::Tensor kernel_linear(torch::Tensor x, torch::Tensor weight, const c10::optional<torch::Tensor>& bias,
                            bool non_temporal) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1) && weight.size(1) > 0,
              "decode_linear: shapes do not fit");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "decode_linear: CPU tensors only");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_linear: float32 or bfloat16 weights only");
  TORCH_CHECK(x.scalar_type() == dtype, "decode_linear: x and the weight differ in dtype");
  torch::Tensor b = bias.has_value() && bias->defined() ? bias->to(dtype).contiguous() : torch::Tensor();
  TORCH_CHECK(!b.defined() || (b.is_cpu() && b.numel() == weight.size(0)), "decode_linear: the bias does not fit");
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = weight.size(0);
  x = x.reshape({-1, weight.size(1)}).contiguous();
  weight = weight.contiguous();
  torch::Tensor y = dtype == at::kFloat ? run<F32, float>(x, weight, b, non_temporal)
                                        : run<BF16, at::BFloat16>(x, weight, b, non_temporal);
  return y.view(out_sizes);
}

torch::Tensor decode_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                            bool non_temporal) {
  pybind11::gil_scoped_release no_gil;  // as torch's own operators do: other Python threads run meanwhile
  return kernel_linear(x, weight, bias, non_temporal);
}

// --- A decode step's attention --------------------------------------------------------------------------------
// One query per sequence and head against all its keys and values so far: softmax(q . k * scaling + mask) . v,
// in float32 sums, each (sequence, head) on one thread. ATen's SDPA took 40-50 us a layer for this at 100 keys of
// GPT-2 small inside a decode step (the keys and values no longer in the caches after the products), this 15-30.

inline f16v load16(const float* p) { return *reinterpret_cast<const f16v*>(p); }
inline f16v load16(const at::BFloat16* p) {  // 16 bfloat16s, each widened to the float32 whose top half it is
  typedef uint16_t h16v __attribute__((vector_size(32), aligned(2), may_alias));
  return (f16v)(__builtin_convertvector(*reinterpret_cast<const h16v*>(p), u16v) << 16);
}
inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }

// One (sequence, head): q (hs) in float32; keys and values `stride` elements apart; `mask` as float32 (added)
// or bool (true: attend), `mask_stride` apart, or null; `scores` room for Tk floats, `acc` for hs.
template <typename T, typename M>
void attend(const float* q, const T* k, const T* v, int64_t stride, int64_t Tk, int64_t hs, const M* mask,
            int64_t mask_stride, float scaling, float* scores, float* acc, T* out) {
  const int64_t whole = hs - hs % 16;
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < Tk; ++t) {
    const T* kr = k + t * stride;
    f16v sum = {};
    for (int64_t i = 0; i < whole; i += 16) sum += load16(q + i) * load16(kr + i);
    float s = hsum(sum);
    for (int64_t i = whole; i < hs; ++i) s += q[i] * load1(kr + i);
    s *= scaling;
    if constexpr (std::is_same_v<M, bool>) {
      if (mask && !mask[t * mask_stride]) s = -std::numeric_limits<float>::infinity();
    } else {
      if (mask) s += mask[t * mask_stride];
    }
    scores[t] = s;
    if (s > top || std::isnan(s)) top = s;  // a NaN score makes a NaN output, as in ATen's kernels
  }
  std::fill(acc, acc + hs, 0.f);
  if (top == -std::numeric_limits<float>::infinity()) {  // every key masked: zeros, as ATen's SDPA gives on the CPU
    for (int64_t i = 0; i < hs; ++i) out[i] = static_cast<T>(0.f);
    return;
  }
  float total = 0.f;
  for (int64_t t = 0; t < Tk; ++t) {
    const float p = std::exp(scores[t] - top);
    total += p;
    const T* vr = v + t * stride;
    for (int64_t i = 0; i < whole; i += 16) *reinterpret_cast<f16v*>(acc + i) += p * load16(vr + i);
    for (int64_t i = whole; i < hs; ++i) acc[i] += p * load1(vr + i);
  }
  for (int64_t i = 0; i < hs; ++i) out[i] = static_cast<T>(acc[i] / total);
}

template <typename T, typename M>
void attend_all(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                const torch::Tensor& mask, double scaling, torch::Tensor& out) {
  const int64_t B = key.size(0), heads = key.size(1), Tk = key.size(2), hs = key.size(3);
  const T* q = query.data_ptr<T>();
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  const M* m = mask.defined() ? mask.data_ptr<M>() : nullptr;
  T* o = out.data_ptr<T>();
  at::parallel_for(0, B * heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> buffer(2 * hs + Tk);  // q in float32, the sums of the values, the scores
    for (int64_t bh = first; bh < last; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      for (int64_t i = 0; i < hs; ++i) buffer[i] = load1(q + bh * hs + i);
      const M* mask_row = m ? m + b * mask.stride(0) + h * mask.stride(1) : nullptr;
      attend<T, M>(buffer.data(), k + b * key.stride(0) + h * key.stride(1),
                   v + b * value.stride(0) + h * value.stride(1), key.stride(2), Tk, hs, mask_row,
                   m ? mask.stride(3) : 0, scaling, buffer.data() + 2 * hs, buffer.data() + hs, o + bh * hs);
    }
  });
}

// query (B, nh, 1, hs); key, value (B, nh, Tk, hs), each position's hs values side by side (a cache's storage
// narrowed to its filled part is); mask none, bool or additive, broadcastable to (B, nh, 1, Tk). -> (B, nh, 1, hs)
torch::Tensor decode_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                               const c10::optional<torch::Tensor>& mask, double scaling) {
  TORCH_CHECK(key.dim() == 4 && query.is_cpu() && key.is_cpu() && value.is_cpu() &&
                  (!mask.has_value() || !mask->defined() || mask->is_cpu()),
              "decode_attention: CPU tensors, keys and values (B, nh, Tk, hs)");
  const int64_t B = key.size(0), heads = key.size(1), Tk = key.size(2), hs = key.size(3);
  TORCH_CHECK(query.dim() == 4 && query.size(0) == B && query.size(1) == heads && query.size(2) == 1 &&
                  query.size(3) == hs && value.sizes() == key.sizes(),
              "decode_attention: one query per sequence and head, keys and values alike");
  TORCH_CHECK(key.stride(3) == 1 && value.strides() == key.strides(),
              "decode_attention: keys and values laid out alike, each position's values side by side");
  const auto dtype = query.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && key.scalar_type() == dtype &&
                  value.scalar_type() == dtype, "decode_attention: float32 or bfloat16, all three alike");
  torch::Tensor q = query.contiguous(), out = torch::empty_like(q), m;
  if (mask.has_value() && mask->defined()) {
    m = mask->scalar_type() == at::kBool ? *mask : mask->to(at::kFloat);
    m = m.expand({B, heads, 1, Tk});
  }
  const bool boolean = m.defined() && m.scalar_type() == at::kBool;
  if (dtype == at::kFloat) {
    boolean ? attend_all<float, bool>(q, key, value, m, scaling, out)
            : attend_all<float, float>(q, key, value, m, scaling, out);
  } else {
    boolean ? attend_all<at::BFloat16, bool>(q, key, value, m, scaling, out)
            : attend_all<at::BFloat16, float>(q, key, value, m, scaling, out);
  }
  return out;
}

// --- A transformer block's decode step (chapter 4.5) in two calls ----------------------------------------------
// ScratchGPTBlock's math for one new token, operator by operator: ATen's operators, and the products on the kernel
// above or on ATen's `linear`, as DecodeLinear measured fastest for each (`way`, `ways`). Called from Python
// one operator at a time, a block of GPT-2 small spent 100-140 us of a decode step between its products; the two
// calls and the checks before them about 40.

// `way`: DecodeLinear's name of it, "kernel", "kernel-nt" (the kernel, non-temporal) or "linear".
torch::Tensor product(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b,
                      const std::string& way) {
  TORCH_CHECK(way == "kernel" || way == "kernel-nt" || way == "linear", "no product way ", way);
  return way == "linear" ? at::linear(x, w, b) : kernel_linear(x, w, b, way == "kernel-nt");
}

// norm1, then the fused query/key/value product, split into heads: x (B, T, C) -> query, key, value (B, nh, T, hs).
// Given a cache layer's storage (B, nh, capacity, hs) and the number of places filled, the keys and values are
// written after those, and the key and value returned are all of them so far (views of the storage).
std::vector<torch::Tensor> block_attention_input(const torch::Tensor& x, const torch::Tensor& norm_w,
                                                 const torch::Tensor& norm_b, double eps, const torch::Tensor& qkv_w,
                                                 const c10::optional<torch::Tensor>& qkv_b, int64_t n_heads,
                                                 const std::string& way,
                                                 const c10::optional<torch::Tensor>& key_store,
                                                 const c10::optional<torch::Tensor>& value_store, int64_t past) {
  pybind11::gil_scoped_release no_gil;
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const torch::Tensor h = at::layer_norm(x, {C}, norm_w, norm_b, eps);
  std::vector<torch::Tensor> qkv =
      product(h, qkv_w, qkv_b, way).view({B, T, 3, n_heads, C / n_heads}).permute({2, 0, 3, 1, 4}).unbind(0);
  if (key_store.has_value() && value_store.has_value()) {
    TORCH_CHECK(past >= 0 && past + T <= key_store->size(2) && value_store->sizes() == key_store->sizes(),
                "block_attention_input: no room in the cache's storage");
    key_store->narrow(2, past, T).copy_(qkv[1]);
    value_store->narrow(2, past, T).copy_(qkv[2]);
    qkv[1] = key_store->narrow(2, 0, past + T);
    qkv[2] = value_store->narrow(2, 0, past + T);
  }
  return qkv;
}

// The attention of the queries over all keys and values so far (`decode_attention`), out_proj and the shortcut;
// norm2, the feed-forward network and its shortcut. `ways`: those of out_proj, fc1, fc2.
torch::Tensor block_output(const torch::Tensor& x, const torch::Tensor& query, const torch::Tensor& key,
                           const torch::Tensor& value, const c10::optional<torch::Tensor>& mask, double scaling,
                           const torch::Tensor& out_w, const c10::optional<torch::Tensor>& out_b,
                           const torch::Tensor& norm_w, const torch::Tensor& norm_b, double eps,
                           const torch::Tensor& fc1_w, const c10::optional<torch::Tensor>& fc1_b,
                           const torch::Tensor& fc2_w, const c10::optional<torch::Tensor>& fc2_b,
                           const std::vector<std::string>& ways) {
  pybind11::gil_scoped_release no_gil;
  TORCH_CHECK(ways.size() == 3, "block_output: one way for each of out_proj, fc1 and fc2");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const torch::Tensor heads = decode_attention(query, key, value, mask, scaling).transpose(1, 2).reshape({B, T, C});
  const torch::Tensor h = x + product(heads, out_w, out_b, ways[0]);
  const torch::Tensor normed = at::layer_norm(h, {C}, norm_w, norm_b, eps);
  return h + product(at::gelu(product(normed, fc1_w, fc1_b, ways[1]), "tanh"), fc2_w, fc2_b, ways[2]);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_linear", &decode_linear, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("non_temporal") = false);
  m.def("block_attention_input", &block_attention_input);
  m.def("block_output", &block_output);
  m.def("decode_attention", [](torch::Tensor query, torch::Tensor key, torch::Tensor value,
                               c10::optional<torch::Tensor> mask, double scaling) {
    pybind11::gil_scoped_release no_gil;
    return decode_attention(query, key, value, mask, scaling);
  });
}
"""


def _machine() -> str:
    """What a `-march=native` build depends on: the CPU's model and flags (a shared home directory may see several
    kinds of machine), torch's version, the Python it is for and the compiler asked for."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as file:
            cpu = "".join(line for line in file.read().split("\n\n")[0].splitlines(True)
                          if line.startswith(("model name", "flags", "Features", "CPU part")))
    except OSError:
        cpu = platform.processor()
    python = sysconfig.get_config_var("EXT_SUFFIX")
    return f"{platform.machine()} {cpu} torch {torch.__version__} {python} {os.environ.get('CXX', 'c++')}"


def build_decode_kernels(extra_cflags: tuple[str, ...] = ()) -> ModuleType:
    """The kernels compiled for this machine, or loaded from an earlier build of the same source for the same
    machine: a module of `decode_linear(x, weight, bias, non_temporal=False)`, `decode_attention(query, key, value,
    mask, scaling)`, `block_attention_input(...)` and `block_output(...)`; raises where they cannot be built.
    `extra_cflags` go to the compiler after `-march=native`."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(f"{SOURCE}{_machine()}{extra_cflags}".encode()).hexdigest()[:16]
    name = f"scratchgpt_decode_{digest}"
    folder = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root(), name)
    if not os.path.exists(os.path.join(folder, f"{name}.so")):
        logger.warning("ScratchGPT: building its decoding kernels for this CPU (once, about 20 seconds)")
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, "lock")  # torch's: held while one process builds; others wait for it without end
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_SECONDS:
        logger.warning(f"ScratchGPT: removing {lock}, left by a build that did not finish")
        os.remove(lock)
    flags = ["-O3", "-march=native", "-fopenmp", *extra_cflags]
    return cpp_extension.load_inline(name, SOURCE, extra_cflags=flags, build_directory=folder)


@functools.cache
def decode_kernels() -> ModuleType | None:
    """The kernels for this machine, built once per machine and loaded once per process; None where they cannot be
    built (said once, in a warning) or with `SCRATCHGPT_DECODE_KERNEL=0`."""
    if os.environ.get("SCRATCHGPT_DECODE_KERNEL", "1") == "0":
        return None
    try:
        return build_decode_kernels()
    except Exception as err:  # no compiler, no OpenMP, another architecture: decoding goes on without the kernel
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        logger.warning(f"ScratchGPT: decoding without its kernel, which could not be built here ({first_line})")
        return None


def decode_kernel() -> Callable | None:
    """The matrix-vector kernel, `decode_linear(x, weight, bias, non_temporal=False)` (F.linear's arguments and
    result; the weights prefetched non-temporally or into all cache levels), or None."""
    kernels = decode_kernels()
    return kernels.decode_linear if kernels is not None else None
