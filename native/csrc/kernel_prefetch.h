// Software prefetch for the kernels of kernel_body.h: what each pass fetches ahead, and how a short last
// page's few lines are fetched. Plain structs and inline functions over addresses (no SIMD vocabulary):
// included by kernel_body.h inside each unit's own namespace.

#ifndef FD_PREFETCH_LOCALITY
#define FD_PREFETCH_LOCALITY 3
#endif
#ifndef FD_PREFETCH_BLOCKS
#define FD_PREFETCH_BLOCKS 1
#endif
// How far ahead software prefetch runs, in K or V blocks of reading order (0: hardware prefetch only).
static constexpr int kPrefetchBlocks = FD_PREFETCH_BLOCKS;

// Software prefetch, kPrefetchBlocks blocks ahead in reading order (K of head h, V of head h, K of head
// h+1, ...): with one block, the score tiles fetch this head's V block and the value tiles the next
// head's K block. Each pass spreads its requests evenly over its steps: the score tiles one row of
// row_bytes per head dim, the value tiles per token pair (ValuePrefetch). Requests issued in bursts
// during one phase only (two blocks from the score tiles) left the memory idle during the other and
// ran one core at about half the rate (docs/benchmarks.md, issue 3).
// The far prefetch (ChunkTask::prefetch_far, chosen per pool): each pass also fetches the block after its near
// one into L2 (prefetcht2), line for line with the near prefetch. On the H100 host's Xeon, where a core's sixteen
// line-fill buffers bound what a near-only prefetch keeps in flight, it attends 4-9% faster at 16 threads
// (paired A/B, docs/benchmarks.md, "Session 6"); on the Zen 5 dev VM it costs 1-3%.
struct Prefetch {
    const uint8_t *for_scores, *for_values;           // the blocks to fetch into L1, or null
    const uint8_t *for_scores_far, *for_values_far;   // the blocks after those, into L2, or null
    size_t row_bytes;
    // A short page (ShortPage): for_scores is the next head's K block, whose token rows (and V pair rows) the
    // row pass fetches at the places it reads in this head's.
    bool is_next_head = false;
    void clear() { for_scores = for_values = for_scores_far = for_values_far = nullptr; }
};

// One pass's software prefetch, step by step: the i-th next() issues step i's prefetches, num_bytes from
// first + i * step_bytes, one per line, from a running pointer (no index multiply per step), and the
// same lines of the far block (far_first, or none when null) into L2. Without a near block (first null) it fetches
// 4 lines from idle (lines the pass reads anyway), so a hot loop has no null test for it. The lines of a step go
// out from a short loop: the same prefetches unrolled into one burst ran one Zen 5 core 7-9% slower from memory
// (same addresses, same order; docs/benchmarks.md, "Session 4: kernel work per byte").
struct PrefetchWalk {
    const uint8_t *at, *far;
    size_t step, span;
    PrefetchWalk(const uint8_t *first, const uint8_t *far_first, const uint8_t *idle, size_t step_bytes,
                 size_t num_bytes)
        : at(first ? first : idle), far(first ? far_first : nullptr), step(first ? step_bytes : 0),
          span(first ? num_bytes : 4 * 64) {}
    __attribute__((always_inline)) void next() {
        if (far) {
            for (size_t off = 0; off < span; off += 64) {
                __builtin_prefetch(at + off, 0, FD_PREFETCH_LOCALITY);
                __builtin_prefetch(far + off, 0, 1);
            }
            far += step;
        } else {
            for (size_t off = 0; off < span; off += 64) __builtin_prefetch(at + off, 0, FD_PREFETCH_LOCALITY);
        }
        at += step;
    }
};

// The score tiles' prefetch: one step per num_rows head-dim rows.
static inline PrefetchWalk score_prefetch(const Prefetch &pf, const uint8_t *idle, int num_rows) {
    const size_t num_bytes = (size_t)num_rows * pf.row_bytes;
    return PrefetchWalk(pf.for_scores, pf.for_scores_far, idle, num_bytes, num_bytes);
}

// A last page whose K is held by rows (fewer tokens than its first K tile: the new token's page, for its
// first steps; 256x512's 17th page holds 1..5): only a few of its lines hold tokens, and the block-ahead
// prefetch would fetch whole blocks. Instead the block-ahead walk skips it (the page before runs on into the next
// item) and chunk_kernel reads it head by head with the page before: head h's token lines (K rows, V pair rows)
// are fetched when the page before starts its head h and read right after it. A page that is a whole work item is
// fetched a head ahead instead: the next head's lines while the page reads the head before (its K row t and V pair
// row t / 2 by the row pass at token t; head 0's at the page start). Read after the page before as a whole, the
// short page cost 256x512 4-6% of its time on the dev VM with the memory fast; head by head it costs under 1%
// (docs/benchmarks.md, "Session 8").
struct ShortPage {
    static bool applies(int dtype, int n, int P) { return fdn::k_tile_by_rows(dtype, 0, P, n); }
    // The lines of V pair row r (tokens 2r, 2r + 1) in every V tile of the V block at vb: tile i starts at
    // i * kVTileDims * P pairs (2 * 2 bytes each) and its rows are 4 bytes per dim (the last tile may be narrower).
    // Forced inline: as a function of its own, which does nothing but prefetch, GCC 12 found it free of side
    // effects and dropped every call (even at -O1); count prefetcht0 in objdump -d.
    __attribute__((always_inline)) static inline void fetch_v_row(const uint8_t *vb, int r, int D, int P) {
        for (int d0 = 0; d0 < D; d0 += fdn::kVTileDims) {
            const int width = D - d0 < fdn::kVTileDims ? D - d0 : fdn::kVTileDims;
            const uint8_t *row = vb + (size_t)d0 * P * 2 + (size_t)r * width * 4;
            for (int off = 0; off < width * 4; off += 64) __builtin_prefetch(row + off, 0, FD_PREFETCH_LOCALITY);
        }
    }
    // The token lines of head h's blocks at kb (K rows, then V pair rows) of a page holding n tokens.
    __attribute__((always_inline)) static inline void fetch_head(const uint8_t *kb, size_t block, int n, int D, int P) {
        for (size_t off = 0; off < (size_t)n * D * 2; off += 64) __builtin_prefetch(kb + off, 0, FD_PREFETCH_LOCALITY);
        for (int r = 0; r < (n + 1) / 2; ++r) fetch_v_row(kb + block, r, D, P);
    }
};

// Where a value pass prefetches: num_bytes of the next block per token pair, from at onwards, and the same lines
// of the block after it from far onwards (either null when there is none).
struct ValuePrefetch {
    const uint8_t *at, *far;
    size_t num_bytes;
};

// Splits the next block (block_bytes at v) and the one after it (at v_far) over the token-pair steps of
// num_tiles value tiles.
static inline ValuePrefetch value_prefetch(const uint8_t *v, const uint8_t *v_far, size_t block_bytes, int num_tiles,
                                           int P, int tile) {
    if (!v) return {nullptr, nullptr, 0};
    const size_t per_step = (block_bytes / ((size_t)num_tiles * (P / 2)) + 63) / 64 * 64;
    const size_t offset = (size_t)tile * (P / 2) * per_step;
    return {v + offset, v_far ? v_far + offset : nullptr, per_step};
}
