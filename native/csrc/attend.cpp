// The fused decode step for one layer and a batch: append each sequence's new k, v, then attend.
//
// Work is split by the data only: each (sequence, KV head) is cut into chunks of chunk_pages pages;
// every chunk is one work item (scheduled dynamically over the team) producing a partial softmax
// state; a second loop merges each (sequence, KV head)'s chunks in chunk order. The thread count
// therefore never changes the arithmetic: 1 and N threads give bitwise-equal outputs.
#include <math.h>
#include <omp.h>

#include <algorithm>

#include "pool.h"

namespace fdn {

static int32_t check_attend_args(fd_pool &pool, int32_t layer, int64_t batch, const int64_t *seq_ids,
                                 int32_t num_q_heads, int32_t q_dtype, int32_t in_dtype, int32_t out_dtype) {
    if (layer < 0 || layer >= pool.num_layers)
        return set_error("layer %d out of range [0, %d)", layer, pool.num_layers), FD_EINVAL;
    if (batch < 0 || batch > INT32_MAX) return set_error("bad batch size %lld", (long long)batch), FD_EINVAL;
    for (int32_t dt : {q_dtype, in_dtype, out_dtype})
        if (dt < FD_F32 || dt > FD_BF16) return set_error("unknown dtype code %d", dt), FD_EINVAL;
    if (num_q_heads < 1 || num_q_heads % pool.num_kv_heads || num_q_heads / pool.num_kv_heads > kMaxGroup)
        return set_error("num_q_heads %d must be a multiple of num_kv_heads %d with a group of at most %d",
                         num_q_heads, pool.num_kv_heads, kMaxGroup), FD_EINVAL;
    std::vector<int64_t> ids(seq_ids, seq_ids + batch);
    std::sort(ids.begin(), ids.end());
    if (std::adjacent_find(ids.begin(), ids.end()) != ids.end())
        return set_error("sequence %lld appears twice in one batch",
                         (long long)*std::adjacent_find(ids.begin(), ids.end())), FD_EINVAL;
    return FD_OK;
}

int32_t pool_attend(fd_pool &pool, int32_t layer, int64_t batch, const int64_t *seq_ids, int32_t num_q_heads,
                    const void *q, int32_t q_dtype, const void *k, const void *v, int32_t in_dtype, void *out,
                    int32_t out_dtype, float *lse) {
    if (int32_t st = check_attend_args(pool, layer, batch, seq_ids, num_q_heads, q_dtype, in_dtype, out_dtype)) return st;
    AttendScratch &sc = pool.scratch;
    sc.seqs.assign((size_t)batch, nullptr);
    int64_t num_new_pages = 0;
    for (int64_t b = 0; b < batch; ++b) {
        if (int32_t st = pool_find(pool, seq_ids[b], layer, &sc.seqs[(size_t)b])) return st;
        const SeqState &s = *sc.seqs[(size_t)b];
        num_new_pages += pool.pages_for(s.lens[layer] + 1) - (int64_t)s.pages[layer].size();
    }
    if (num_new_pages > (int64_t)pool.free_pages.size())
        return set_error("KV pool full: the batch needs %lld new pages, %zu free", (long long)num_new_pages,
                         pool.free_pages.size()), FD_EFULL;

    // Plan the work items (may allocate) before changing any sequence.
    const int H = pool.num_kv_heads, G = num_q_heads / H, D = pool.head_dim, P = pool.page_size;
    const int chunk_tokens = pool.chunk_pages * P;
    sc.items.clear();
    sc.group_first_item.clear();
    for (int64_t b = 0; b < batch; ++b) {
        sc.seqs[(size_t)b]->pages[layer].reserve((size_t)pool.pages_for(sc.seqs[(size_t)b]->lens[layer] + 1));
        const int64_t n = sc.seqs[(size_t)b]->lens[layer] + 1;
        const int64_t num_chunks = (n + chunk_tokens - 1) / chunk_tokens;
        for (int h = 0; h < H; ++h) {
            sc.group_first_item.push_back((int64_t)sc.items.size());
            for (int64_t c = 0; c < num_chunks; ++c) {
                const int64_t t0 = c * chunk_tokens, t1 = std::min<int64_t>(n, t0 + chunk_tokens);
                sc.items.push_back(WorkItem{(int32_t)b, h, (int32_t)(t0 / P), (int32_t)pool.pages_for(t1 - t0),
                                            (int32_t)(t1 - t0), c == num_chunks - 1});
            }
        }
    }
    sc.group_first_item.push_back((int64_t)sc.items.size());
    const size_t num_items = sc.items.size();
    if (sc.acc.size() < num_items * G * D) sc.acc.resize(num_items * G * D);
    if (sc.m.size() < num_items * G) {
        sc.m.resize(num_items * G);
        sc.l.resize(num_items * G);
    }
    for (int64_t b = 0; b < batch; ++b) {
        SeqState &s = *sc.seqs[(size_t)b];
        if ((int64_t)s.pages[layer].size() < pool.pages_for(s.lens[layer] + 1)) {
            s.pages[layer].push_back(pool.free_pages.back());
            pool.free_pages.pop_back();
        }
        s.lens[layer] += 1;
    }

    const size_t q_es = dtype_size(q_dtype), in_es = dtype_size(in_dtype), out_es = dtype_size(out_dtype);
    const size_t token_elems = (size_t)H * D;
    const float scale = 1.0f / sqrtf((float)D);
    const fd_pool &cpool = pool;
    const KernelTable &kt = *pool.kernels;
    const int64_t num_groups = batch * H;
    const Team &team = pool.team;
    CallerPin pin(team);
#pragma omp parallel num_threads(team.num_threads)
    {
        if (omp_get_thread_num() > 0) pin_worker(team, omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
        for (size_t i = 0; i < num_items; ++i) {
            const WorkItem &it = sc.items[i];
            const std::vector<int32_t> &pages = sc.seqs[(size_t)it.batch_index]->pages[layer];
            const int64_t n = sc.seqs[(size_t)it.batch_index]->lens[layer];
            if (it.is_last) {
                const size_t off = (size_t)it.batch_index * token_elems * in_es;
                pool_write_token(cpool, pages, n - 1, it.head, static_cast<const uint8_t *>(k) + off,
                                 static_cast<const uint8_t *>(v) + off, in_dtype);
            }
            ChunkTask task;
            task.base = cpool.base;
            task.pages = pages.data() + it.first_page;
            task.page_bytes = cpool.page_bytes;
            task.k_offset = cpool.k_offset(it.head);
            task.v_offset = cpool.v_offset(it.head);
            task.num_pages = it.num_pages;
            task.num_tokens = it.num_tokens;
            task.page_size = P;
            task.head_dim = D;
            task.group = G;
            task.q = static_cast<const uint8_t *>(q) + ((size_t)it.batch_index * num_q_heads + (size_t)it.head * G) * D * q_es;
            task.q_dtype = q_dtype;
            task.scale = scale;
            task.acc = sc.acc.data() + i * G * D;
            task.m = sc.m.data() + i * G;
            task.l = sc.l.data() + i * G;
            kt.chunk[cpool.kv_dtype](&task);
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t gi = 0; gi < num_groups; ++gi) {
            const int64_t first = sc.group_first_item[(size_t)gi];
            const size_t row = (size_t)(gi / H) * num_q_heads + (size_t)(gi % H) * G;
            MergeTask task;
            task.acc = sc.acc.data() + (size_t)first * G * D;
            task.m = sc.m.data() + (size_t)first * G;
            task.l = sc.l.data() + (size_t)first * G;
            task.num_chunks = (int32_t)(sc.group_first_item[(size_t)gi + 1] - first);
            task.group = G;
            task.head_dim = D;
            task.out = static_cast<uint8_t *>(out) + row * D * out_es;
            task.out_dtype = out_dtype;
            task.lse = lse ? lse + row : nullptr;
            kt.merge(&task);
        }
    }
    return FD_OK;
}

}  // namespace fdn
