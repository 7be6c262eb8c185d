







// The attention and read kernels, written once over a small SIMD vocabulary `V`.
// Each kernel_<isa>.cpp defines `struct V` (register type R, lane count W, score tile TV, register
// budget ACC and the operations used below) inside an anonymous namespace, then includes this file
// inside that same anonymous namespace, so every instantiation has internal linkage.
//
// Page layout (see pool.h): for each KV head a K^T block [D][P] followed by its V block [P][D]. Scores for one page come out as vectors over tokens (no horizontal sums), and the
// V accumulation keeps a tile of the group's outputs in registers while it walks the page's tokens.

template <int DT>
static inline V::R load_kv(const uint8_t *p, size_t idx) {
    if constexpr (DT == 0) return V::load(reinterpret_cast<const float *>(p) + idx);
    else if constexpr (DT == 1) return V::load_f16(reinterpret_cast<const uint16_t *>(p) + idx);
    else return V::load_bf16(reinterpret_cast<const uint16_t *>(p) + idx);
}

#ifndef FD_PREFETCH_STEPS
#define FD_PREFETCH_STEPS 2
#endif
static constexpr int kPrefetchSteps = FD_PREFETCH_STEPS;   // head blocks ahead

static inline void prefetch_lines(const uint8_t *p, size_t num_bytes) {
    for (size_t off = 0; off < num_bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

// s[g][t0 .. t0+TV*W) = q[g] . K[t] for a tile of TV token vectors; optionally prefetches one row
// of the next page's K and V blocks per head-dim step (pf_row bytes each).
template <int DT, int GB, int TV>
static inline void score_tile(const uint8_t *kb, int D, int P, int t0, const float *q, float *s,
                              const uint8_t *pf_k, const uint8_t *pf_v, size_t pf_row) {
    V::R acc[GB][TV];
    for (int g = 0; g < GB; ++g)
        for (int j = 0; j < TV; ++j) acc[g][j] = V::zero();
    for (int d = 0; d < D; ++d) {
        if (pf_k) {
            prefetch_lines(pf_k + (size_t)d * pf_row, pf_row);
            prefetch_lines(pf_v + (size_t)d * pf_row, pf_row);
        }
        V::R kv[TV];
        for (int j = 0; j < TV; ++j) kv[j] = load_kv<DT>(kb, (size_t)d * P + t0 + j * V::W);
        for (int g = 0; g < GB; ++g) {
            const V::R qb = V::set1(q[g * D + d]);
            for (int j = 0; j < TV; ++j) acc[g][j] = V::fma(qb, kv[j], acc[g][j]);
        }
    }
    for (int g = 0; g < GB; ++g)
        for (int j = 0; j < TV; ++j) V::store(s + g * P + t0 + j * V::W, acc[g][j]);
}

template <int DT, int GB>
static inline void page_scores(const uint8_t *kb, int D, int P, const float *q, float *s,
                               const uint8_t *pf_k, const uint8_t *pf_v) {
    const int num_vecs = P / V::W;
    const size_t pf_row = (size_t)P * fdn::dtype_size(DT);
    int j = 0;
    for (; j + V::TV <= num_vecs; j += V::TV) {
        score_tile<DT, GB, V::TV>(kb, D, P, j * V::W, q, s, pf_k, pf_v, pf_row);
        pf_k = pf_v = nullptr;
    }
    for (; j < num_vecs; ++j) {
        score_tile<DT, GB, 1>(kb, D, P, j * V::W, q, s, pf_k, pf_v, pf_row);
        pf_k = pf_v = nullptr;
    }
}

// Online softmax over one page: turns scores into probabilities (in place, zero past n) and rescales
// the running state of each query head.
template <int GB>
static inline void softmax_update(float *s, int P, int n, int D, float *m, float *l, float *acc) {
    const int num_vecs = P / V::W;
    for (int g = 0; g < GB; ++g) {
        float *sg = s + g * P;
        for (int t = n; t < P; ++t) sg[t] = -INFINITY;
        V::R mx = V::load(sg);
        for (int j = 1; j < num_vecs; ++j) mx = V::max(mx, V::load(sg + j * V::W));
        const float page_max = V::hmax(mx);
        const float m_new = page_max > m[g] ? page_max : m[g];
        const float alpha = m[g] == -INFINITY ? 0.0f : expf(m[g] - m_new);
        const V::R mv = V::set1(m_new);
        for (int j = 0; j < num_vecs; ++j) V::store(sg + j * V::W, V::exp(V::sub(V::load(sg + j * V::W), mv)));
        for (int t = n; t < P; ++t) sg[t] = 0.0f;
        V::R sum = V::zero();
        for (int j = 0; j < num_vecs; ++j) sum = V::add(sum, V::load(sg + j * V::W));
        l[g] = l[g] * alpha + V::hsum(sum);
        if (alpha != 1.0f) {
            const V::R av = V::set1(alpha);
            float *ag = acc + g * D;
            for (int d = 0; d < D; d += V::W) V::store(ag + d, V::mul(V::load(ag + d), av));
        }
        m[g] = m_new;
    }
}

template <int DT, int GB, int DV>
static inline void value_tile(const uint8_t *vb, int D, int n, int d0, const float *p, int P, float *acc) {
    V::R a[GB][DV];
    for (int g = 0; g < GB; ++g)
        for (int j = 0; j < DV; ++j) a[g][j] = V::load(acc + g * D + d0 + j * V::W);
    for (int t = 0; t < n; ++t) {
        V::R vv[DV];
        for (int j = 0; j < DV; ++j) vv[j] = load_kv<DT>(vb, (size_t)t * D + d0 + j * V::W);
        for (int g = 0; g < GB; ++g) {
            const V::R pb = V::set1(p[g * P + t]);
            for (int j = 0; j < DV; ++j) a[g][j] = V::fma(pb, vv[j], a[g][j]);
        }
    }
    for (int g = 0; g < GB; ++g)
        for (int j = 0; j < DV; ++j) V::store(acc + g * D + d0 + j * V::W, a[g][j]);
}

template <int DT, int GB>
static inline void page_values(const uint8_t *vb, int D, int n, const float *p, int P, float *acc) {
    constexpr int DV = V::ACC / GB > 0 ? V::ACC / GB : 1;
    const int num_vecs = D / V::W;
    int j = 0;
    for (; j + DV <= num_vecs; j += DV) value_tile<DT, GB, DV>(vb, D, n, j * V::W, p, P, acc);
    for (; j < num_vecs; ++j) value_tile<DT, GB, 1>(vb, D, n, j * V::W, p, P, acc);
}

template <int DT, int GB>
static inline void page_step(const uint8_t *kb, const uint8_t *vb, int D, int P, int n, const float *q,
                             float *s, float *m, float *l, float *acc, const uint8_t *pf_k, const uint8_t *pf_v) {
    page_scores<DT, GB>(kb, D, P, q, s, pf_k, pf_v);
    softmax_update<GB>(s, P, n, D, m, l, acc);
    page_values<DT, GB>(vb, D, n, s, P, acc);
}

template <int DT>
static void chunk_kernel(const fdn::ChunkTask *task) {
    const int D = task->head_dim, P = task->page_size, G = task->group, H = task->num_kv_heads;
    const size_t block = task->block_bytes;
    alignas(64) float s[4 * 256];
    for (int r = 0; r < H * G; ++r) {
        task->m[r] = -INFINITY;
        task->l[r] = 0.0f;
    }
    memset(task->acc, 0, sizeof(float) * (size_t)H * G * D);
    int remaining = task->num_tokens;
    const int num_steps = task->num_pages * H;
    for (int pi = 0; pi < task->num_pages; ++pi) {
        const uint8_t *page = task->base + (size_t)task->pages[pi] * task->page_bytes;
        const int n = remaining < P ? remaining : P;
        remaining -= n;
        for (int h = 0; h < H; ++h) {
            const uint8_t *kb = page + 2 * block * h, *vb = kb + block;
            // Prefetch the head block kPrefetchSteps ahead in reading order, one row per head-dim step.
            const uint8_t *pf_k = nullptr, *pf_v = nullptr;
            const int ahead = pi * H + h + kPrefetchSteps;
            if (ahead < num_steps) {
                pf_k = task->base + (size_t)task->pages[ahead / H] * task->page_bytes + 2 * block * (ahead % H);
                pf_v = pf_k + block;
            }
            for (int g0 = 0; g0 < G; g0 += 4) {
                const int gb = G - g0 < 4 ? G - g0 : 4, r0 = h * G + g0;
                const float *qg = task->q + (size_t)r0 * D;
                float *mg = task->m + r0, *lg = task->l + r0, *ag = task->acc + (size_t)r0 * D;
                switch (gb) {
                    case 1: page_step<DT, 1>(kb, vb, D, P, n, qg, s, mg, lg, ag, pf_k, pf_v); break;
                    case 2: page_step<DT, 2>(kb, vb, D, P, n, qg, s, mg, lg, ag, pf_k, pf_v); break;
                    case 3: page_step<DT, 3>(kb, vb, D, P, n, qg, s, mg, lg, ag, pf_k, pf_v); break;
                    default: page_step<DT, 4>(kb, vb, D, P, n, qg, s, mg, lg, ag, pf_k, pf_v); break;
                }
                pf_k = pf_v = nullptr;
            }
        }
    }
}

static void merge_kernel(const fdn::MergeTask *task) {
    const int D = task->head_dim, R = task->num_rows, C = task->num_chunks;
    alignas(64) float o[fdn::kMaxHeadDim];
    for (int g = 0; g < R; ++g) {
        float M = -INFINITY;
        for (int c = 0; c < C; ++c) M = task->m[c * R + g] > M ? task->m[c * R + g] : M;
        float L = 0.0f;
        for (int d = 0; d < D; d += V::W) V::store(o + d, V::zero());
        for (int c = 0; c < C; ++c) {
            const float mc = task->m[c * R + g];
            if (mc == -INFINITY) continue;
            const float w = expf(mc - M);
            L += task->l[c * R + g] * w;
            const V::R wv = V::set1(w);
            const float *ac = task->acc + ((size_t)c * R + g) * D;
            for (int d = 0; d < D; d += V::W) V::store(o + d, V::fma(wv, V::load(ac + d), V::load(o + d)));
        }
        const float inv = 1.0f / L;
        for (int d = 0; d < D; ++d) fdn::store_scalar(task->out, (size_t)g * D + d, task->out_dtype, o[d] * inv);
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

static const fdn::KernelTable kTable = {
    {chunk_kernel<0>, chunk_kernel<1>, chunk_kernel<2>},
    merge_kernel,
    read_sum,
};
