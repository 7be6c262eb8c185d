// KV pool: creation (mapping, pre-faulting by the team), sequences, bulk append and read-back.
#include "pool.h"

#include <omp.h>
#include <string.h>
#include <sys/mman.h>

#include <memory>

namespace fdn {

// The most tokens a chunk (the unit a long sequence is split into across threads) may hold: far above any useful
// size (the default is 512), low enough that page arithmetic on it stays well inside int.
static constexpr int kMaxChunkTokens = 1 << 20;

static bool valid_dtype(int32_t dtype) { return dtype == FD_F32 || dtype == FD_F16 || dtype == FD_BF16; }

int32_t pool_create(const fd_pool_config &c, const KernelTable *kernels, int32_t isa, fd_pool **out) {
    if (c.num_layers < 1 || c.num_kv_heads < 1) return set_error("num_layers and num_kv_heads must be >= 1"), FD_EINVAL;
    if (c.head_dim < 16 || c.head_dim > kMaxHeadDim || c.head_dim % 16)
        return set_error("head_dim must be a multiple of 16 in [16, %d], got %d", kMaxHeadDim, c.head_dim), FD_EINVAL;
    if (c.page_size < 16 || c.page_size > 256 || c.page_size % 16)
        return set_error("page_size must be a multiple of 16 in [16, 256], got %d", c.page_size), FD_EINVAL;
    if (!valid_dtype(c.kv_dtype)) return set_error("unknown kv dtype code %d", c.kv_dtype), FD_EINVAL;
    if (c.chunk_pages < 1 || c.chunk_pages > kMaxChunkTokens / c.page_size)
        return set_error("chunk_pages must be in [1, %d] for pages of %d tokens (chunks of at most %d tokens)",
                         kMaxChunkTokens / c.page_size, c.page_size, kMaxChunkTokens), FD_EINVAL;
    if (c.prefetch_far < 0 || c.prefetch_far > 1) return set_error("prefetch_far must be 0 or 1"), FD_EINVAL;
    if (int32_t st = check_team_args(c.num_threads, c.cpu_list, c.num_cpus)) return st;

    // Owned here until it is handed out: a bad_alloc below (caught at the boundary) frees it and its mapping.
    std::unique_ptr<fd_pool, void (*)(fd_pool *)> owned(new fd_pool(), pool_destroy);
    fd_pool *pool = owned.get();
    pool->num_layers = c.num_layers;
    pool->num_kv_heads = c.num_kv_heads;
    pool->head_dim = c.head_dim;
    pool->kv_dtype = c.kv_dtype;
    pool->page_size = c.page_size;
    pool->chunk_pages = c.chunk_pages;
    pool->isa = isa;
    pool->prefetch_far = c.prefetch_far > 0;
    pool->kernels = kernels;
    pool->team.num_threads = c.num_threads;
    pool->team.cpus.assign(c.cpu_list, c.cpu_list + c.num_cpus);
    pool->elem_bytes = dtype_size(c.kv_dtype);
    pool->block_bytes = (size_t)c.head_dim * c.page_size * pool->elem_bytes;
    pool->page_bytes = 2 * (size_t)c.num_kv_heads * pool->block_bytes;
    pool->num_pages = c.capacity_bytes > 0 ? c.capacity_bytes / (int64_t)pool->page_bytes : 0;
    if (pool->num_pages < 1 || pool->num_pages > INT32_MAX) {
        set_error("capacity_bytes %lld holds %lld pages of %zu bytes; need between 1 and 2^31-1",
                  (long long)c.capacity_bytes, (long long)pool->num_pages, pool->page_bytes);
        return FD_EINVAL;
    }
    pool->map_bytes = (size_t)pool->num_pages * pool->page_bytes;
    void *mem = mmap(nullptr, pool->map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return set_error("mmap of %zu bytes failed", pool->map_bytes), FD_ENOMEM;
    madvise(mem, pool->map_bytes, MADV_HUGEPAGE);
    pool->base = static_cast<uint8_t *>(mem);
    // Pre-fault: the team's threads touch the pages first.
    const int64_t num_pages = pool->num_pages;
    const size_t page_bytes = pool->page_bytes;
    uint8_t *base = pool->base;
    {
        CallerPin pin(pool->team);
        const Team &team = pool->team;
#pragma omp parallel num_threads(team.num_threads)
        {
            if (omp_get_thread_num() > 0) pin_worker(team, omp_get_thread_num());
#pragma omp for schedule(static)
            for (int64_t p = 0; p < num_pages; ++p) memset(base + (size_t)p * page_bytes, 0, page_bytes);
        }
    }
    pool->free_pages.resize((size_t)num_pages);
    for (int64_t i = 0; i < num_pages; ++i) pool->free_pages[(size_t)i] = (int32_t)(num_pages - 1 - i);
    *out = owned.release();
    return FD_OK;
}

void pool_destroy(fd_pool *pool) {
    if (pool->base) munmap(pool->base, pool->map_bytes);
    delete pool;
}

int32_t pool_seq_allocate(fd_pool &pool, int64_t seq_id) {
    if (pool.seqs.count(seq_id)) return set_error("sequence %lld is already allocated", (long long)seq_id), FD_EEXIST;
    SeqState &s = pool.seqs[seq_id];
    s.pages.resize((size_t)pool.num_layers);
    s.lens.assign((size_t)pool.num_layers, 0);
    return FD_OK;
}

int32_t pool_seq_free(fd_pool &pool, int64_t seq_id) {
    auto it = pool.seqs.find(seq_id);
    if (it == pool.seqs.end()) return set_error("unknown sequence %lld", (long long)seq_id), FD_ENOENT;
    for (const auto &layer_pages : it->second.pages)
        pool.free_pages.insert(pool.free_pages.end(), layer_pages.rbegin(), layer_pages.rend());
    pool.seqs.erase(it);
    return FD_OK;
}

int32_t pool_find(fd_pool &pool, int64_t seq_id, int32_t layer, SeqState **out) {
    if (layer < 0 || layer >= pool.num_layers)
        return set_error("layer %d out of range [0, %d)", layer, pool.num_layers), FD_EINVAL;
    auto it = pool.seqs.find(seq_id);
    if (it == pool.seqs.end()) return set_error("unknown sequence %lld", (long long)seq_id), FD_ENOENT;
    *out = &it->second;
    return FD_OK;
}

static inline void copy_elem(void *dst, size_t di, int32_t ddt, const void *src, size_t si, int32_t sdt) {
    if (ddt == sdt) {
        if (ddt == FD_F32) static_cast<float *>(dst)[di] = static_cast<const float *>(src)[si];
        else static_cast<uint16_t *>(dst)[di] = static_cast<const uint16_t *>(src)[si];
    } else {
        store_scalar(dst, di, ddt, load_scalar(src, si, sdt));
    }
}

// The token's K and V rows of one head, stored as they come (same dtype): typed copies with the strides
// found once. A bf16 K pair (two head dims of the token) is adjacent in the page (k_hi == 1): one 32-bit store;
// a K tile held by rows takes the whole row at once. A bf16 V pair row is written as 32-bit words (the token and
// its pair partner): an even token sets the partner's half to zero (it is not written yet, and the kernels mask
// it), an odd one keeps it. The copy took 2.3-2.6% of 256x512's samples, mostly waiting on the caller's rows
// (now prefetched: ChunkTask::token_src_k) and then on 192 narrow stores per head (docs/benchmarks.md, "Session 14").
template <class T>
static void write_token_same(uint8_t *kb, uint8_t *vb, const T *k, const T *v, size_t k0, size_t k_step, size_t k_hi,
                             int D, int P, int dt, int slot, int v_tile) {
    T *kt = reinterpret_cast<T *>(kb) + k0;
    if (sizeof(T) == 2 && k_hi == 1 && k_step == 2) {
        memcpy(kt, k, sizeof(T) * (size_t)D);
    } else if (sizeof(T) == 2 && k_hi == 1) {
        for (int r = 0; r < D / 2; ++r) memcpy(kt + (size_t)r * k_step, k + 2 * r, 4);
    } else {
        for (int r = 0; r < D / 2; ++r) {
            kt[(size_t)r * k_step] = k[2 * r];
            kt[(size_t)r * k_step + k_hi] = k[2 * r + 1];
        }
    }
    for (int d0 = 0; d0 < D; d0 += v_tile) {
        const size_t v0 = v_index(dt, slot, d0, D, P), v_stride = d0 + 1 < D ? v_index(dt, slot, d0 + 1, D, P) - v0 : 1;
        T *vt = reinterpret_cast<T *>(vb) + v0;
        const int d1 = d0 + v_tile < D ? d0 + v_tile : D;
        if (sizeof(T) == 2 && v_stride == 2) {   // bf16 pairs: the word of tokens slot & ~1 and slot | 1
            uint32_t *word = reinterpret_cast<uint32_t *>(vt - (slot & 1));
            const uint16_t *src = reinterpret_cast<const uint16_t *>(v);
            if (slot & 1) {
                for (int d = d0; d < d1; ++d) word[d - d0] = (word[d - d0] & 0xFFFFu) | (uint32_t)src[d] << 16;
            } else {
                for (int d = d0; d < d1; ++d) word[d - d0] = src[d];
            }
            continue;
        }
        for (int d = d0; d < d1; ++d) vt[(size_t)(d - d0) * v_stride] = v[d];
    }
}

void pool_write_token(const fd_pool &pool, const int32_t *pages, int64_t pos, int head,
                      const void *k, const void *v, int32_t src_dtype, int page_tokens) {
    const int P = pool.page_size, D = pool.head_dim;
    uint8_t *page = pool.page_ptr(pages[pos / P]);
    const int slot = (int)(pos % P);
    const int h0 = head < 0 ? 0 : head, h1 = head < 0 ? pool.num_kv_heads : head + 1;
    // The token's places, from the layout once: K dim d at k0 + (d / 2) * k_step + (d % 2) * k_hi; V dims
    // run with a fixed stride inside each V tile (a whole row unless the blocks are tiled bf16).
    const int dt = pool.kv_dtype;
    const size_t k0 = k_index_at(dt, 0, slot, D, P, page_tokens);
    const size_t k_step = k_index_at(dt, 2, slot, D, P, page_tokens) - k0;
    const size_t k_hi = k_index_at(dt, 1, slot, D, P, page_tokens) - k0;
    const int v_tile = dt == kDtypeBf16 ? kVTileDims : D;
    for (int h = h0; h < h1; ++h) {
        uint8_t *kb = page + pool.k_offset(h), *vb = page + pool.v_offset(h);
        const size_t src = (size_t)h * D;
        if (src_dtype == dt && dt == FD_F32) {
            write_token_same(kb, vb, static_cast<const float *>(k) + src, static_cast<const float *>(v) + src, k0, k_step,
                             k_hi, D, P, dt, slot, v_tile);
            continue;
        }
        if (src_dtype == dt) {
            write_token_same(kb, vb, static_cast<const uint16_t *>(k) + src, static_cast<const uint16_t *>(v) + src, k0,
                             k_step, k_hi, D, P, dt, slot, v_tile);
            continue;
        }
        for (int d = 0; d < D; ++d) copy_elem(kb, k0 + (size_t)(d / 2) * k_step + (d % 2) * k_hi, dt, k, src + d, src_dtype);
        for (int d0 = 0; d0 < D; d0 += v_tile) {
            const size_t v0 = v_index(dt, slot, d0, D, P), v_stride = d0 + 1 < D ? v_index(dt, slot, d0 + 1, D, P) - v0 : 1;
            const int d1 = d0 + v_tile < D ? d0 + v_tile : D;
            for (int d = d0; d < d1; ++d) copy_elem(vb, v0 + (size_t)(d - d0) * v_stride, dt, v, src + d, src_dtype);
        }
    }
}

void pool_complete_k_tile(const fd_pool &pool, uint8_t *page, int head, int before, int after) {
    const int P = pool.page_size, D = pool.head_dim, dt = pool.kv_dtype;
    if (before < 1 || !k_tile_by_rows(dt, before - 1, P, before) || k_tile_by_rows(dt, before - 1, P, after)) return;
    const int t0 = (before - 1) / kKTileTokens * kKTileTokens, num_rows = before - t0;
    uint16_t rows[kKTileTokens * kMaxHeadDim];
    const int h0 = head < 0 ? 0 : head, h1 = head < 0 ? pool.num_kv_heads : head + 1;
    for (int h = h0; h < h1; ++h) {
        uint16_t *kb = reinterpret_cast<uint16_t *>(page + pool.k_offset(h));
        memcpy(rows, kb + (size_t)t0 * D, sizeof(uint16_t) * (size_t)num_rows * D);
        for (int r = 0; r < num_rows; ++r)
            for (int d = 0; d < D; d += 2)   // a pair of head dims is adjacent in both layouts
                memcpy(kb + k_index(dt, d, t0 + r, D, P), rows + (size_t)r * D + d, 2 * sizeof(uint16_t));
    }
}

void pool_write_next_token(const fd_pool &pool, const int32_t *pages, int64_t pos, int head,
                           const void *k, const void *v, int32_t src_dtype) {
    const int slot = (int)(pos % pool.page_size);
    pool_complete_k_tile(pool, pool.page_ptr(pages[pos / pool.page_size]), head, slot, slot + 1);
    pool_write_token(pool, pages, pos, head, k, v, src_dtype, slot + 1);
}

int32_t pool_append(fd_pool &pool, int64_t seq_id, int32_t layer, int64_t num_tokens, const void *k,
                    const void *v, int32_t src_dtype) {
    if (!valid_dtype(src_dtype)) return set_error("unknown source dtype code %d", src_dtype), FD_EINVAL;
    if (num_tokens < 0 || num_tokens > INT32_MAX) return set_error("bad token count %lld", (long long)num_tokens), FD_EINVAL;
    if (layer < -1) return set_error("layer %d out of range [0, %d) (or -1: every layer)", layer, pool.num_layers), FD_EINVAL;
    SeqState *s = nullptr;
    const int32_t l0 = layer < 0 ? 0 : layer, l1 = layer < 0 ? pool.num_layers : layer + 1;
    if (int32_t st = pool_find(pool, seq_id, l0, &s)) return st;
    if (num_tokens == 0) return FD_OK;
    int64_t needed = 0;
    for (int32_t l = l0; l < l1; ++l)
        needed += pool.pages_for(s->lens[l] + num_tokens) - (int64_t)s->pages[l].size();
    if (needed > (int64_t)pool.free_pages.size())
        return set_error("KV pool full: append of %lld tokens needs %lld pages, %zu free", (long long)num_tokens,
                         (long long)needed, pool.free_pages.size()), FD_EFULL;
    // Plan the write units and grow every layer's page list first (may allocate, so may fail with the pool as it
    // was), then take the pages (cannot fail).
    std::vector<int64_t> unit_layer, unit_page;
    for (int32_t l = l0; l < l1; ++l) {
        for (int64_t p = s->lens[l] / pool.page_size; p < pool.pages_for(s->lens[l] + num_tokens); ++p) {
            unit_layer.push_back(l);
            unit_page.push_back(p);
        }
        s->pages[l].reserve((size_t)pool.pages_for(s->lens[l] + num_tokens));
    }
    for (int32_t l = l0; l < l1; ++l) {
        const int64_t want = pool.pages_for(s->lens[l] + num_tokens);
        while ((int64_t)s->pages[l].size() < want) {
            s->pages[l].push_back(pool.free_pages.back());
            pool.free_pages.pop_back();
        }
    }
    const size_t token_elems = (size_t)pool.num_kv_heads * pool.head_dim, es = dtype_size(src_dtype);
    const int64_t num_units = (int64_t)unit_layer.size(), P = pool.page_size;
    const fd_pool &cpool = pool;
    const Team &team = pool.team;
    CallerPin pin(team);
#pragma omp parallel num_threads(team.num_threads)
    {
        if (omp_get_thread_num() > 0) pin_worker(team, omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < num_units; ++u) {
            const int32_t l = (int32_t)unit_layer[(size_t)u];
            const int64_t start = s->lens[l], page = unit_page[(size_t)u];
            const int64_t pos0 = page * P > start ? page * P : start;
            const int64_t pos1 = (page + 1) * P < start + num_tokens ? (page + 1) * P : start + num_tokens;
            const size_t layer_base = (size_t)(l - l0) * (size_t)num_tokens * token_elems;
            // The page's tokens before and after: a K tile held by rows that this append fills is first
            // rewritten into pairs, and every token goes where the page's final count puts it.
            const int before = (int)(pos0 - page * P), after = (int)(pos1 - page * P);
            pool_complete_k_tile(cpool, cpool.page_ptr(s->pages[l][(size_t)page]), -1, before, after);
            for (int64_t pos = pos0; pos < pos1; ++pos) {
                const size_t off = (layer_base + (size_t)(pos - start) * token_elems) * es;
                pool_write_token(cpool, s->pages[l].data(), pos, -1, static_cast<const uint8_t *>(k) + off,
                                 static_cast<const uint8_t *>(v) + off, src_dtype, after);
            }
        }
    }
    for (int32_t l = l0; l < l1; ++l) s->lens[l] += num_tokens;
    return FD_OK;
}

int32_t pool_read(fd_pool &pool, int64_t seq_id, int32_t layer, int64_t num_tokens, float *k_out, float *v_out) {
    SeqState *s = nullptr;
    if (int32_t st = pool_find(pool, seq_id, layer, &s)) return st;
    if (num_tokens != s->lens[layer])
        return set_error("read buffer holds %lld tokens, sequence has %lld", (long long)num_tokens,
                         (long long)s->lens[layer]), FD_EINVAL;
    const int P = pool.page_size, D = pool.head_dim, H = pool.num_kv_heads;
    for (int64_t t = 0; t < num_tokens; ++t) {
        const uint8_t *page = pool.page_ptr(s->pages[layer][(size_t)(t / P)]);
        const int slot = (int)(t % P);
        const int page_tokens = (int)(num_tokens - t / P * P < P ? num_tokens - t / P * P : P);
        for (int h = 0; h < H; ++h) {
            const uint8_t *kb = page + pool.k_offset(h), *vb = page + pool.v_offset(h);
            float *ko = k_out + ((size_t)t * H + h) * D, *vo = v_out + ((size_t)t * H + h) * D;
            for (int d = 0; d < D; ++d) {
                ko[d] = load_scalar(kb, k_index_at(pool.kv_dtype, d, slot, D, P, page_tokens), pool.kv_dtype);
                vo[d] = load_scalar(vb, v_index(pool.kv_dtype, slot, d, D, P), pool.kv_dtype);
            }
        }
    }
    return FD_OK;
}

}  // namespace fdn
