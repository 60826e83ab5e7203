"""The C++ of the compiled kernels (:mod:`edgellm.kernels.cpp` builds it with
``torch.utils.cpp_extension.load_inline``), kept as a string so the package ships it as code.

Three kernels, each multithreaded over rows with ``at::parallel_for`` (OpenMP, so
``torch.set_num_threads`` sets the thread count):

* ``gemv_q4_rows``: plain loops over the row layout (byte j = q[2j] | q[2j+1] << 4).  The
  compiler may still vectorize them with the baseline SSE2 of x86-64; no intrinsics.
* ``gemv_q4_interleaved``: llama.cpp's ``block_q4_0`` layout (byte j = q[j] | q[j+16] << 4).
  With ``simd`` true, AVX2 + FMA + F16C intrinsics: per group of 32, one 16-byte load; ``& 0x0F``
  gives codes 0..15 and ``>> 4`` codes 16..31, widened 8 at a time to int32 then float and
  multiplied into 32 contiguous floats of x with FMAs.  The function carries
  ``__attribute__((target("avx2,fma,f16c")))``, so the module builds with the compiler's default
  flags on any x86-64 and the caller decides at run time (from the CPU's flags) whether to call
  it; elsewhere the same function runs portable scalar loops.  The −8 offset is factored out of
  the inner loop: ``Σ d(q−8)x = d Σ q x − 8 d s_g`` with ``s_g`` the sum of x over the group,
  computed once per call.
* ``silu_mul``: ``silu(gate) · up`` in one pass (one read of each input, one write), the fusion
  of the SwiGLU MLP's activation that :mod:`edgellm.kernels.fusion` compares with two torch ops:
  a plain loop calling ``std::exp`` one float at a time, or (``simd``) AVX2 with a polynomial
  ``exp`` 8 floats at a time, as ggml's ``ggml_v_expf`` and torch's own vectorized SiLU do.
"""

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EDGELLM_X86 1
#endif

namespace {

constexpr int64_t QK = 32;  // weights per Q4_0 group

// y[r0:r1] of W x, W in the row layout: byte j of a row holds q[2j] (low) and q[2j+1] (high)
void rows_scalar(const uint8_t* p, const at::Half* d, const float* x, float* y,
                 int64_t r0, int64_t r1, int64_t K) {
  const int64_t G = K / QK;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* pr = p + r * (K / 2);
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t j = 0; j < QK / 2; ++j) {
        const int b = pr[g * (QK / 2) + j];
        s += float((b & 0x0F) - 8) * x[g * QK + 2 * j]
           + float((b >> 4) - 8) * x[g * QK + 2 * j + 1];
      }
      acc += float(d[r * G + g]) * s;
    }
    y[r] = acc;
  }
}

// the interleaved layout (llama.cpp block_q4_0.qs): byte j holds q[j] (low) and q[j+16] (high)
void interleaved_scalar(const uint8_t* p, const at::Half* d, const float* x, float* y,
                        int64_t r0, int64_t r1, int64_t K) {
  const int64_t G = K / QK;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* pr = p + r * (K / 2);
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t j = 0; j < QK / 2; ++j) {
        const int b = pr[g * (QK / 2) + j];
        s += float((b & 0x0F) - 8) * x[g * QK + j]
           + float((b >> 4) - 8) * x[g * QK + QK / 2 + j];
      }
      acc += float(d[r * G + g]) * s;
    }
    y[r] = acc;
  }
}

#ifdef EDGELLM_X86
__attribute__((target("avx2,fma,f16c")))
void interleaved_avx2(const uint8_t* p, const uint16_t* d, const float* x, const float* xsum,
                      float* y, int64_t r0, int64_t r1, int64_t K) {
  const int64_t G = K / QK;
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* pr = p + r * (K / 2);
    const uint16_t* dr = d + r * G;
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + g * 16));
      const __m128i lo = _mm_and_si128(b, mask);                      // q[0..15]
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);   // q[16..31]
      const float* xg = x + g * QK;
      __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                                 _mm256_loadu_ps(xg));
      dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                            _mm256_loadu_ps(xg + 8), dot);
      dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                            _mm256_loadu_ps(xg + 16), dot);
      dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                            _mm256_loadu_ps(xg + 24), dot);
      const float dg = _cvtsh_ss(dr[g]);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(dg), dot, acc);            // Σ_g d_g Σ_j q_j x_j
      corr += dg * xsum[g];                                            // Σ_g d_g s_g
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    y[r] = _mm_cvtss_f32(s) - 8.f * corr;
  }
}
#endif

// silu(g) * u over [i0, i1): the portable loop (std::exp, one element at a time)
void silu_mul_scalar(const float* g, const float* u, float* o, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

#ifdef EDGELLM_X86
// the same, 8 floats at a time; exp(t) = 2^n e^r with n = round(t log2 e), r = t − n ln 2 (ln 2
// split in two for precision) and e^r from Cephes' degree-5 polynomial of expf (about 1 ulp);
// t is clamped to [−87, 88.376] so that 2^n stays a normal float
__attribute__((target("avx2,fma")))
void silu_mul_avx2(const float* g, const float* u, float* o, int64_t i0, int64_t i1) {
  const __m256 one = _mm256_set1_ps(1.f), log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const float c[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                      4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), x),
                                                 _mm256_set1_ps(-87.f)),
                                   _mm256_set1_ps(88.3762626647949f));          // −x, clamped
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(t, log2e),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, t));
    __m256 p = _mm256_set1_ps(c[0]);
    for (int j = 1; j < 6; ++j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[j]));
    __m256 e = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, one));    // e^r
    const __m256i k = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);    // 2^n
    e = _mm256_mul_ps(e, _mm256_castsi256_ps(k));                                // e^−x
    const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
  }
  silu_mul_scalar(g, u, o, i, i1);
}
#endif

void check_gemv(const torch::Tensor& packed, const torch::Tensor& scales,
                const torch::Tensor& x) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(),
              "packed: a contiguous (N, K/2) uint8 tensor");
  const int64_t K = packed.size(1) * 2;
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32");
  TORCH_CHECK(scales.dtype() == torch::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
              scales.size(0) == packed.size(0) && scales.size(1) == K / QK,
              "scales: a contiguous (N, K/32) float16 tensor");
  TORCH_CHECK(x.dtype() == torch::kFloat && x.is_contiguous() && x.numel() == K,
              "x: a contiguous (K,) float32 tensor");
}

}  // namespace

bool cpu_has_avx2() {
#ifdef EDGELLM_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

torch::Tensor gemv_q4_rows(torch::Tensor packed, torch::Tensor scales, torch::Tensor x) {
  check_gemv(packed, scales, x);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  auto y = torch::empty({N}, x.options());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const at::Half* d = scales.data_ptr<at::Half>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) { rows_scalar(p, d, xp, yp, r0, r1, K); });
  return y;
}

torch::Tensor gemv_q4_interleaved(torch::Tensor packed, torch::Tensor scales, torch::Tensor x,
                                  bool simd) {
  check_gemv(packed, scales, x);
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / QK;
  auto y = torch::empty({N}, x.options());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const at::Half* d = scales.data_ptr<at::Half>();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (!simd) {
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      interleaved_scalar(p, d, xp, yp, r0, r1, K);
    });
    return y;
  }
#ifdef EDGELLM_X86
  TORCH_CHECK(cpu_has_avx2(), "this CPU lacks AVX2, FMA or F16C: call with simd=False");
  std::vector<float> xsum(G, 0.f);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < QK; ++j) xsum[g] += xp[g * QK + j];
  const uint16_t* dh = reinterpret_cast<const uint16_t*>(d);
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    interleaved_avx2(p, dh, xp, xsum.data(), yp, r0, r1, K);
  });
  return y;
#else
  TORCH_CHECK(false, "the AVX2 kernel exists on x86 only: call with simd=False");
#endif
}

torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up, bool simd) {
  TORCH_CHECK(gate.dtype() == torch::kFloat && up.dtype() == torch::kFloat &&
              gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes(),
              "gate, up: contiguous float32 tensors of one shape");
  auto out = torch::empty_like(gate);
  const float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  float* o = out.data_ptr<float>();
#ifdef EDGELLM_X86
  if (simd) {
    TORCH_CHECK(cpu_has_avx2(), "this CPU lacks AVX2 or FMA: call with simd=False");
    at::parallel_for(0, gate.numel(), 4096, [&](int64_t i0, int64_t i1) {
      silu_mul_avx2(g, u, o, i0, i1);
    });
    return out;
  }
#else
  TORCH_CHECK(!simd, "the AVX2 kernel exists on x86 only: call with simd=False");
#endif
  at::parallel_for(0, gate.numel(), 4096, [&](int64_t i0, int64_t i1) {
    silu_mul_scalar(g, u, o, i0, i1);
  });
  return out;
}
"""

FUNCTIONS = ["cpu_has_avx2", "gemv_q4_rows", "gemv_q4_interleaved", "silu_mul"]
