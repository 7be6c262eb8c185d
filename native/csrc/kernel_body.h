// The attention and read kernels, written once over a small SIMD vocabulary `V`.
// Each kernel_<isa>.cpp defines `struct V` (register type R, lane count W, score tile TV, register
// budget ACC and the operations used below) inside an anonymous namespace, then includes this file
// inside that same namespace, so every instantiation has internal linkage, and builds its table
// with make_table().
//
// Page layout: see kernel_api.h (k_index, v_index); tiles are walked with PairWalk, whose start and
// step come from the layout once per tile. Scores for one page come out as vectors over
// tokens (no horizontal sums); the V accumulation keeps a tile of the group's outputs in registers
// while it walks the page's tokens. Both walk pairs (two head dims, or two tokens) per step: for
// bf16 one load and a shift and a mask give both halves.

template <int DT>
static inline V::R load_kv(const uint8_t *p, size_t idx) {
    if constexpr (DT == 0) return V::load(reinterpret_cast<const float *>(p) + idx);
    else if constexpr (DT == 1) return V::load_f16(reinterpret_cast<const uint16_t *>(p) + idx);
    else return V::load_bf16(reinterpret_cast<const uint16_t *>(p) + idx);
}

// A walk over the pairs of a block (head-dim pairs of K, token pairs of V) at one position, in
// elements: pair i starts at first + i * step; for fp32/fp16 its odd half lies hi further on (bf16
// pairs share a 32-bit lane). Computed from the layout once per tile, so the inner loops only add.
struct PairWalk {
    size_t first, step, hi;
};

// Elements between lane groups j and j+1 (W lanes) of one pair row: bf16 pairs take two per lane. Valid
// inside one layout tile, which score tiles (kKTileTokens % (TV * W) == 0) and value tiles (value_vecs)
// never leave.
template <int DT>
static constexpr size_t lane_group_elems() { return DT == fdn::kDtypeBf16 ? 2 * V::W : V::W; }

// The walk down K's head dims at token t.
static inline PairWalk k_walk(int dtype, int t, int D, int P) {
    const size_t first = fdn::k_index(dtype, 0, t, D, P);
    return {first, fdn::k_index(dtype, 2, t, D, P) - first, fdn::k_index(dtype, 1, t, D, P) - first};
}

// The walk down V's tokens at head dim d.
static inline PairWalk v_walk(int dtype, int d, int D, int P) {
    const size_t first = fdn::v_index(dtype, 0, d, D, P);
    return {first, fdn::v_index(dtype, 2, d, D, P) - first, fdn::v_index(dtype, 1, d, D, P) - first};
}

// lo and hi: the two halves of pair i of a walk, W lanes each; with is_pair false only lo is read.
template <int DT, bool is_pair = true>
static inline void load_pair(const uint8_t *block, const PairWalk &w, size_t i, V::R &lo, V::R &hi) {
    const size_t at = w.first + i * w.step;
    if constexpr (DT == fdn::kDtypeBf16) {
        V::load_bf16_pair(reinterpret_cast<const uint16_t *>(block) + at, lo, hi);
    } else {
        lo = load_kv<DT>(block, at);
        if constexpr (is_pair) hi = load_kv<DT>(block, at + w.hi);
    }
}

#include "kernel_prefetch.h"

// Scores from float32 q (scaled by 1/sqrt(D) beforehand): s[g][t0 .. t0+TV*W) = q[g] . K[t].
struct ScoreF32 {
    static constexpr bool kBf16Q = false;   // row_scores takes task.q
    template <int DT, int GB, int TV>
    static inline void tile(const fdn::ChunkTask &task, int r0, const uint8_t *kb, int t0, float *s,
                            const Prefetch &pf) {
        const int D = task.head_dim, P = task.page_size;
        const float *q = task.q + (size_t)r0 * D;
        // Even and odd head dims: two independent FMA chains, per pair of them C pairs apart; a 1-vector
        // tile (a part-filled last page) takes C = 2, so its chains are not bound by FMA latency.
        constexpr int C = TV == 1 ? 2 : 1;
        V::R acc[C][GB][TV], acc_hi[C][GB][TV];
        for (int c = 0; c < C; ++c)
            for (int g = 0; g < GB; ++g)
                for (int j = 0; j < TV; ++j) acc[c][g][j] = acc_hi[c][g][j] = V::zero();
        PairWalk walk = k_walk(DT, t0, D, P);
        PrefetchWalk fetch = score_prefetch(pf, kb, 2 * C);
        for (int d = 0; d < D; d += 2 * C) {   // D is a multiple of 16
            fetch.next();
            for (int c = 0; c < C; ++c, walk.first += walk.step) {
                V::R lo[TV], hi[TV];
                for (int j = 0; j < TV; ++j) {
                    const PairWalk wj{walk.first + j * lane_group_elems<DT>(), 0, walk.hi};
                    load_pair<DT>(kb, wj, 0, lo[j], hi[j]);
                }
                for (int g = 0; g < GB; ++g) {
                    const V::R qa = V::set1(q[g * D + d + 2 * c]), qb = V::set1(q[g * D + d + 2 * c + 1]);
                    for (int j = 0; j < TV; ++j) {
                        acc[c][g][j] = V::fma(qa, lo[j], acc[c][g][j]);
                        acc_hi[c][g][j] = V::fma(qb, hi[j], acc_hi[c][g][j]);
                    }
                }
            }
        }
        for (int g = 0; g < GB; ++g)
            for (int j = 0; j < TV; ++j) {
                V::R sum = V::add(acc[0][g][j], acc_hi[0][g][j]);
                if constexpr (C == 2) sum = V::add(sum, V::add(acc[1][g][j], acc_hi[1][g][j]));
                V::store(s + g * P + t0 + j * V::W, sum);
            }
    }
};

static_assert(fdn::kKTileTokens % (V::TV * V::W) == 0, "a score tile must lie inside one K layout tile");

// Scores of the tokens t0 .. n-1 of a K tile held by rows (kernel_api.h: k_tile_by_rows): per token, the
// group's dot products over D, two chains each, reduced four heads at once. q in float32: the caller's scaled
// rows, or (kBf16Q) the bf16 rows widened here and the scale applied to the sums. The pass's prefetch runs one
// step per token: the next head's token lines at a short page (Prefetch::is_next_head), else the near block
// (and the far one) spread over the tokens. A short page is all rows (t0 = 0), so token t's lines in the next head
// lie at t's offset.
template <int GB, bool kBf16Q>
static inline void row_scores(const fdn::ChunkTask &task, int r0, const uint8_t *kb, int t0, int n, float *s,
                              const Prefetch &pf) {
    const int D = task.head_dim, P = task.page_size;
    const float *q = task.q + (size_t)r0 * D;
    float scale = 1.0f;
    alignas(64) float q_wide[4 * fdn::kMaxHeadDim];
    if constexpr (kBf16Q) {
        for (int g = 0; g < GB; ++g)
            for (int d = 0; d < D; d += V::W) V::store(q_wide + g * D + d, V::load_bf16(task.q_bf16 + (size_t)(r0 + g) * D + d));
        q = q_wide;
        scale = task.scale;
    }
    const size_t row_bytes = (size_t)D * 2, block_bytes = row_bytes * P;
    const size_t per_token = pf.is_next_head ? row_bytes : (block_bytes / (size_t)(n - t0) + 63) / 64 * 64;
    PrefetchWalk fetch(pf.for_scores, pf.is_next_head ? nullptr : pf.for_scores_far, kb, per_token, per_token);
    const uint16_t *row = reinterpret_cast<const uint16_t *>(kb) + (size_t)t0 * D;
    for (int t = t0; t < n; ++t, row += D) {
        fetch.next();
        if (pf.is_next_head && t % 2 == 0) ShortPage::fetch_v_row(pf.for_scores + block_bytes, t / 2, D, P);
        V::R a[4], b[4];
        for (int g = 0; g < 4; ++g) a[g] = b[g] = V::zero();
        int d = 0;
        for (; d + 2 * V::W <= D; d += 2 * V::W) {
            const V::R k0 = V::load_bf16(row + d), k1 = V::load_bf16(row + d + V::W);
            for (int g = 0; g < GB; ++g) {
                a[g] = V::fma(V::load(q + g * D + d), k0, a[g]);
                b[g] = V::fma(V::load(q + g * D + d + V::W), k1, b[g]);
            }
        }
        if (d < D) {
            const V::R k0 = V::load_bf16(row + d);
            for (int g = 0; g < GB; ++g) a[g] = V::fma(V::load(q + g * D + d), k0, a[g]);
        }
        for (int g = 0; g < 4; ++g) a[g] = V::add(a[g], b[g]);
        V::hsum4(a);
        for (int g = 0; g < GB; ++g) s[g * P + t] = V::first(a[g]) * scale;
    }
}

template <int DT, int GB, class S>
static inline void page_scores(const fdn::ChunkTask &task, int r0, const uint8_t *kb, int n, float *s, Prefetch pf) {
    const int P = task.page_size;
    // Tokens of the tiles held in pairs: all, unless the last is held by rows (a part-filled bf16 tile).
    const bool has_rows = fdn::k_tile_by_rows(DT, n - 1, P, n);
    const int paired = has_rows ? (n - 1) / fdn::kKTileTokens * fdn::kKTileTokens : n;
    const int num_vecs = (paired + V::W - 1) / V::W;   // a part-filled last page: softmax_update masks the rest
    int j = 0;
    for (; j + V::TV <= num_vecs; j += V::TV) {
        S::template tile<DT, GB, V::TV>(task, r0, kb, j * V::W, s, pf);
        pf.clear();
    }
    for (; j < num_vecs; ++j) {
        S::template tile<DT, GB, 1>(task, r0, kb, j * V::W, s, pf);
        pf.clear();
    }
    if (has_rows) row_scores<GB, S::kBf16Q>(task, r0, kb, paired, n, s, pf);
}

// How far a page's scores may rise above a row's running max before the max is moved: exp(score - m)
// stays below e^8 (about 3e3), far from float32's range, and the result is the same up to rounding
// (softmax does not depend on the m subtracted, only l and acc scale with it).
static constexpr float kMaxMargin = 8.0f;

// Online softmax over one page: turns scores into probabilities (in place, zero past n) and updates
// the running state (m, l, acc) of each query head of the group.
// Common case: no score exceeds its row's running max by more than kMaxMargin, so m stays and nothing
// is rescaled; the check is one compare per score vector, with no horizontal max, no scalar exp and no
// branch per head. Otherwise (a row's first page, or a jump) m moves to the exact max of the row so far.
// Either way the group's sums are reduced together (V::hsum4).
template <int GB>
static inline void softmax_update(float *s, int P, int n, int D, float *m, float *l, float *acc) {
    // Only the vectors that hold tokens: the value passes read p[t] for t < n (bf16 pairs: t + 1 lies in
    // the same vector, W being even), so a short last page pays for its tokens, not for P.
    const int num_vecs = (n + V::W - 1) / V::W;
    bool is_over = false;
    for (int g = 0; g < GB; ++g) {
        float *sg = s + g * P;
        // Past n (a part-filled last page): -inf, in whole vectors (scalar stores read back by vector
        // loads cannot be forwarded from the store buffer).
        for (int j = n / V::W; j < num_vecs; ++j) V::store(sg + j * V::W, V::keep_first(V::load(sg + j * V::W), n - j * V::W, -INFINITY));
        const V::R limit = V::set1(m[g] + kMaxMargin);
        for (int j = 0; j < num_vecs; ++j) is_over |= V::any_greater(V::load(sg + j * V::W), limit);
    }
    float alpha[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (is_over) {
        V::R mx[4];
        for (int g = 0; g < GB; ++g) {
            const float *sg = s + g * P;
            mx[g] = V::load(sg);
            for (int j = 1; j < num_vecs; ++j) mx[g] = V::max(mx[g], V::load(sg + j * V::W));
        }
        for (int g = GB; g < 4; ++g) mx[g] = mx[0];
        V::hmax4(mx);
        for (int g = 0; g < GB; ++g) {
            const float page_max = V::first(mx[g]), m_new = page_max > m[g] ? page_max : m[g];
            alpha[g] = m[g] == -INFINITY ? 0.0f : m_new == m[g] ? 1.0f : expf(m[g] - m_new);
            m[g] = m_new;
            if (alpha[g] != 1.0f) {
                const V::R av = V::set1(alpha[g]);
                float *ag = acc + g * D;
                for (int d = 0; d < D; d += V::W) V::store(ag + d, V::mul(V::load(ag + d), av));
            }
        }
    }
    V::R sum[4];
    for (int g = 0; g < GB; ++g) {
        float *sg = s + g * P;
        const V::R mv = V::set1(m[g]);
        sum[g] = V::zero();
        for (int j = 0; j < num_vecs; ++j) {
            V::R p = V::exp(V::sub(V::load(sg + j * V::W), mv));
            if ((j + 1) * V::W > n) p = V::keep_first(p, n - j * V::W, 0.0f);   // the clamped exp left tiny values
            V::store(sg + j * V::W, p);
            sum[g] = V::add(sum[g], p);
        }
    }
    for (int g = GB; g < 4; ++g) sum[g] = sum[0];
    V::hsum4(sum);
    for (int g = 0; g < GB; ++g) l[g] = l[g] * alpha[g] + V::first(sum[g]);
}

// acc[g][d0 .. d0+DV*W) += sum over the page's n tokens of p[g][t] * V[t], two tokens per step.
template <int DT, int GB, int DV>
static inline void value_tile(const uint8_t *vb, int D, int P, int n, int d0, const float *p, float *acc,
                              const ValuePrefetch &pf) {
    V::R a[GB][DV];
    PairWalk walk = v_walk(DT, d0, D, P);
    for (int g = 0; g < GB; ++g)
        for (int j = 0; j < DV; ++j) a[g][j] = V::load(acc + g * D + d0 + j * V::W);
    int t = 0;
    PrefetchWalk fetch(pf.at, pf.far, vb, pf.num_bytes, pf.num_bytes);
    for (; t + 2 <= n; t += 2, walk.first += walk.step) {
        fetch.next();
        for (int j = 0; j < DV; ++j) {
            V::R lo, hi;
            load_pair<DT>(vb, PairWalk{walk.first + j * lane_group_elems<DT>(), 0, walk.hi}, 0, lo, hi);
            for (int g = 0; g < GB; ++g)
                a[g][j] = V::fma(V::set1(p[g * P + t + 1]), hi, V::fma(V::set1(p[g * P + t]), lo, a[g][j]));
        }
    }
    if (t < n) {   // an odd last token: its pair partner is not written yet
        for (int j = 0; j < DV; ++j) {
            V::R lo, hi;
            load_pair<DT, false>(vb, PairWalk{walk.first + j * lane_group_elems<DT>(), 0, walk.hi}, 0, lo, hi);
            for (int g = 0; g < GB; ++g) a[g][j] = V::fma(V::set1(p[g * P + t]), lo, a[g][j]);
        }
    }
    for (int g = 0; g < GB; ++g)
        for (int j = 0; j < DV; ++j) V::store(acc + g * D + d0 + j * V::W, a[g][j]);
}

// Vectors per value tile for GB query heads: what the register budget allows, rounded down to a power of
// two and, for bf16, at most one V layout tile (so each pass reads one tile front to back).
template <int DT, int GB>
static constexpr int value_vecs() {
    int limit = V::ACC / GB > 0 ? V::ACC / GB : 1;
    if (DT == fdn::kDtypeBf16 && limit > fdn::kVTileDims / V::W) limit = fdn::kVTileDims / V::W;
    int dv = 1;
    while (dv * 2 <= limit) dv *= 2;
    return dv;
}
static_assert(fdn::kVTileDims % V::W == 0, "V layout tiles hold whole lane groups");

// Values from float32 probabilities: every V element widened to float32.
struct ValueF32 {
    template <int DT, int GB>
    static inline void page(const uint8_t *vb, int D, int P, int n, const float *p, float *acc, const uint8_t *pf_v,
                            const uint8_t *pf_v_far) {
        constexpr int DV = value_vecs<DT, GB>();
        const int num_vecs = D / V::W, num_tiles = num_vecs / DV + num_vecs % DV;
        const size_t block = (size_t)D * P * fdn::dtype_size(DT);
        int j = 0, tile = 0;
        for (; j + DV <= num_vecs; j += DV, ++tile)
            value_tile<DT, GB, DV>(vb, D, P, n, j * V::W, p, acc,
                                   value_prefetch(pf_v, pf_v_far, block, num_tiles, P, tile));
        for (; j < num_vecs; ++j, ++tile)
            value_tile<DT, GB, 1>(vb, D, P, n, j * V::W, p, acc,
                                   value_prefetch(pf_v, pf_v_far, block, num_tiles, P, tile));
    }
};

template <int DT, int GB, class S, class VL>
static inline void page_step(const fdn::ChunkTask &task, int r0, const uint8_t *kb, const uint8_t *vb, int n,
                             float *s, const Prefetch &pf) {
    const int D = task.head_dim, P = task.page_size;
    float *m = task.m + r0, *l = task.l + r0, *acc = task.acc + (size_t)r0 * D;
    page_scores<DT, GB, S>(task, r0, kb, n, s, pf);
    softmax_update<GB>(s, P, n, D, m, l, acc);
    VL::template page<DT, GB>(vb, D, P, n, s, acc, pf.for_values, pf.for_values_far);
}

// One work item: a chunk of one sequence's pages, all KV heads, each page front to back.
template <int DT, class S, class VL = ValueF32>
static void chunk_kernel(const fdn::ChunkTask *task) {
    const int D = task->head_dim, P = task->page_size, G = task->group, H = task->num_kv_heads;
    const size_t block = task->block_bytes;
    alignas(64) float s[4 * 256];
    for (int r = 0; r < H * G; ++r) {
        task->m[r] = -INFINITY;
        task->l[r] = 0.0f;
    }
    memset(task->acc, 0, sizeof(float) * (size_t)H * G * D);
    // A short last page (ShortPage) behind full ones is left out of the block-ahead walk and read head by head
    // together with the page before: that page's head h, then the short page's head h (each head's pages still in
    // page order, so the result is the same), while the walk's prefetch runs on.
    const int last_n = task->num_tokens - (task->num_pages - 1) * P;
    const bool is_last_short = kPrefetchBlocks > 0 && task->num_pages > 1 && ShortPage::applies(DT, last_n, P);
    const int num_walked = task->num_pages - is_last_short;
    const int num_blocks = 2 * num_walked * H;
    const bool is_far = task->prefetch_far;
    // Block i of the walk's reading order; past the chunk's walked pages, the next item's first page, or null.
    auto block_at = [&](int i) -> const uint8_t * {
        if (kPrefetchBlocks == 0) return nullptr;
        if (i >= num_blocks)
            return task->next_page && i - num_blocks < 2 * H ? task->next_page + block * (size_t)(i - num_blocks) : nullptr;
        return task->base + (size_t)task->pages[i / (2 * H)] * task->page_bytes + block * (size_t)(i % (2 * H));
    };
    auto head_step = [&](const uint8_t *kb, const uint8_t *vb, int n, int h, Prefetch pf) {
        for (int g0 = 0; g0 < G; g0 += 4) {
            const int r0 = h * G + g0;
            switch (G - g0 < 4 ? G - g0 : 4) {
                case 1: page_step<DT, 1, S, VL>(*task, r0, kb, vb, n, s, pf); break;
                case 2: page_step<DT, 2, S, VL>(*task, r0, kb, vb, n, s, pf); break;
                case 3: page_step<DT, 3, S, VL>(*task, r0, kb, vb, n, s, pf); break;
                default: page_step<DT, 4, S, VL>(*task, r0, kb, vb, n, s, pf); break;
            }
            pf.clear();
        }
    };
    const uint8_t *short_page = is_last_short ? task->base + (size_t)task->pages[num_walked] * task->page_bytes : nullptr;
    for (int pi = 0; pi < num_walked; ++pi) {
        const uint8_t *page = task->base + (size_t)task->pages[pi] * task->page_bytes;
        const int n = pi == task->num_pages - 1 ? task->num_tokens - pi * P : P;
        const bool is_short = kPrefetchBlocks > 0 && ShortPage::applies(DT, n, P);   // a one-page item's page
        if (is_short) ShortPage::fetch_head(page, block, n, D, P);   // head 0's
        const bool with_short = short_page && pi == num_walked - 1;
        // The new token's source rows: every head's into L2 when the last walked page starts, head h's into L1
        // when that page starts head h (about one head step before write_token copies them). There is always a
        // walked page: a short last page is left out of the walk only behind another.
        const bool is_token_page = task->token_src_k && pi == num_walked - 1;
        if (is_token_page)
            for (size_t off = 0; off < task->token_src_bytes; off += 64) {
                __builtin_prefetch(task->token_src_k + off, 0, 2);
                __builtin_prefetch(task->token_src_v + off, 0, 2);
            }
        for (int h = 0; h < H; ++h) {
            if (task->write_token && pi == task->num_pages - 1) task->write_token(task->write_ctx, h);
            const uint8_t *kb = page + 2 * block * h, *vb = kb + block;
            const uint8_t *short_kb = with_short ? short_page + 2 * block * h : nullptr;
            if (short_kb) ShortPage::fetch_head(short_kb, block, last_n, D, P);
            if (is_token_page) {
                const size_t row_bytes = task->token_src_bytes / H;
                for (size_t off = 0; off < row_bytes; off += 64) {
                    __builtin_prefetch(task->token_src_k + h * row_bytes + off, 0, FD_PREFETCH_LOCALITY);
                    __builtin_prefetch(task->token_src_v + h * row_bytes + off, 0, FD_PREFETCH_LOCALITY);
                }
            }
            const int k_block = 2 * (pi * H + h);   // this head's K block in reading order
            // The blocks kPrefetchBlocks, +1 and +2 after this head's K: the score pass's near one, the value
            // pass's near one (the score pass's far one) and the value pass's far one.
            const uint8_t *ahead = block_at(k_block + kPrefetchBlocks);
            const uint8_t *ahead1 = block_at(k_block + 1 + kPrefetchBlocks);
            const uint8_t *ahead2 = is_far ? block_at(k_block + 2 + kPrefetchBlocks) : nullptr;
            Prefetch pf{ahead, ahead1, is_far ? ahead1 : nullptr, ahead2, (size_t)P * fdn::dtype_size(DT)};
            if (is_short) {
                pf.clear();
                pf.is_next_head = h + 1 < H;
                if (pf.is_next_head) {
                    pf.for_scores = kb + 2 * block;   // the next head's K block
                } else {                              // a one-page item: the next item's first blocks
                    pf.for_scores = block_at(k_block + 2);
                    pf.for_values = block_at(k_block + 3);
                }
            }
            head_step(kb, vb, n, h, pf);
            if (short_kb) {   // no prefetch of its own: the walk's, from the page before, is in flight
                if (task->write_token) task->write_token(task->write_ctx, h);
                head_step(short_kb, short_kb + block, last_n, h, Prefetch{});
            }
            if (task->finish_head && pi == num_walked - 1) task->finish_head(task->finish_ctx, h);
        }
    }
}

// A row's output is the chunks' accumulators, each weighted by exp(m_c - M), over the weighted sum of their l; the
// first chunk that holds any score starts the sum (w * acc, no added zero), so a sequence of one chunk is its acc / l
// exactly, and is stored straight from its state without the weighting.
static void merge_kernel(const fdn::MergeTask *task) {
    const int D = task->head_dim, R = task->num_rows, C = task->num_chunks;
    const size_t S = task->chunk_stride;
    alignas(64) float o[fdn::kMaxHeadDim];
    for (int g = 0; g < R; ++g) {
        float M = -INFINITY;
        for (int c = 0; c < C; ++c) M = task->m[c * S + g] > M ? task->m[c * S + g] : M;
        if (C == 1 && std::isfinite(M)) {   // what the loop below gives it, weight 1
            fdn::store_row(task->out, (size_t)g * D, task->out_dtype, task->acc + (size_t)g * D, D, 1.0f / task->l[g]);
            if (task->lse) task->lse[g] = M + logf(task->l[g]);
            continue;
        }
        float L = 0.0f;
        bool is_first = true;
        for (int c = 0; c < C; ++c) {
            const float mc = task->m[c * S + g];
            if (mc == -INFINITY) continue;
            const float gap = mc - M;
            const float w = gap == 0.0f ? 1.0f : expf(gap);   // the largest chunk's weight is 1
            const V::R wv = V::set1(w);
            const float *ac = task->acc + c * S + (size_t)g * D;
            if (is_first) {
                L = task->l[c * S + g] * w;
                for (int d = 0; d < D; d += V::W) V::store(o + d, V::mul(wv, V::load(ac + d)));
                is_first = false;
            } else {
                L += task->l[c * S + g] * w;
                for (int d = 0; d < D; d += V::W) V::store(o + d, V::fma(wv, V::load(ac + d), V::load(o + d)));
            }
        }
        if (is_first)   // no chunk holds a score (all -inf): 0 / 0
            for (int d = 0; d < D; d += V::W) V::store(o + d, V::zero());
        const float inv = 1.0f / L;
        fdn::store_row(task->out, (size_t)g * D, task->out_dtype, o, D, inv);
        if (task->lse) task->lse[g] = M + logf(L);
    }
}

static double read_sum(const float *data, size_t count) {
    V::R a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
    V::R a4 = V::zero(), a5 = V::zero(), a6 = V::zero(), a7 = V::zero();
    const size_t step = 8 * (size_t)V::W;
    size_t i = 0;
    for (; i + step <= count; i += step) {
        const float *p = data + i;
        a0 = V::add(a0, V::load(p));
        a1 = V::add(a1, V::load(p + V::W));
        a2 = V::add(a2, V::load(p + 2 * V::W));
        a3 = V::add(a3, V::load(p + 3 * V::W));
        a4 = V::add(a4, V::load(p + 4 * V::W));
        a5 = V::add(a5, V::load(p + 5 * V::W));
        a6 = V::add(a6, V::load(p + 6 * V::W));
        a7 = V::add(a7, V::load(p + 7 * V::W));
    }
    const V::R s = V::add(V::add(V::add(a0, a1), V::add(a2, a3)), V::add(V::add(a4, a5), V::add(a6, a7)));
    double r = V::hsum(s);
    for (; i < count; ++i) r += data[i];
    return r;
}

// The unit's table; chunk_bf16_q and chunk_bf16_qo are the bf16 kernels where the unit has them.
static constexpr fdn::KernelTable make_table(void (*chunk_bf16_q)(const fdn::ChunkTask *),
                                             void (*chunk_bf16_qo)(const fdn::ChunkTask *)) {
    return {{chunk_kernel<0, ScoreF32>, chunk_kernel<1, ScoreF32>, chunk_kernel<2, ScoreF32>}, chunk_bf16_q,
            chunk_bf16_qo, merge_kernel, read_sum};
}
