// AVX-512 (F, BW, VL) path (16 lanes, 32 registers). Compiled with -mavx512f -mavx512bw -mavx512vl
// (plus AVX2/FMA/F16C) only; chosen at run time when the CPU and OS support it.
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#include "kernel_api.h"
#include "simd_exp.h"

namespace {

struct V {
    using R = __m512;
    static constexpr int W = 16;
    static constexpr int TV = 2;     // 2 token vectors (a 32-token page) x up to 4 heads
    static constexpr int ACC = 16;   // output accumulators per value tile
    FD_EXP_CONSTANTS
    static inline R zero() { return _mm512_setzero_ps(); }
    static inline R set1(float x) { return _mm512_set1_ps(x); }
    static inline R load(const float *p) { return _mm512_loadu_ps(p); }
    static inline void store(float *p, R a) { _mm512_storeu_ps(p, a); }
    static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
    static inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
    static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
    static inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
    static inline R max(R a, R b) { return _mm512_max_ps(a, b); }
    static inline float hmax(R a) { return _mm512_reduce_max_ps(a); }
    static inline float hsum(R a) { return _mm512_reduce_add_ps(a); }
    static inline R exp(R x) {
        x = _mm512_min_ps(_mm512_max_ps(x, set1(-86.0f)), set1(88.0f));
        const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        R r = _mm512_fnmadd_ps(n, set1(kLn2Hi), x);
        r = _mm512_fnmadd_ps(n, set1(kLn2Lo), r);
        R p = _mm512_fmadd_ps(set1(kC6), r, set1(kC5));
        p = _mm512_fmadd_ps(p, r, set1(kC4));
        p = _mm512_fmadd_ps(p, r, set1(kC3));
        p = _mm512_fmadd_ps(p, r, set1(0.5f));
        p = _mm512_fmadd_ps(p, r, set1(1.0f));
        p = _mm512_fmadd_ps(p, r, set1(1.0f));
        const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
        return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
    }
    static inline R load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
    static inline R load_bf16(const uint16_t *p) {
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
};

#include "kernel_body.h"

}  // namespace

const fdn::KernelTable *fdn::kernels_avx512() { return &kTable; }
