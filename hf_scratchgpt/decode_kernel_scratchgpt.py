"""Chapter 5's text generation, at memory speed: a matrix-vector kernel for decoding, built for this CPU on first use.

A decode step multiplies every weight matrix by one vector per sequence, so its time is the time to read the
weights. BLAS libraries read them well below the machine's bandwidth there (MKL's fp32 product reads about 17 GB/s
on an AMD EPYC that reads 50-80 GB/s, and bfloat16 weights no faster). The kernel below reads the weight rows in
order, each against every row of the input, asking for the weights a few kilobytes ahead of its reads, all threads
each on their own rows: each weight is read from memory once, whatever the number of sequences. It is C++ with the
compilers' vector extensions, built by PyTorch's own `torch.utils.cpp_extension` with `-march=native` for the
machine at hand (about 20 s once, then loaded from `TORCH_EXTENSIONS_DIR`); where it cannot be built (no compiler, no
OpenMP) decoding goes on without it.
`DecodeLinear` (in `speedups_scratchgpt.py`) times it against the other ways and takes it only where it is faster.
Set `SCRATCHGPT_DECODE_KERNEL=0` to never build or use it.

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

import torch


logger = logging.getLogger(__name__)

STALE_LOCK_SECONDS = 600  # a build takes about 20 s; a lock file this old belongs to a build that was killed

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
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
// (bfloat16) with the hardware's prefetchers alone, 53-54 with 2, 4 or 8 KB; 8 KB was best with 8 rows of x.
// A prefetch never faults, past the end of the weight too.
constexpr int64_t kPrefetchBytes = 8192;

// y[r, o] = x[r] . w[o] (+ bias[o]) for the weight rows o in [begin, end), one after another as they lie in memory,
// each against every row of x (a weight row is read from memory once, then from the L1 cache). Four sums a row, so
// the additions overlap. `x` holds the rows of x as `prepare` made them.
template <typename K>
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
        if (r == 0) {  // as an integer: a pointer past the end of the weight would be undefined
          const uintptr_t ahead = reinterpret_cast<uintptr_t>(wr + k) + kPrefetchBytes;
          for (int line = 0; line < 4; ++line)
            __builtin_prefetch(reinterpret_cast<const void*>(ahead + 64 * line), 0, 0);
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
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  const int64_t rows = x.size(0), out = weight.size(0), in = weight.size(1);
  torch::Tensor buffer;
  const void* xp = K::prepare(x, buffer);
  const int64_t x_row_bytes = buffer.defined() ? in * sizeof(float) : in * x.element_size();
  const auto* w = reinterpret_cast<const typename K::T*>(weight.data_ptr<Scalar>());
  const auto* b = bias.defined() ? reinterpret_cast<const typename K::T*>(bias.data_ptr<Scalar>()) : nullptr;
  torch::Tensor y = torch::empty({rows, out}, x.options());
  auto* yp = reinterpret_cast<typename K::T*>(y.data_ptr<Scalar>());
  at::parallel_for(0, out, 64, [&](int64_t first, int64_t last) {  // each thread its own rows of the weight
    weight_rows<K>(w, xp, x_row_bytes, b, yp, rows, out, in, first, last);
  });
  return y;
}

// x (..., in) @ weight (out, in).T + bias -> (..., out), as F.linear: float32 or bfloat16, all three alike; float32
// sums.
torch::Tensor decode_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  pybind11::gil_scoped_release no_gil;  // as torch's own operators do: other Python threads run meanwhile
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
  torch::Tensor y = dtype == at::kFloat ? run<F32, float>(x, weight, b) : run<BF16, at::BFloat16>(x, weight, b);
  return y.view(out_sizes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_linear", &decode_linear); }
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
    lock = os.path.join(folder, "lock")  # torch's: held while one process builds; others wait for it without end
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_SECONDS:
        logger.warning(f"ScratchGPT: removing {lock}, left by a build that did not finish")
        os.remove(lock)
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
