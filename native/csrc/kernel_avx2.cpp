// AVX2 + FMA + F16C path (8 lanes, 16 registers). Compiled with -mavx2 -mfma -mf16c only.
#include <immintrin.h>
#include <math.h>

#include "kernel_api.h"
#include "simd_exp.h"

namespace {

struct V {
    using R = __m256;
    static constexpr int W = 8;
    static constexpr int TV = 2;    // 2 token vectors x up to 4 heads = 8 score accumulators
    static constexpr int ACC = 8;   // output accumulators per value tile
    FD_EXP_CONSTANTS
    static inline R zero() { return _mm256_setzero_ps(); }
    static inline R set1(float x) { return _mm256_set1_ps(x); }
    static inline R load(const float *p) { return _mm256_loadu_ps(p); }
    static inline void store(float *p, R a) { _mm256_storeu_ps(p, a); }
    static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
    static inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
    static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
    static inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
    static inline R max(R a, R b) { return _mm256_max_ps(a, b); }
    static inline float hmax(R a) {
        __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        x = _mm_max_ps(x, _mm_movehl_ps(x, x));
        x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
        return _mm_cvtss_f32(x);
    }
    static inline float hsum(R a) {
        __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
        return _mm_cvtss_f32(x);
    }
    static inline bool any_greater(R a, R b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0; }
    static inline float first(R a) { return _mm256_cvtss_f32(a); }
    // Lanes from num_kept on (all when num_kept <= 0) set to fill.
    static inline R keep_first(R a, int num_kept, float fill) {
        const R is_kept = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)num_kept), _CMP_LT_OQ);
        return _mm256_blendv_ps(_mm256_set1_ps(fill), a, is_kept);
    }
    static inline void hmax4(R x[4]) { for (int g = 0; g < 4; ++g) x[g] = set1(hmax(x[g])); }
    static inline void hsum4(R x[4]) { for (int g = 0; g < 4; ++g) x[g] = set1(hsum(x[g])); }
    static inline R exp(R x) {
        x = _mm256_min_ps(_mm256_max_ps(x, set1(-86.0f)), set1(88.0f));
        const R n = _mm256_round_ps(_mm256_mul_ps(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        R r = _mm256_fnmadd_ps(n, set1(kLn2Hi), x);
        r = _mm256_fnmadd_ps(n, set1(kLn2Lo), r);
        R p = _mm256_fmadd_ps(set1(kC6), r, set1(kC5));
        p = _mm256_fmadd_ps(p, r, set1(kC4));
        p = _mm256_fmadd_ps(p, r, set1(kC3));
        p = _mm256_fmadd_ps(p, r, set1(0.5f));
        p = _mm256_fmadd_ps(p, r, set1(1.0f));
        p = _mm256_fmadd_ps(p, r, set1(1.0f));
        const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
        return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
    }
    static inline R load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
    static inline R load_bf16(const uint16_t *p) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    // 16 bf16 in pairs: lo takes the even elements (low halves of the 32-bit lanes), hi the odd ones.
    static inline void load_bf16_pair(const uint16_t *p, R &lo, R &hi) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
        lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        hi = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
};

#include "kernel_body.h"

const fdn::KernelTable kTable = make_table(nullptr, nullptr);

}  // namespace

const fdn::KernelTable *fdn::kernels_avx2() { return &kTable; }
