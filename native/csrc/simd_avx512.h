// The AVX-512 vocabulary of kernel_body.h (16 float lanes, 32 registers): `struct V`, included inside each unit's
// own namespace by the units compiled with AVX-512 (kernel_avx512.cpp, kernel_amx.cpp). Needs <immintrin.h>,
// kernel_api.h and simd_exp.h first.
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
    static inline bool any_greater(R a, R b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
    static inline float first(R a) { return _mm512_cvtss_f32(a); }
    // Lanes from num_kept on (all when num_kept <= 0) set to fill.
    static inline R keep_first(R a, int num_kept, float fill) {
        const __mmask16 kept = num_kept >= W ? 0xFFFF : num_kept <= 0 ? 0 : (__mmask16)((1u << num_kept) - 1);
        return _mm512_mask_blend_ps(kept, _mm512_set1_ps(fill), a);
    }
    // x[g] = the max (sum) of x[g]'s lanes, in every lane, for four vectors at once: 128-bit blocks of
    // the four are folded into one vector [A B C D], then within each block, then broadcast back.
    template <class Op>
    static inline void reduce4(R x[4], Op op) {
        const R ab = op(_mm512_shuffle_f32x4(x[0], x[1], 0x44), _mm512_shuffle_f32x4(x[0], x[1], 0xEE));
        const R cd = op(_mm512_shuffle_f32x4(x[2], x[3], 0x44), _mm512_shuffle_f32x4(x[2], x[3], 0xEE));
        R t = op(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
        t = op(t, _mm512_permute_ps(t, 0x4E));
        t = op(t, _mm512_permute_ps(t, 0xB1));
        x[0] = _mm512_shuffle_f32x4(t, t, 0x00);
        x[1] = _mm512_shuffle_f32x4(t, t, 0x55);
        x[2] = _mm512_shuffle_f32x4(t, t, 0xAA);
        x[3] = _mm512_shuffle_f32x4(t, t, 0xFF);
    }
    static inline void hmax4(R x[4]) { reduce4(x, [](R a, R b) { return _mm512_max_ps(a, b); }); }
    static inline void hsum4(R x[4]) { reduce4(x, [](R a, R b) { return _mm512_add_ps(a, b); }); }
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
    // 32 bf16 in pairs: lo takes the even elements (low halves of the 32-bit lanes), hi the odd ones.
    static inline void load_bf16_pair(const uint16_t *p, R &lo, R &hi) {
        const __m512i w = _mm512_loadu_si512(p);
        lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        hi = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)));
    }
    // GB rows of float32 probabilities (row stride P) rounded to bf16 into pb, the first num_used of each (a
    // multiple of 16). Compiled for AVX512-BF16 whatever the unit's flags: only the bf16 kernels call it.
    template <int GB>
    __attribute__((target("avx512bf16"))) static inline void round_rows_bf16(const float *p, int P, int num_used, uint16_t *pb) {
        for (int g = 0; g < GB; ++g) {
            int t = 0;
            for (; t + 32 <= num_used; t += 32)   // two vectors per rounding instruction
                _mm512_storeu_si512(pb + g * P + t, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + g * P + t + 16),
                                                                                 _mm512_loadu_ps(p + g * P + t)));
            if (t < num_used)
                _mm256_storeu_si256(reinterpret_cast<__m256i *>(pb + g * P + t),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p + g * P + t)));
        }
    }
};
