"""Chapter 5's text generation, at memory speed: a matrix-vector kernel for decoding, built for this CPU on first use.

A decode step multiplies every weight matrix by one vector per sequence, so its time is the time to read the
weights. BLAS libraries read them well below the machine's bandwidth there (MKL's fp32 product reads about 17 GB/s
on an AMD EPYC that reads 50-80 GB/s, and bfloat16 weights no faster). The kernel below streams four weight rows at
a time against every row of the input, all threads each on their own rows of the weight: each weight is read once,
whatever the number of sequences. It is C++ with the compilers' vector extensions, built by PyTorch's own
`torch.utils.cpp_extension` with `-march=native` for the machine at hand (about 20 s once, then loaded from
`TORCH_EXTENSIONS_DIR`); where it cannot be built (no compiler, no OpenMP) decoding goes on without it.
`DecodeLinear` (in `speedups_scratchgpt.py`) times it against the other ways and takes it only where it is faster.
Set `SCRATCHGPT_DECODE_KERNEL=0` to never build or use it.

This file is copied beside a saved model's code, like `speedups_scratchgpt.py`: it imports only torch.
"""

import functools
import hashlib
import logging
import os
import platform
from collections.abc import Callable

import torch


logger = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// 16 floats loaded from any address; GCC and Clang turn them into the machine's vectors (AVX-512, 2 x AVX2, NEON).
typedef float f16v __attribute__((vector_size(64), aligned(4)));
typedef float f8v __attribute__((vector_size(32)));
typedef float f4v __attribute__((vector_size(16)));
typedef uint32_t u16v __attribute__((vector_size(64), aligned(2)));

inline float hsum(f16v v) {  // a tree of adds, not 15 in a row
  f8v h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f4v q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

inline float bf16_to_float(uint16_t bits) {  // bfloat16 is a float32's top 16 bits
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &word, sizeof v);
  return v;
}

// Weights in float32: 16 weights a step.
struct F32 {
  using T = float;
  static constexpr int64_t kStep = 16;
  static f16v dot(const float* w, const float* xp, int64_t k, f16v acc) {
    return acc + *reinterpret_cast<const f16v*>(w + k) * *reinterpret_cast<const f16v*>(xp + k);
  }
  static float at(const float* w, const float* xp, int64_t k) { return w[k] * xp[k]; }
};

// Weights in bfloat16: 32 weights a step.
#if defined(__AVX512BF16__)
// CPUs with AVX-512 BF16 (and AMX) multiply 32 bfloat16 pairs and sum them in float32 in one instruction; x is
// turned into bfloat16 for it (exactly, when it came as bfloat16).
struct BF16 {
  using T = uint16_t;
  static constexpr int64_t kStep = 32;
  static void prepare(const float* x, float* xp, int64_t in) {
    uint16_t* half = reinterpret_cast<uint16_t*>(xp);
    for (int64_t k = 0; k < in; ++k) {
      uint32_t bits;
      std::memcpy(&bits, x + k, sizeof bits);
      half[k] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // round to nearest even
    }
  }
  static f16v dot(const uint16_t* w, const float* xp, int64_t k, f16v acc) {
    const uint16_t* half = reinterpret_cast<const uint16_t*>(xp);
    return (f16v)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_loadu_si512(w + k),
                                  (__m512bh)_mm512_loadu_si512(half + k));
  }
  static float at(const uint16_t* w, const float* xp, int64_t k) {
    return bf16_to_float(w[k]) * bf16_to_float(reinterpret_cast<const uint16_t*>(xp)[k]);
  }
};
#else
// Elsewhere, read as 16 words of two: a word's low half is the even weight (x86 and Arm are little-endian) and its
// high half the odd one; shifted and masked, each half is a float32 as it stands. x is laid out to match: the 16
// even entries of each 32, then the 16 odd ones.
struct BF16 {
  using T = uint16_t;
  static constexpr int64_t kStep = 32;
  static void prepare(const float* x, float* xp, int64_t in) {
    const int64_t whole = in - in % kStep;
    for (int64_t k = 0; k < whole; k += kStep)
      for (int64_t i = 0; i < 16; ++i) {
        xp[k + i] = x[k + 2 * i];
        xp[k + 16 + i] = x[k + 2 * i + 1];
      }
    std::memcpy(xp + whole, x + whole, (in - whole) * sizeof(float));
  }
  static f16v dot(const uint16_t* w, const float* xp, int64_t k, f16v acc) {
    const u16v words = *reinterpret_cast<const u16v*>(w + k);
    const f16v even = (f16v)(words << 16), odd = (f16v)(words & 0xFFFF0000u);
    return acc + even * *reinterpret_cast<const f16v*>(xp + k) + odd * *reinterpret_cast<const f16v*>(xp + k + 16);
  }
  static float at(const uint16_t* w, const float* xp, int64_t k) { return bf16_to_float(w[k]) * xp[k]; }
};
#endif

// y[r, o] = x[r] . w[o] (+ bias[o]) for the weight rows o in [begin, end): four at a time, each against every row
// of x, so each weight comes from memory once (x stays in the L1 cache).
template <typename K>
void weight_rows(const typename K::T* w, const float* xp, const float* bias, float* y, int64_t rows, int64_t out,
                 int64_t in, int64_t begin, int64_t end) {
  const int64_t whole = in - in % K::kStep;
  for (int64_t o = begin; o < end; o += 4) {
    const int64_t n = std::min<int64_t>(4, end - o);
    const typename K::T* wr[4];
    for (int64_t j = 0; j < 4; ++j) wr[j] = w + (o + std::min(j, n - 1)) * in;  // past the end: repeat the last
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = xp + r * in;
      f16v a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t k = 0; k < whole; k += K::kStep) {
        a0 = K::dot(wr[0], xr, k, a0);
        a1 = K::dot(wr[1], xr, k, a1);
        a2 = K::dot(wr[2], xr, k, a2);
        a3 = K::dot(wr[3], xr, k, a3);
      }
      float sums[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t k = whole; k < in; ++k) sums[j] += K::at(wr[j], xr, k);
        y[r * out + o + j] = sums[j] + (bias ? bias[o + j] : 0.f);
      }
    }
  }
}

// x (rows, in) @ weight (out, in).T + bias, in x's dtype; float32 or bfloat16 weights, float32 sums.
torch::Tensor decode_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "decode_linear: shapes do not fit");
  TORCH_CHECK(weight.is_contiguous(), "decode_linear: the weight must be contiguous");
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || weight.scalar_type() == at::kFloat, "decode_linear: float32 or bfloat16 weights only");
  const int64_t rows = x.size(0), out = weight.size(0), in = weight.size(1);
  torch::Tensor xf = x.to(at::kFloat).contiguous();
  torch::Tensor xp = xf;  // float32 weights take x as it is (no copy: it shows in a step of 49 products)
  if (bf16) {
    xp = torch::empty_like(xf);
    for (int64_t r = 0; r < rows; ++r) BF16::prepare(xf.data_ptr<float>() + r * in, xp.data_ptr<float>() + r * in, in);
  }
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  torch::Tensor y = torch::empty({rows, out}, xf.options());
  at::parallel_for(0, (out + 3) / 4, 16, [&](int64_t first, int64_t last) {  // blocks of four weight rows
    const int64_t begin = 4 * first, end = std::min(out, 4 * last);
    if (bf16)
      weight_rows<BF16>(reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), xp.data_ptr<float>(), bp,
                        y.data_ptr<float>(), rows, out, in, begin, end);
    else
      weight_rows<F32>(weight.data_ptr<float>(), xp.data_ptr<float>(), bp, y.data_ptr<float>(), rows, out, in, begin,
                       end);
  });
  return y.to(x.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_linear", &decode_linear); }
"""


def _machine() -> str:
    """What a `-march=native` build depends on: the CPU's model and flags (a shared home directory may see several
    kinds of machine), and torch's version."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as file:
            cpu = "".join(line for line in file.read().split("\n\n")[0].splitlines(True)
                          if line.startswith(("model name", "flags", "Features", "CPU part")))
    except OSError:
        cpu = platform.processor()
    return f"{platform.machine()} {cpu} torch {torch.__version__}"


def build_decode_kernel(extra_cflags: tuple[str, ...] = ()) -> Callable:
    """`decode_linear(x, weight, bias)` compiled for this machine, or loaded from an earlier build of the same source
    for the same machine; raises where it cannot be built. `extra_cflags` go to the compiler after `-march=native`."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(f"{SOURCE}{_machine()}{extra_cflags}".encode()).hexdigest()[:16]
    name = f"scratchgpt_decode_{digest}"
    folder = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root(), name)
    if not os.path.exists(os.path.join(folder, f"{name}.so")):
        logger.warning("ScratchGPT: building its decoding kernel for this CPU (once, about 20 seconds)")
    os.makedirs(folder, exist_ok=True)
    flags = ["-O3", "-march=native", "-fopenmp", *extra_cflags]
    return cpp_extension.load_inline(name, SOURCE, extra_cflags=flags, build_directory=folder).decode_linear


@functools.cache
def decode_kernel() -> Callable | None:
    """The kernel for this machine, built once per machine and loaded once per process; None where it cannot be
    built (said once, in a warning) or with `SCRATCHGPT_DECODE_KERNEL=0`."""
    if os.environ.get("SCRATCHGPT_DECODE_KERNEL", "1") == "0":
        return None
    try:
        return build_decode_kernel()
    except Exception as err:  # no compiler, no OpenMP, another architecture: decoding goes on without the kernel
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        logger.warning(f"ScratchGPT: decoding without its kernel, which could not be built here ({first_line})")
        return None
