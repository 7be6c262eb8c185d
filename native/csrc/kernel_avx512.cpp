// AVX-512 (F, BW, VL) paths (16 lanes, 32 registers). The unit is compiled with -mavx512f -mavx512bw
// -mavx512vl (plus AVX2/FMA/F16C) only; its second table is compiled for AVX512-BF16 as well through
// a target pragma and adds the bf16-q kernel (vdpbf16ps). Each is chosen at run time when the CPU and
// OS support it.
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>

#include "kernel_api.h"
#include "simd_exp.h"

namespace {
namespace avx512 {

#include "simd_avx512.h"

#include "kernel_body.h"

const fdn::KernelTable kTable = make_table(nullptr, nullptr);

}  // namespace avx512

#pragma GCC push_options
#pragma GCC target("avx512bf16")
namespace avx512_bf16 {

struct V : avx512::V {};

#include "kernel_body.h"

// Scores from bf16 q, exactly as the caller sent it: one vdpbf16ps takes a pair of head dims of 16
// tokens (the K layout pairs them) against the same pair of q, broadcast. bf16 products are exact
// in float32 and accumulate in float32; the 1/sqrt(D) scale is applied to the scores.
struct ScoreDotBf16 {
    static constexpr bool kBf16Q = true;   // row_scores widens task.q_bf16 and applies task.scale
    template <int DT, int GB, int TV>
    static inline void tile(const fdn::ChunkTask &task, int r0, const uint8_t *kb, int t0, float *s,
                            const Prefetch &pf) {
        static_assert(DT == fdn::kDtypeBf16, "bf16 KV only");
        const int D = task.head_dim, P = task.page_size;
        const uint16_t *q = task.q_bf16 + (size_t)r0 * D, *k = reinterpret_cast<const uint16_t *>(kb);
        // C independent chains per (head, vector): chain c takes dim pairs c, c + C, c + 2C, ... A 1-vector
        // tile (a part-filled last page) has 4, so its GB * 4 chains are not bound by vdpbf16ps latency.
        constexpr int C = TV == 1 ? 4 : 2;
        __m512 acc[C][GB][TV];
        for (int c = 0; c < C; ++c)
            for (int g = 0; g < GB; ++g)
                for (int j = 0; j < TV; ++j) acc[c][g][j] = _mm512_setzero_ps();
        const PairWalk walk = k_walk(DT, t0, D, P);
        const uint16_t *row = k + walk.first;
        PrefetchWalk fetch = score_prefetch(pf, kb, 2 * C);
        for (int d = 0; d < D; d += 2 * C, row += C * walk.step) {   // D is a multiple of 16
            fetch.next();
            for (int c = 0; c < C; ++c) {
                __m512bh kv[TV];
                for (int j = 0; j < TV; ++j)
                    kv[j] = (__m512bh)_mm512_loadu_si512(row + c * walk.step + j * lane_group_elems<DT>());
                for (int g = 0; g < GB; ++g) {
                    int32_t pair;
                    memcpy(&pair, q + g * D + d + 2 * c, sizeof(pair));
                    const __m512bh qp = (__m512bh)_mm512_set1_epi32(pair);
                    for (int j = 0; j < TV; ++j) acc[c][g][j] = _mm512_dpbf16_ps(acc[c][g][j], kv[j], qp);
                }
            }
        }
        const __m512 scale = _mm512_set1_ps(task.scale);
        for (int g = 0; g < GB; ++g)
            for (int j = 0; j < TV; ++j) {
                __m512 sum = _mm512_add_ps(acc[0][g][j], acc[1][g][j]);
                if constexpr (C == 4) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[2][g][j], acc[3][g][j]));
                _mm512_storeu_ps(s + g * P + t0 + j * V::W, _mm512_mul_ps(sum, scale));
            }
    }
};

// acc[g][d0 .. d0+DV*W) += sum over the page's n tokens of p[g][t] * V[t] from bf16 dot products: the
// probabilities of tokens t, t+1 (rounded to bf16) form one pair, which the V layout matches, so one
// vdpbf16ps adds both tokens for 16 head dims; accumulation stays float32.
template <int GB, int DV>
static inline void value_tile_dot(const uint8_t *vb, int D, int P, int n, int d0, const uint16_t *pb, float *acc,
                                  const ValuePrefetch &pf) {
    __m512 a[GB][DV];
    const PairWalk walk = v_walk(fdn::kDtypeBf16, d0, D, P);
    for (int g = 0; g < GB; ++g)
        for (int j = 0; j < DV; ++j) a[g][j] = _mm512_loadu_ps(acc + g * D + d0 + j * V::W);
    const uint16_t *row = reinterpret_cast<const uint16_t *>(vb) + walk.first;
    // keep: the V halves a step may use (an odd last token's pair partner is not written yet)
    auto step = [&](int t, __m512i keep) {
        __m512bh pp[GB];
        for (int g = 0; g < GB; ++g) {
            int32_t pair;
            memcpy(&pair, pb + g * P + t, sizeof(pair));
            pp[g] = (__m512bh)_mm512_set1_epi32(pair);
        }
        for (int j = 0; j < DV; ++j) {
            const __m512i w = _mm512_and_si512(_mm512_loadu_si512(row + j * lane_group_elems<fdn::kDtypeBf16>()), keep);
            for (int g = 0; g < GB; ++g) a[g][j] = _mm512_dpbf16_ps(a[g][j], (__m512bh)w, pp[g]);
        }
    };
    int t = 0;
    PrefetchWalk fetch(pf.at, pf.far, vb, pf.num_bytes, pf.num_bytes);
    for (; t + 2 <= n; t += 2, row += walk.step) {
        fetch.next();
        step(t, _mm512_set1_epi32(-1));   // and with all ones: folded away
    }
    if (t < n) step(t, _mm512_set1_epi32(0xFFFF));
    for (int g = 0; g < GB; ++g)
        for (int j = 0; j < DV; ++j) _mm512_storeu_ps(acc + g * D + d0 + j * V::W, a[g][j]);
}

// Values from bf16 probabilities (chosen only when q, KV and the output are all bf16).
struct ValueDotBf16 {
    template <int DT, int GB>
    static inline void page(const uint8_t *vb, int D, int P, int n, const float *p, float *acc, const uint8_t *pf_v,
                            const uint8_t *pf_v_far) {
        static_assert(DT == fdn::kDtypeBf16, "bf16 KV only");
        alignas(64) uint16_t pb[4 * 256];
        V::round_rows_bf16<GB>(p, P, (n + 15) / 16 * 16, pb);   // softmax_update wrote the vectors that hold tokens
        constexpr int DV = value_vecs<DT, GB>();
        const int num_vecs = D / V::W, num_tiles = num_vecs / DV + num_vecs % DV;
        const size_t block = (size_t)D * P * 2;
        int j = 0, tile = 0;
        for (; j + DV <= num_vecs; j += DV, ++tile)
            value_tile_dot<GB, DV>(vb, D, P, n, j * V::W, pb, acc,
                                   value_prefetch(pf_v, pf_v_far, block, num_tiles, P, tile));
        for (; j < num_vecs; ++j, ++tile)
            value_tile_dot<GB, 1>(vb, D, P, n, j * V::W, pb, acc,
                                   value_prefetch(pf_v, pf_v_far, block, num_tiles, P, tile));
    }
};

const fdn::KernelTable kTable = make_table(chunk_kernel<fdn::kDtypeBf16, ScoreDotBf16>,
                                           chunk_kernel<fdn::kDtypeBf16, ScoreDotBf16, ValueDotBf16>);

// Seconds for `rounds` rounds of 12 independent chains of vdpbf16ps (is_dot) or vfmadd231ps, zmm: enough
// chains to be bound by throughput, not latency, on every core measured (docs/benchmarks.md, issue 3).
static volatile float g_sink;
__attribute__((noinline)) static double time_chains(bool is_dot, int rounds) {
    volatile float seed = 1e-3f;
    const __m512 x = _mm512_set1_ps(seed);
    const __m512bh xb = _mm512_cvtne2ps_pbh(x, x);
    __m512 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(seed * (float)i);
    const auto t0 = std::chrono::steady_clock::now();
    if (is_dot) {
        for (int r = 0; r < rounds; ++r)
#pragma GCC unroll 12
            for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], xb, xb);
    } else {
        for (int r = 0; r < rounds; ++r)
#pragma GCC unroll 12
            for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], x, x);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    __m512 sum = acc[0];
    for (int i = 1; i < 12; ++i) sum = _mm512_add_ps(sum, acc[i]);
    g_sink = _mm512_reduce_add_ps(sum);
    return seconds;
}

// Best of several alternating trials (the first zmm instructions after idle run slowly on some cores).
static double dot_relative_cost() {
    double dot = 1e30, fma = 1e30;
    for (int trial = 0; trial < 6; ++trial) {
        fma = std::min(fma, time_chains(false, 2000));
        dot = std::min(dot, time_chains(true, 2000));
    }
    return fma > 0 ? dot / fma : 1.0;
}

}  // namespace avx512_bf16
#pragma GCC pop_options

}  // namespace

const fdn::KernelTable *fdn::kernels_avx512() { return &avx512::kTable; }
const fdn::KernelTable *fdn::kernels_avx512_bf16() { return &avx512_bf16::kTable; }
double fdn::bf16_dot_relative_cost() {
    static const double cost = avx512_bf16::dot_relative_cost();
    return cost;
}
