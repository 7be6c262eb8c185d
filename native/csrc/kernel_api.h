// Internal interface between the dispatcher and the per-ISA kernel translation units.
// This header holds only plain structs and `static inline` helpers: every ISA unit gets its own
// private copy, so no weak symbol compiled for AVX-512 can leak into the baseline path.
#ifndef FASTDECODE_KERNEL_API_H
#define FASTDECODE_KERNEL_API_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

namespace fdn {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroup = 16;

// One attention work item: one sequence, one chunk of whole pages, all KV heads (each page is read
// front to back: head h's K^T block [D][P] then its V block [P][D], then head h+1).
struct ChunkTask {
    const uint8_t *base;      // pool memory
    const int32_t *pages;     // page indices of this chunk
    size_t page_bytes;
    size_t block_bytes;       // one K^T or V block of one head; a head takes 2 blocks
    int32_t num_pages;
    int32_t num_tokens;       // tokens in the chunk: every page full except maybe the last
    int32_t page_size;
    int32_t head_dim;
    int32_t num_kv_heads;
    int32_t group;            // query heads per KV head
    const float *q;           // [num_kv_heads * group][head_dim], already scaled by 1/sqrt(head_dim)
    const uint16_t *q_bf16;   // the same rows as the caller's bf16, unscaled (chunk_bf16_q only)
    float scale;              // 1/sqrt(head_dim), applied to q_bf16 scores
    float *acc;               // out: [num_kv_heads * group][head_dim], unnormalised
    float *m;                 // out: [num_kv_heads * group], running max of scaled scores
    float *l;                 // out: [num_kv_heads * group], sum of exp(score - m)
    // The new token, when this chunk holds it (else null): write_token(write_ctx, h) stores KV head h of it
    // into the last page just before the kernel reads that head there, when the prefetch has brought
    // those lines in (written up front, each of its ~70 lines per head was a miss of its own).
    void (*write_token)(const void *write_ctx, int head);
    const void *write_ctx;
    // The caller's rows that write_token copies (k and v, each [num_kv_heads][head_dim], token_src_bytes in
    // all), or null: prefetched on the last walked page. The call's KV walk has evicted them, and each head's
    // copy waited on their misses (docs/benchmarks.md, "Session 14").
    const uint8_t *token_src_k = nullptr, *token_src_v = nullptr;
    size_t token_src_bytes = 0;
    // A work item that is its whole sequence (else null): finish_head(finish_ctx, h) writes the output rows of KV
    // head h's query heads as soon as the kernel has read that head's last page, so the merge and the output
    // stores of one head overlap the prefetch of the next instead of running after the item with none in flight.
    void (*finish_head)(const void *finish_ctx, int head) = nullptr;
    const void *finish_ctx = nullptr;
    // The first page of the item the thread runs next, or null: the prefetch runs on into it.
    const uint8_t *next_page = nullptr;
    bool prefetch_far = false;   // also fetch the block after each prefetched one, into L2
};

// Merges one sequence's chunk partials in chunk order and writes its output rows.
struct MergeTask {
    const float *acc;         // chunk c's [num_rows][head_dim] at acc + c * chunk_stride
    const float *m;           // chunk c's [num_rows] at m + c * chunk_stride
    const float *l;           // chunk c's [num_rows] at l + c * chunk_stride
    size_t chunk_stride;      // floats between the states of consecutive chunks
    int32_t num_chunks;
    int32_t num_rows;         // query heads
    int32_t head_dim;
    void *out;                // num_rows rows [head_dim] of out_dtype
    int32_t out_dtype;
    float *lse;               // num_rows floats, or nullptr
};

struct KernelTable {
    void (*chunk[3])(const ChunkTask *task);   // indexed by the KV dtype; q as scaled float32
    void (*chunk_bf16_q)(const ChunkTask *task);   // bf16 KV and bf16 q (dot products of bf16 pairs), or null
    // bf16 KV, q and output: chunk_bf16_q with P.V from bf16 dot products too (probabilities rounded
    // to bf16, float32 accumulation), or null
    void (*chunk_bf16_qo)(const ChunkTask *task);
    void (*merge)(const MergeTask *task);
    double (*read_sum)(const float *data, size_t count);
};

const KernelTable *kernels_generic();
const KernelTable *kernels_avx2();     // only linked when the compiler supports the flags
const KernelTable *kernels_avx512();
const KernelTable *kernels_avx512_bf16();   // AVX-512 plus AVX512-BF16 (same unit, per-function target)
const KernelTable *kernels_amx();           // AVX512-BF16 plus AMX tiles (only linked when the compiler has AMX)
// Time of one zmm vdpbf16ps over one zmm vfmadd231ps at full throughput, measured on first use (a fraction
// of a millisecond). Only where kernels_avx512_bf16 runs.
double bf16_dot_relative_cost();

// ---- page layout (see pool.h) ----
// fp32 and fp16 blocks: K^T [D][P] and V [P][D]. bf16 blocks hold pairs, so that one 32-bit lane
// carries two neighbours that one FMA step uses together: K pairs two head dims of a token, V pairs
// two tokens of a head dim. bf16 blocks are also tiled so that the kernels read every block in one
// front-to-back pass (the hardware stream prefetchers follow that; see docs/benchmarks.md, issue 3):
// K as [P/32][D/2][32][2] (32-token tiles: one score tile), V as [D/64][P/2][64][2] (64-dim tiles:
// one value tile); a last, narrower tile holds the rest when P or D is not a multiple of the tile. A K
// tile not yet filled is held by rows (k_tile_by_rows).
// A shift or a mask widens either half of a pair to float32.
constexpr int kDtypeBf16 = 2;
constexpr int kKTileTokens = 32;
constexpr int kVTileDims = 64;

// Element (row, col) of a bf16 pair block of num_rows pair rows by num_cols columns, tiled by tile columns.
static inline size_t tiled_pair_index(int row, int col, int is_odd, int num_rows, int num_cols, int tile) {
    const int t0 = col / tile * tile, width = num_cols - t0 < tile ? num_cols - t0 : tile;
    return ((size_t)t0 * num_rows + (size_t)row * width + (col - t0)) * 2 + is_odd;
}

// K of a complete tile (every token of it written).
static inline size_t k_index(int dtype, int d, int t, int D, int P) {
    return dtype == kDtypeBf16 ? tiled_pair_index(d >> 1, t, d & 1, D / 2, P, kKTileTokens) : (size_t)d * P + t;
}

// A bf16 K tile that the page's tokens do not fill yet (the sequence's last one) is held by rows instead:
// token t's head dims at t * D .. t * D + D, inside the tile's own span. A new token then costs the
// D * 2 bytes of its row (4 lines at D = 128) where the pair tiles spread it over D / 2 rows of 128 bytes
// (64 lines written, and read back by every step), and a few tokens are read as a few rows. The tile is
// rewritten into pairs once its last token arrives (pool_complete_k_tile).
static inline bool k_tile_by_rows(int dtype, int t, int P, int page_tokens) {
    if (dtype != kDtypeBf16) return false;
    const int t0 = t / kKTileTokens * kKTileTokens, width = P - t0 < kKTileTokens ? P - t0 : kKTileTokens;
    return page_tokens < t0 + width;
}

// K element (d, t) of a page that holds page_tokens tokens.
static inline size_t k_index_at(int dtype, int d, int t, int D, int P, int page_tokens) {
    return k_tile_by_rows(dtype, t, P, page_tokens) ? (size_t)t * D + d : k_index(dtype, d, t, D, P);
}

static inline size_t v_index(int dtype, int t, int d, int D, int P) {
    return dtype == kDtypeBf16 ? tiled_pair_index(t >> 1, d, t & 1, P / 2, D, kVTileDims) : (size_t)t * D + d;
}

// ---- scalar dtype conversions (round to nearest even), shared by all units ----

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);   // quiet NaN
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {
        float mag = (float)m * (1.0f / 16777216.0f);   // m * 2^-24, exact
        return sign ? -mag : mag;
    }
    if (e == 31) return bits_f32(sign | 0x7F800000u | (m << 13));
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u | ((a >> 13) & 0x3FFu) : 0u));
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);        // rounds to infinity
    if (a >= 0x38800000u)                                            // normal half
        return (uint16_t)(sign | ((a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13));
    if (a < 0x33000000u) return (uint16_t)sign;                      // below half the smallest subnormal
    uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - e, r = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
}

static inline size_t dtype_size(int dtype) { return dtype == 0 ? 4 : 2; }

static inline float load_scalar(const void *p, size_t i, int dtype) {
    if (dtype == 0) return ((const float *)p)[i];
    if (dtype == 1) return f16_to_f32(((const uint16_t *)p)[i]);
    return bf16_to_f32(((const uint16_t *)p)[i]);
}

static inline void store_scalar(void *p, size_t i, int dtype, float f) {
    if (dtype == 0) ((float *)p)[i] = f;
    else if (dtype == 1) ((uint16_t *)p)[i] = f32_to_f16(f);
    else ((uint16_t *)p)[i] = f32_to_bf16(f);
}

// dst[i .. i+n) = src[0 .. n) * scale as dtype: one loop per dtype, so the compiler vectorises each.
static inline void store_row(void *dst, size_t i, int dtype, const float *src, int n, float scale) {
    if (dtype == 0) {
        float *d = static_cast<float *>(dst) + i;
        for (int j = 0; j < n; ++j) d[j] = src[j] * scale;
    } else if (dtype == 1) {
        uint16_t *d = static_cast<uint16_t *>(dst) + i;
        for (int j = 0; j < n; ++j) d[j] = f32_to_f16(src[j] * scale);
    } else {
        uint16_t *d = static_cast<uint16_t *>(dst) + i;
        for (int j = 0; j < n; ++j) d[j] = f32_to_bf16(src[j] * scale);
    }
}

}  // namespace fdn
#endif
