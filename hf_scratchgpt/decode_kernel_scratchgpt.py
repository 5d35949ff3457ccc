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
operator, the products called from C++, the norms, activation and shortcuts written out 16 values at a time, and
the attention of one query over the cache by `decode_attention` (ATen's SDPA took 40-50 us a layer there at 100
keys, with the keys and values no longer in the caches; this kernel 13 us). With ATen's small operators the step
took 10.6-10.9 ms; with these, 1.4% less in turn (10.16 against 10.30 ms at 72 GB/s; a bf16 step 4.4% less).

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
#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// 16 floats loaded from any address (and allowed to read memory of another type); GCC and Clang turn them into the
// machine's vectors (AVX-512, 2 x AVX2, NEON).
typedef float f16v __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint32_t u16v __attribute__((vector_size(64), aligned(2), may_alias));

typedef float f8v __attribute__((vector_size(32)));
typedef float f4v __attribute__((vector_size(16)));

inline float hsum(f16v v) {  // halves added in registers: 16 lanes, 8, 4, then 4 scalars
  f8v low, high;
  std::memcpy(&low, &v, sizeof low);
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
  const f8v eight = low + high;
  f4v a, b;
  std::memcpy(&a, &eight, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&eight) + sizeof a, sizeof b);
  const f4v four = a + b;
  return (four[0] + four[2]) + (four[1] + four[3]);
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

// --- A decode step's small operators, 16 values at a time --------------------------------------------------------
// A decode step's attention, norms, activation and shortcuts are vectors of a few thousand values: called as ATen
// operators (dispatch, allocation, a parallel region each), GPT-2 small's blocks spent 0.5-0.7 ms of a 9.4-10.4 ms
// step beyond their products on an AMD EPYC (Zen 5, 70-80 GB/s); written out here, 0.35-0.45 ms.

typedef uint16_t h16v __attribute__((vector_size(32), aligned(2), may_alias));
typedef int32_t i16v __attribute__((vector_size(64)));

inline f16v load16(const float* p) { return *reinterpret_cast<const f16v*>(p); }
inline f16v load16(const at::BFloat16* p) {  // 16 bfloat16s, each widened to the float32 whose top half it is
  return (f16v)(__builtin_convertvector(*reinterpret_cast<const h16v*>(p), u16v) << 16);
}
inline void store16(float* p, f16v v) { *reinterpret_cast<f16v*>(p) = v; }
inline void store16(at::BFloat16* p, f16v v) {  // rounded to nearest even, as c10's conversion; NaN stays NaN
  const u16v bits = (u16v)v;
  const u16v rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const u16v nan = (u16v)(v != v);  // all ones where NaN
  *reinterpret_cast<h16v*>(p) = __builtin_convertvector((rounded & ~nan) | (0x7FC0u & nan), h16v);
}
inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(at::BFloat16* p, float v) { *p = static_cast<at::BFloat16>(v); }

inline f16v splat(float v) { return f16v{} + v; }

// e^x for 16 floats: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p Cephes' polynomial for expf (within 2 ulp);
// 0 below -87.3, where float32 runs out of normal numbers, for -inf (a masked score) and for NaN (callers keep it).
inline f16v exp16(f16v x) {
  const i16v keep = x >= -87.3f;
  x = x >= -87.3f ? x : splat(-87.3f);  // NaN too
  x = x > 88.3f ? splat(88.3f) : x;
  const f16v t = x * 1.44269504088896341f + 0.5f;
  i16v n = __builtin_convertvector(t, i16v);  // toward zero; floor below:
  n += (i16v)(__builtin_convertvector(n, f16v) > t);
  const f16v fn = __builtin_convertvector(n, f16v);
  const f16v r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  f16v p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const f16v y = (p * r * r + r + 1.f) * (f16v)((n + 127) << 23);
  return (f16v)((i16v)y & keep);
}

// Layer normalisation of `rows` rows of C values, as ATen's (biased variance, float32 sums).
template <typename T>
void layer_norm_rows(const T* x, const T* w, const T* b, T* y, int64_t rows, int64_t C, float eps) {
  const int64_t whole = C - C % 16;
  for (int64_t r = 0; r < rows; ++r, x += C, y += C) {
    f16v vsum = {};
    for (int64_t i = 0; i < whole; i += 16) vsum += load16(x + i);
    float sum = hsum(vsum);
    for (int64_t i = whole; i < C; ++i) sum += load1(x + i);
    const float mean = sum / C;
    f16v vsq = {};
    for (int64_t i = 0; i < whole; i += 16) {
      const f16v d = load16(x + i) - mean;
      vsq += d * d;
    }
    float sq = hsum(vsq);
    for (int64_t i = whole; i < C; ++i) sq += (load1(x + i) - mean) * (load1(x + i) - mean);
    const float rstd = 1.f / std::sqrt(sq / C + eps);
    for (int64_t i = 0; i < whole; i += 16)
      store16(y + i, (load16(x + i) - mean) * rstd * load16(w + i) + load16(b + i));
    for (int64_t i = whole; i < C; ++i) store1(y + i, (load1(x + i) - mean) * rstd * load1(w + i) + load1(b + i));
  }
}

// GELU's tanh approximation (chapter 4.3), in place: 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3),
// computed as x / (1 + e^-2u), the same function without 1 + tanh's cancellation for negative x.
template <typename T>
void gelu_tanh(T* x, int64_t n) {
  constexpr float kAlpha = 0.7978845608028654f, kBeta = 0.044715f;
  const int64_t whole = n - n % 16;
  for (int64_t i = 0; i < whole; i += 16) {
    const f16v v = load16(x + i);
    store16(x + i, v / (1.f + exp16(-2.f * kAlpha * (v + kBeta * v * v * v))));
  }
  for (int64_t i = whole; i < n; ++i) {
    const float v = load1(x + i);
    store1(x + i, v / (1.f + std::exp(-2.f * kAlpha * (v + kBeta * v * v * v))));
  }
}

// y = x + y: a shortcut added to what it skipped.
template <typename T>
void add_into(T* y, const T* x, int64_t n) {
  const int64_t whole = n - n % 16;
  for (int64_t i = 0; i < whole; i += 16) store16(y + i, load16(x + i) + load16(y + i));
  for (int64_t i = whole; i < n; ++i) store1(y + i, load1(x + i) + load1(y + i));
}

// fn(T{}) for the tensor's dtype: float32 or bfloat16.
template <typename Fn>
void with_dtype(const torch::Tensor& t, Fn fn) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  if (t.scalar_type() == at::kFloat) fn(float{});
  else fn(at::BFloat16{});
}

// --- Weights on 2 MB pages -----------------------------------------------------------------------------------
// A decode step reads every weight once, GPT-2 small's 495 MB in float32: 121,000 pages of 4 KB, far more than the
// TLB holds, so nearly every page costs a page walk, and the CPU's prefetchers stop at each page's end. On 2 MB
// pages (Linux's transparent huge pages, asked for with madvise) GPT-2 small's 49 products read 75-78 GB/s instead
// of 60-61 on an AMD EPYC (Zen 5) whose `sum` read 74-86, and as fast as before where it read 50; but the copy took
// 0.3-1 s there (fresh memory faulted in), so `DecodeLinear` moves weights only when asked (SCRATCHGPT_HUGE_PAGES).

// A copy of `t` in memory aligned to 2 MB that Linux backs with huge pages where its settings allow
// (/sys/kernel/mm/transparent_hugepage/enabled: always or madvise): each whole 2 MB of it on one page.
torch::Tensor huge_page_copy(const torch::Tensor& t) {
  TORCH_CHECK(t.is_cpu(), "huge_page_copy: a CPU tensor");
  const torch::Tensor source = t.contiguous();
  const size_t bytes = source.nbytes(), huge = size_t{2} << 20;
  void* memory = nullptr;
  TORCH_CHECK(posix_memalign(&memory, huge, std::max(bytes, size_t{1})) == 0, "huge_page_copy: out of memory");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(memory, bytes, MADV_HUGEPAGE);  // before the first touch: the copy below faults in whole huge pages
#endif
  std::memcpy(memory, source.data_ptr(), bytes);
  return torch::from_blob(memory, source.sizes(), [](void* p) { std::free(p); }, source.options());
}

// --- A decode step's attention --------------------------------------------------------------------------------
// One query per sequence and head against all its keys and values so far: softmax(q . k * scaling + mask) . v,
// in float32 sums, each (sequence, head) on one thread. ATen's SDPA took 40-50 us a layer for this at 100 keys of
// GPT-2 small inside a decode step (the keys and values no longer in the caches after the products); this kernel
// took 15 us with them in the caches and 31 without while it summed and exponentiated one score at a time, 7-9 and
// 13 with the exponentials 16 at a time and the values' sums in registers (AMD EPYC, 2 threads).

// One (sequence, head): q (hs) in float32; keys and values `stride` elements apart; `mask` as float32 (added)
// or bool (true: attend), `mask_stride` apart, or null; `scores` room for Tk floats.
template <typename T, typename M>
void attend(const float* q, const T* k, const T* v, int64_t stride, int64_t Tk, int64_t hs, const M* mask,
            int64_t mask_stride, float scaling, float* scores, T* out) {
  const int64_t whole = hs - hs % 16;
  float top = -std::numeric_limits<float>::infinity();
  const int64_t row_lines = (hs * static_cast<int64_t>(sizeof(T)) + 63) / 64;
  for (int64_t t = 0; t < Tk; ++t) {
    const T* kr = k + t * stride;
    for (int64_t line = 0; line < row_lines; ++line) {  // the key 8 ahead and this value: memory reads in flight
      if (t + 8 < Tk) __builtin_prefetch(reinterpret_cast<const char*>(kr + 8 * stride) + 64 * line);
      __builtin_prefetch(reinterpret_cast<const char*>(v + t * stride) + 64 * line);
    }
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
    if (s > top || std::isnan(s)) top = s;
  }
  if (std::isnan(top) || top == -std::numeric_limits<float>::infinity()) {
    // a NaN score makes a NaN output, as in ATen's kernels; every key masked, zeros, as ATen's SDPA gives on the CPU
    const float fill = std::isnan(top) ? top : 0.f;
    for (int64_t i = 0; i < hs; ++i) store1(out + i, fill);
    return;
  }
  const int64_t keys16 = Tk - Tk % 16;
  f16v totals = {};
  for (int64_t t = 0; t < keys16; t += 16) {
    const f16v p = exp16(load16(scores + t) - top);
    store16(scores + t, p);
    totals += p;
  }
  float total = hsum(totals);
  for (int64_t t = keys16; t < Tk; ++t) total += scores[t] = std::exp(scores[t] - top);
  const float inverse = 1.f / total;
  // the values' weighted sums, 64 columns at a time in four registers, then 16, then one
  int64_t i = 0;
  for (; i + 64 <= whole; i += 64) {
    f16v a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t t = 0; t < Tk; ++t) {
      const T* vr = v + t * stride + i;
      const float p = scores[t];
      a0 += p * load16(vr);
      a1 += p * load16(vr + 16);
      a2 += p * load16(vr + 32);
      a3 += p * load16(vr + 48);
    }
    store16(out + i, a0 * inverse);
    store16(out + i + 16, a1 * inverse);
    store16(out + i + 32, a2 * inverse);
    store16(out + i + 48, a3 * inverse);
  }
  for (; i < whole; i += 16) {
    f16v a = {};
    for (int64_t t = 0; t < Tk; ++t) a += scores[t] * load16(v + t * stride + i);
    store16(out + i, a * inverse);
  }
  for (; i < hs; ++i) {
    float a = 0.f;
    for (int64_t t = 0; t < Tk; ++t) a += scores[t] * load1(v + t * stride + i);
    store1(out + i, a * inverse);
  }
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
    std::vector<float> buffer(hs + Tk);  // q in float32, the scores
    for (int64_t bh = first; bh < last; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      for (int64_t i = 0; i < hs; ++i) buffer[i] = load1(q + bh * hs + i);
      const M* mask_row = m ? m + b * mask.stride(0) + h * mask.stride(1) : nullptr;
      attend<T, M>(buffer.data(), k + b * key.stride(0) + h * key.stride(1),
                   v + b * value.stride(0) + h * value.stride(1), key.stride(2), Tk, hs, mask_row,
                   m ? mask.stride(3) : 0, scaling, buffer.data() + hs, o + bh * hs);
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
// ScratchGPTBlock's math for one new token, operator by operator: the small operators above, and the products on
// the kernel above or on ATen's `linear`, as DecodeLinear measured fastest for each (`way`, `ways`). Called from Python
// one operator at a time, a block of GPT-2 small spent 100-140 us of a decode step between its products; the two
// calls and the checks before them about 40.

// `way`: DecodeLinear's name of it, "kernel", "kernel-nt" (the kernel, non-temporal) or "linear".
torch::Tensor product(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b,
                      const std::string& way) {
  TORCH_CHECK(way == "kernel" || way == "kernel-nt" || way == "linear", "no product way ", way);
  return way == "linear" ? at::linear(x, w, b) : kernel_linear(x, w, b, way == "kernel-nt");
}

// LayerNorm of x (..., C), contiguous: `layer_norm_rows`, or ATen's where the norm's weights are of another dtype.
torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b, double eps) {
  const int64_t C = x.size(-1);
  TORCH_CHECK(C > 0, "layer_norm: no features");
  if (w.scalar_type() != x.scalar_type() || b.scalar_type() != x.scalar_type() || !w.is_contiguous() ||
      !b.is_contiguous() || w.numel() != C || b.numel() != C)
    return at::layer_norm(x, {C}, w, b, eps);
  torch::Tensor y = torch::empty_like(x);
  with_dtype(x, [&](auto tag) {
    using Scalar = decltype(tag);
    layer_norm_rows<Scalar>(x.data_ptr<Scalar>(), w.data_ptr<Scalar>(), b.data_ptr<Scalar>(), y.data_ptr<Scalar>(),
                            x.numel() / C, C, eps);
  });
  return y;
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
  TORCH_CHECK(x.dim() == 3 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "block_attention_input: x (B, T, C) in float32 or bfloat16");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  TORCH_CHECK(n_heads > 0 && C % n_heads == 0, "block_attention_input: the width is not a multiple of the heads");
  const int64_t hs = C / n_heads;  // after the check: a division by 0 heads would kill the process
  const torch::Tensor qkv = product(layer_norm(x.contiguous(), norm_w, norm_b, eps), qkv_w, qkv_b, way).contiguous();
  TORCH_CHECK(qkv.size(-1) == 3 * C && qkv.scalar_type() == x.scalar_type(),
              "block_attention_input: the query/key/value product does not give 3 x the width in x's dtype");
  const int64_t offset = qkv.storage_offset();
  auto heads = [&](int64_t part) {  // (B, nh, T, hs) of qkv's (B, T, 3, nh, hs)
    return qkv.as_strided({B, n_heads, T, hs}, {T * 3 * C, hs, 3 * C, 1}, offset + part * C);
  };
  if (!key_store.has_value() || !value_store.has_value()) return {heads(0), heads(1), heads(2)};
  TORCH_CHECK(past >= 0 && key_store->dim() == 4 && past + T <= key_store->size(2) &&
                  value_store->sizes() == key_store->sizes(),
              "block_attention_input: no room in the cache's storage");
  TORCH_CHECK(key_store->size(0) == B && key_store->size(1) == n_heads && key_store->size(3) == hs &&
                  key_store->scalar_type() == x.scalar_type() && value_store->scalar_type() == x.scalar_type() &&
                  key_store->is_contiguous() && value_store->is_contiguous(),
              "block_attention_input: the cache's storage is not (B, nh, capacity, hs), contiguous, of x's dtype");
  const int64_t capacity = key_store->size(2), row_bytes = hs * x.element_size();
  char* stores[2] = {static_cast<char*>(key_store->data_ptr()), static_cast<char*>(value_store->data_ptr())};
  const char* source = static_cast<const char*>(qkv.data_ptr());
  for (int64_t part = 0; part < 2; ++part)  // each head's new keys (values) after its `past` ones
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < n_heads; ++h)
        for (int64_t t = 0; t < T; ++t)
          std::memcpy(stores[part] + ((b * n_heads + h) * capacity + past + t) * row_bytes,
                      source + (((b * T + t) * 3 + part + 1) * C + h * hs) * x.element_size(), row_bytes);
  return {heads(0), key_store->narrow(2, 0, past + T), value_store->narrow(2, 0, past + T)};
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
  TORCH_CHECK(x.dim() == 3 && query.scalar_type() == x.scalar_type(), "block_output: x (B, T, C), query of its dtype");
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const torch::Tensor shortcut = x.contiguous();
  const torch::Tensor heads = decode_attention(query, key, value, mask, scaling).transpose(1, 2).reshape({B, T, C});
  // each product's result is a new tensor: the shortcuts and the activation are written into it
  const torch::Tensor h = product(heads, out_w, out_b, ways[0]).contiguous();
  TORCH_CHECK(h.sizes() == shortcut.sizes(), "block_output: out_proj does not keep the width");
  torch::Tensor y;
  with_dtype(x, [&](auto tag) {
    using Scalar = decltype(tag);
    add_into<Scalar>(h.data_ptr<Scalar>(), shortcut.data_ptr<Scalar>(), h.numel());
    const torch::Tensor f = product(layer_norm(h, norm_w, norm_b, eps), fc1_w, fc1_b, ways[1]).contiguous();
    gelu_tanh<Scalar>(f.data_ptr<Scalar>(), f.numel());
    y = product(f, fc2_w, fc2_b, ways[2]).contiguous();
    TORCH_CHECK(y.sizes() == h.sizes(), "block_output: the feed-forward network does not keep the width");
    add_into<Scalar>(y.data_ptr<Scalar>(), h.data_ptr<Scalar>(), y.numel());
  });
  return y;
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
  m.def("huge_page_copy", &huge_page_copy);
  // the step's own LayerNorm and GELU, as the functions of torch they replace (for tests)
  m.def("layer_norm", [](const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b, double eps) {
    return layer_norm(x.contiguous(), w, b, eps);  // float32 or bfloat16: with_dtype refuses the rest
  });
  m.def("gelu_tanh", [](const torch::Tensor& x) {
    torch::Tensor y = x.clone(at::MemoryFormat::Contiguous);
    with_dtype(y, [&](auto tag) { gelu_tanh(y.data_ptr<decltype(tag)>(), y.numel()); });
    return y;
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
    mask, scaling)`, `block_attention_input(...)`, `block_output(...)`, the two's own `layer_norm(x, weight, bias,
    eps)` and `gelu_tanh(x)` (for tests), and `huge_page_copy(tensor)`; raises where they cannot be built.
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
