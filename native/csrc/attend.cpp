// The fused decode step for one layer and a batch: append each sequence's new k, v, then attend.
//
// Work is split by the data only: each sequence is cut into chunks of chunk_pages pages (the last one
// takes the remainder, from half a chunk to one and a half); every chunk
// (all KV heads, pages read front to back) is one work item, handed out in order over the team,
// producing partial softmax states; the thread that completes a sequence's last chunk merges its chunks
// in chunk order (a sequence of one chunk is finished at once by the thread that ran it). The thread
// count therefore never changes the arithmetic: 1 and N threads give bitwise-equal outputs.
#include <math.h>
#include <omp.h>

#include <algorithm>
#include <atomic>

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

// The new token of one sequence, written one KV head at a time by the chunk kernel (ChunkTask::write_token).
struct TokenWrite {
    const fd_pool *pool;
    const int32_t *pages;   // the sequence's page table
    int64_t pos;
    const uint8_t *k, *v;
    int32_t dtype;
};

static void write_token_head(const void *ctx, int head) {
    const TokenWrite &w = *static_cast<const TokenWrite *>(ctx);
    pool_write_next_token(*w.pool, w.pages, w.pos, head, w.k, w.v, w.dtype);
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
    sc.seq_first_item.clear();
    for (int64_t b = 0; b < batch; ++b) {
        SeqState &s = *sc.seqs[(size_t)b];
        s.pages[layer].reserve((size_t)pool.pages_for(s.lens[layer] + 1));   // the table stays where it is below
        const int32_t *const table = s.pages[layer].data();
        const int64_t n = s.lens[layer] + 1;
        // A remainder under half a chunk joins the last full chunk (a sequence of 513 tokens is one item,
        // not 512 + 1: a nearly empty item costs its set-up, state and merge for almost no KV).
        const int64_t num_chunks = std::max<int64_t>(1, (n + chunk_tokens / 2) / chunk_tokens);
        sc.seq_first_item.push_back((int64_t)sc.items.size());
        for (int64_t c = 0; c < num_chunks; ++c) {
            const int64_t t0 = c * chunk_tokens, t1 = c == num_chunks - 1 ? n : t0 + chunk_tokens;
            sc.items.push_back(WorkItem{(int32_t)b, (int32_t)(t0 / P), (int32_t)pool.pages_for(t1 - t0),
                                        (int32_t)(t1 - t0), c == num_chunks - 1, table});
        }
    }
    sc.seq_first_item.push_back((int64_t)sc.items.size());
    // A single-chunk sequence is finished by the kernel that runs its item, head by head, from that thread's own
    // state slot (still in its cache). A sequence of more chunks is merged by the thread that completes its last
    // one, in chunk order whoever that is, while their states are still cached: merged after all items, 64x2048's
    // states had left the caches and the merge took 2% of its time (docs/benchmarks.md, "Session 14").
    sc.chunks_left.resize((size_t)batch);
    for (int64_t b = 0; b < batch; ++b)
        sc.chunks_left[(size_t)b] = (int32_t)(sc.seq_first_item[(size_t)b + 1] - sc.seq_first_item[(size_t)b]);
    const size_t num_items = sc.items.size(), row_floats = (size_t)num_q_heads * D;
    constexpr size_t kLineFloats = 64 / sizeof(float);
    const size_t rows_padded = ((size_t)num_q_heads + kLineFloats - 1) / kLineFloats * kLineFloats;
    const size_t state_floats = row_floats + 2 * rows_padded;   // row_floats: D is a multiple of 16
    // One state per work item (the items of merged sequences use theirs), then one per thread.
    const size_t num_states = num_items + (size_t)pool.team.num_threads;
    if (sc.state.size() < num_states * state_floats + kLineFloats) sc.state.resize(num_states * state_floats + kLineFloats);
    if (sc.q.size() < (size_t)batch * row_floats) sc.q.resize((size_t)batch * row_floats);
    for (int64_t b = 0; b < batch; ++b) {
        SeqState &s = *sc.seqs[(size_t)b];
        if ((int64_t)s.pages[layer].size() < pool.pages_for(s.lens[layer] + 1)) {
            s.pages[layer].push_back(pool.free_pages.back());
            pool.free_pages.pop_back();
        }
        s.lens[layer] += 1;
    }

    const size_t token_bytes = (size_t)H * D * dtype_size(in_dtype), out_row_bytes = row_floats * dtype_size(out_dtype);
    const float scale = 1.0f / sqrtf((float)D);
    const fd_pool &cpool = pool;
    const KernelTable &kt = *pool.kernels;
    const bool use_bf16_q = kt.chunk_bf16_q && q_dtype == FD_BF16 && pool.kv_dtype == FD_BF16;
    // All-bf16 calls (the output is rounded to bf16 anyway) may take P.V in bf16 as well.
    void (*const chunk_bf16)(const ChunkTask *) =
        kt.chunk_bf16_qo && out_dtype == FD_BF16 ? kt.chunk_bf16_qo : kt.chunk_bf16_q;
    float *const state = sc.state.data() + (kLineFloats - reinterpret_cast<uintptr_t>(sc.state.data()) / sizeof(float) % kLineFloats) % kLineFloats;
    // Sequence b's output rows r0 .. r0 + num_rows from its num_chunks partial states, stored consecutively from
    // state_b (each row is merged on its own: any split of the rows gives the same output).
    auto merge = [&](int64_t b, const float *state_b, int32_t num_chunks, int r0, int num_rows) {
        MergeTask task;
        task.acc = state_b + (size_t)r0 * D;
        task.m = state_b + row_floats + r0;
        task.l = state_b + row_floats + rows_padded + r0;
        task.chunk_stride = state_floats;
        task.num_chunks = num_chunks;
        task.num_rows = num_rows;
        task.head_dim = D;
        task.out = static_cast<uint8_t *>(out) + (size_t)b * out_row_bytes + (size_t)r0 * D * dtype_size(out_dtype);
        task.out_dtype = out_dtype;
        task.lse = lse ? lse + (size_t)b * num_q_heads + r0 : nullptr;
        kt.merge(&task);
    };
    // A single-chunk sequence is finished KV head by KV head by the chunk kernel (ChunkTask::finish_head).
    struct Finish {
        const decltype(merge) *merge_rows;
        int64_t b;
        const float *state_b;
        int group;
    };
    auto finish_head = [](const void *ctx, int head) {
        const Finish &f = *static_cast<const Finish *>(ctx);
        (*f.merge_rows)(f.b, f.state_b, 1, head * f.group, f.group);
    };
    std::atomic<size_t> next_item{0};
    const Team &team = pool.team;
    CallerPin pin(team);
#pragma omp parallel num_threads(team.num_threads)
    {
        if (omp_get_thread_num() > 0) pin_worker(team, omp_get_thread_num());
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (use_bf16_q ? 0 : batch); ++b) {
            float *qf = sc.q.data() + (size_t)b * row_floats;
            for (size_t i = 0; i < row_floats; ++i) qf[i] = load_scalar(q, (size_t)b * row_floats + i, q_dtype) * scale;
        }
        // Items are handed out one at a time, in order; a thread claims its next item before it runs the
        // current one, so the kernel's prefetch runs on into the next item's first page.
        size_t i = next_item.fetch_add(1, std::memory_order_relaxed);
        while (i < num_items) {
            const size_t i_next = next_item.fetch_add(1, std::memory_order_relaxed);
            const WorkItem &it = sc.items[i];
            const bool is_single = it.is_last && it.first_page == 0;
            float *const item_state = state + (is_single ? num_items + (size_t)omp_get_thread_num() : i) * state_floats;
            const size_t off = (size_t)it.batch_index * token_bytes;
            // The last chunk ends at the new token.
            const TokenWrite token{&cpool, it.seq_pages, (int64_t)it.first_page * P + it.num_tokens - 1,
                                   static_cast<const uint8_t *>(k) + off, static_cast<const uint8_t *>(v) + off, in_dtype};
            ChunkTask task;
            const Finish finish{&merge, it.batch_index, item_state, G};
            task.finish_head = is_single ? +finish_head : nullptr;
            task.finish_ctx = &finish;
            task.write_token = it.is_last ? write_token_head : nullptr;
            task.write_ctx = &token;
            if (it.is_last) {
                task.token_src_k = token.k;
                task.token_src_v = token.v;
                task.token_src_bytes = token_bytes;
            }
            task.base = cpool.base;
            task.pages = it.seq_pages + it.first_page;
            task.page_bytes = cpool.page_bytes;
            task.block_bytes = cpool.block_bytes;
            task.num_pages = it.num_pages;
            if (i_next < num_items) {
                const WorkItem &next = sc.items[i_next];
                task.next_page = cpool.page_ptr(next.seq_pages[next.first_page]);
            }
            task.num_tokens = it.num_tokens;
            task.prefetch_far = cpool.prefetch_far;
            task.page_size = P;
            task.head_dim = D;
            task.num_kv_heads = H;
            task.group = G;
            task.q = sc.q.data() + (size_t)it.batch_index * row_floats;
            task.q_bf16 = use_bf16_q ? static_cast<const uint16_t *>(q) + (size_t)it.batch_index * row_floats : nullptr;
            task.scale = scale;
            task.acc = item_state;
            task.m = task.acc + row_floats;
            task.l = task.m + rows_padded;
            if (use_bf16_q) chunk_bf16(&task);
            else kt.chunk[cpool.kv_dtype](&task);
            // acq_rel: the thread that takes the count to zero sees every other chunk's state
            if (!is_single && __atomic_sub_fetch(&sc.chunks_left[(size_t)it.batch_index], 1, __ATOMIC_ACQ_REL) == 0) {
                const int64_t first = sc.seq_first_item[(size_t)it.batch_index];
                merge(it.batch_index, state + (size_t)first * state_floats,
                      (int32_t)(sc.seq_first_item[(size_t)it.batch_index + 1] - first), 0, num_q_heads);
            }
            i = i_next;
        }
    }
    return FD_OK;
}

}  // namespace fdn
