// AMX paths (Sapphire Rapids and later): the bf16-q kernels with q.K and P.V as tile dot products
// (tdpbf16ps), the rest as in the AVX-512 unit. The unit is compiled with AVX-512 (F, BW, VL, BF16) and
// AMX (tile, bf16) flags and chosen at run time when the CPU has AMX and the OS grants the tile state
// (api.cpp). On the H100 host's Xeon the float32 FMAs of a score or value pass take most of a core's time
// per byte: a build doing a quarter of them attended 10% faster at 16 threads (docs/benchmarks.md,
// "Session 7"); one tdpbf16ps of 4 query rows takes 16 cycles for 1 KiB of K or V, against about 80 for the
// same bytes as widened float32 FMAs.
//
// Tiles (fixed numbers: the instructions name them); M = the query heads a pass takes at once (kernel_body.h's GB):
// - score pass: 1 q A [M][32 dims]; two chains, one per 16 tokens: C tiles 0 and 6 [M][16 tokens], K B tiles 2 and
//   7 [16 dim pairs][16 tokens x 2];
// - value pass: 4 probabilities A [M][32 tokens]; three chains over the head dims, 16 each: output C tiles 3, 0
//   and 6 [M][16 dims], V B tiles 5, 2 and 7 [16 token pairs][16 dims x 2].
// Tiles are not renamed: a tile load waits for the last instruction that reads the tile. With one C and one B
// tile per pass, each step's loads waited for the step before's tile product and store, and a step's V or K
// lines were read only after the step before's product; each pass ran as one chain of load, tile product and
// store. Three value chains and two score chains run one core at about 1.2x the memory rate of the single
// chain (0.92 of the read probe for 64x2048 with 2 threads on the dev VM, against 0.75-0.78; docs/benchmarks.md,
// "Session 22").
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_api.h"
#include "simd_exp.h"

namespace {
namespace amx {

#include "simd_avx512.h"

#include "kernel_body.h"

// GCC's AMX intrinsics are asm statements that do not tell the compiler which memory a tile load reads:
// this orders the stores of ordinary code (probabilities, a rescaled output) before the tile loads after it.
static inline void memory_barrier() { __asm__ volatile("" ::: "memory"); }

// The palette-1 tile configuration for passes of `rows` query heads.
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
    explicit TileConfig(int m) {
        for (int t = 0; t < 8; ++t) colsb[t] = 64;
        rows[0] = rows[1] = rows[3] = rows[4] = rows[6] = (uint8_t)m;   // the C and A tiles: one row per query head
        rows[2] = rows[5] = rows[7] = 16;                               // the B tiles: 16 pairs of dims or tokens
    }
};

// Every pass takes the same number of query heads (the tile rows are configured once per work item): groups
// of at most 4 heads or of a multiple of 4; head dims a multiple of 32 (whole q tiles).
static int tile_rows(const fdn::ChunkTask &task) {
    const int G = task.group;
    return task.head_dim % 32 == 0 && (G <= 4 || G % 4 == 0) ? (G < 4 ? G : 4) : 0;
}

// Scores of the whole K tiles: s[g][t0 .. t0 + TV*16) = q[g] . K[t] * scale, 16 tokens per C tile, 32 head
// dims per tile product; the two C tiles' chains interleaved (one q tile load serves both). The pass's prefetch
// is spread over its tile products.
struct ScoreAmx {
    static constexpr bool kBf16Q = true;   // row_scores widens task.q_bf16 and applies task.scale
    template <int DT, int GB, int TV>
    static inline void tile(const fdn::ChunkTask &task, int r0, const uint8_t *kb, int t0, float *s,
                            const Prefetch &pf) {
        static_assert(DT == fdn::kDtypeBf16, "bf16 KV only");
        static_assert(V::W == 16, "one C tile per score vector");
        const int D = task.head_dim, P = task.page_size;
        const uint16_t *q = task.q_bf16 + (size_t)r0 * D;
        const int num_steps = TV * (D / 32);
        const size_t per_step = ((size_t)D * P * 2 / num_steps + 63) / 64 * 64;
        PrefetchWalk fetch(pf.for_scores, pf.for_scores_far, kb, per_step, per_step);
        static_assert(TV == 1 || TV == 2, "one or two score chains");
        // Bytes between pair rows: the two C tiles' tokens lie in one K layout tile (kKTileTokens = 32).
        const long k_stride = (long)(fdn::k_index(DT, 2, t0, D, P) - fdn::k_index(DT, 0, t0, D, P)) * 2;
        _tile_zero(0);
        if constexpr (TV == 2) _tile_zero(6);
        for (int c = 0; c < D / 32; ++c) {
            fetch.next();
            _tile_loadd(1, q + 32 * c, (long)D * 2);
            _tile_loadd(2, kb + fdn::k_index(DT, 32 * c, t0, D, P) * 2, k_stride);
            _tile_dpbf16ps(0, 1, 2);
            if constexpr (TV == 2) {
                fetch.next();
                _tile_loadd(7, kb + fdn::k_index(DT, 32 * c, t0 + 16, D, P) * 2, k_stride);
                _tile_dpbf16ps(6, 1, 7);
            }
        }
        _tile_stored(0, s + t0, (long)P * 4);
        if constexpr (TV == 2) _tile_stored(6, s + t0 + 16, (long)P * 4);
        const V::R scale = V::set1(task.scale);
        for (int g = 0; g < GB; ++g)
            for (int j = 0; j < TV; ++j) V::store(s + g * P + t0 + j * V::W, V::mul(V::load(s + g * P + t0 + j * V::W), scale));
    }
};

// Values of a full page from bf16 probabilities (chosen only when q, KV and the output are all bf16, as
// ValueDotBf16): per 32 tokens and 16 head dims, the output rows are loaded into a C tile, take one tile
// product and are stored back, in three chains (FD_VALUE_STEP). A part-filled page (the last: its V rows past n hold no tokens) and pages
// not a whole number of 32 tokens take the float32 value tiles.
struct ValueAmx {
    template <int DT, int GB>
    static inline void page(const uint8_t *vb, int D, int P, int n, const float *p, float *acc, const uint8_t *pf_v,
                            const uint8_t *pf_v_far) {
        static_assert(DT == fdn::kDtypeBf16, "bf16 KV only");
        if (n != P || P % 32) return ValueF32::page<DT, GB>(vb, D, P, n, p, acc, pf_v, pf_v_far);
        alignas(64) uint16_t pb[4 * 256];
        V::round_rows_bf16<GB>(p, P, P, pb);
        memory_barrier();
        const int num_steps = (P / 32) * (D / 16);
        const size_t per_step = ((size_t)D * P * 2 / num_steps + 63) / 64 * 64;
        PrefetchWalk fetch(pf_v, pf_v_far, vb, per_step, per_step);
        for (int t = 0; t < P; t += 32) {
            _tile_loadd(4, pb + t, (long)P * 2);
// One chain step: the output rows' head dims d .. d + 16 (C tile C) take the tile product of the probabilities
// (tile 4) and the 32 tokens from t of V (B tile B). A macro: GCC's AMX intrinsics paste the tile number into
// their asm text, so it must be a literal, not a template parameter.
#define FD_VALUE_STEP(C, B, d)                                                                            \
    do {                                                                                                  \
        fetch.next();                                                                                     \
        const size_t v0 = fdn::v_index(DT, t, d, D, P);                                                   \
        const long v_stride = (long)(fdn::v_index(DT, t + 2, d, D, P) - v0) * 2; /* between pair rows */ \
        _tile_loadd(C, acc + (d), (long)D * 4);                                                           \
        _tile_loadd(B, vb + v0 * 2, v_stride);                                                            \
        _tile_dpbf16ps(C, 4, B);                                                                          \
        _tile_stored(C, acc + (d), (long)D * 4);                                                          \
    } while (0)
            for (int d = 0; d < D; d += 48) {   // D is a multiple of 32: the second and third steps may be past it
                FD_VALUE_STEP(3, 5, d);
                if (d + 16 < D) FD_VALUE_STEP(0, 2, d + 16);
                if (d + 32 < D) FD_VALUE_STEP(6, 7, d + 32);
            }
#undef FD_VALUE_STEP
        }
    }
};

// The bf16-q kernels: with tiles where the shape fits them (tile_rows), else the AVX512-BF16 unit's.
template <class VL>
static void chunk_tiles(const fdn::ChunkTask *task, void (*fallback)(const fdn::ChunkTask *)) {
    const int rows = tile_rows(*task);
    if (!rows) return fallback(task);
    const TileConfig config(rows);
    _tile_loadconfig(&config);
    chunk_kernel<fdn::kDtypeBf16, ScoreAmx, VL>(task);
    _tile_release();   // a thread that holds no tile state saves none at a context switch
}

static void chunk_bf16_q(const fdn::ChunkTask *task) { chunk_tiles<ValueF32>(task, fdn::kernels_avx512_bf16()->chunk_bf16_q); }
static void chunk_bf16_qo(const fdn::ChunkTask *task) { chunk_tiles<ValueAmx>(task, fdn::kernels_avx512_bf16()->chunk_bf16_qo); }

const fdn::KernelTable kTable = make_table(chunk_bf16_q, chunk_bf16_qo);

}  // namespace amx
}  // namespace

const fdn::KernelTable *fdn::kernels_amx() { return &amx::kTable; }
