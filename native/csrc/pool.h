// The paged KV pool: one mapping of fixed-size pages, page tables per (sequence, layer).
//
// A page holds page_size tokens of one layer for all KV heads. Inside a page, for each head h, a K^T
// block [D][P] (head-dim major, so scores for a page come out as vectors over tokens) followed by
// its V block [P][D]; bf16 blocks interleave pairs and are tiled (kernel_api.h: k_index, v_index). A GQA group
// reads one contiguous span per page and KV head, and attention reads each page front to back.
#ifndef FASTDECODE_POOL_H
#define FASTDECODE_POOL_H

#include <stdint.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "fdnative.h"
#include "kernel_api.h"
#include "team.h"

namespace fdn {

struct SeqState {
    std::vector<std::vector<int32_t>> pages;   // [layer] -> page indices
    std::vector<int64_t> lens;                 // [layer] -> tokens
};

// Attention scratch, reused across calls (grown, never shrunk).
struct WorkItem {
    int32_t batch_index, first_page, num_pages, num_tokens;
    int32_t is_last;       // this chunk holds the new token: the chunk kernel writes it (ChunkTask::write_token)
    // The sequence's page table at this layer (room reserved for the new token's page before it is taken), so a
    // thread starting an item reads it and the item alone: through the sequence's state it took three dependent
    // cache misses per item, which the call's KV walk had evicted.
    const int32_t *seq_pages;
};

struct AttendScratch {
    std::vector<WorkItem> items;
    std::vector<int64_t> seq_first_item;     // [b] -> first item; one past the end appended
    std::vector<int32_t> chunks_left;        // [b] -> its items not yet run (the thread that runs the last merges)
    std::vector<float> q;                    // [B][Hq][D] float32, scaled
    // Per work item: its partial state (acc [Hq][D], then m [Hq] and l [Hq], each padded), on 64-byte
    // lines of its own: items run on different cores at once, and a line shared by two of them would
    // move between the cores at every page (the softmax state is rewritten per page and head).
    std::vector<float> state;
    std::vector<SeqState *> seqs;
};

void set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace fdn

struct fd_pool {
    int32_t num_layers = 0, num_kv_heads = 0, head_dim = 0, kv_dtype = 0, page_size = 0, chunk_pages = 0;
    int32_t isa = 0;
    bool prefetch_far = false;
    fdn::Team team;
    const fdn::KernelTable *kernels = nullptr;
    size_t elem_bytes = 0, block_bytes = 0, page_bytes = 0;
    int64_t num_pages = 0;
    uint8_t *base = nullptr;
    size_t map_bytes = 0;
    std::vector<int32_t> free_pages;
    std::unordered_map<int64_t, fdn::SeqState> seqs;
    fdn::AttendScratch scratch;
    std::mutex mutex;

    size_t k_offset(int head) const { return 2 * (size_t)head * block_bytes; }
    size_t v_offset(int head) const { return (2 * (size_t)head + 1) * block_bytes; }
    uint8_t *page_ptr(int32_t page) const { return base + (size_t)page * page_bytes; }
    int64_t pages_for(int64_t num_tokens) const { return (num_tokens + page_size - 1) / page_size; }
};

namespace fdn {

int32_t pool_create(const fd_pool_config &config, const KernelTable *kernels, int32_t isa, fd_pool **out);
void pool_destroy(fd_pool *pool);
int32_t pool_seq_allocate(fd_pool &pool, int64_t seq_id);
int32_t pool_seq_free(fd_pool &pool, int64_t seq_id);
int32_t pool_find(fd_pool &pool, int64_t seq_id, int32_t layer, SeqState **out);
int32_t pool_append(fd_pool &pool, int64_t seq_id, int32_t layer, int64_t num_tokens, const void *k,
                    const void *v, int32_t src_dtype);
int32_t pool_read(fd_pool &pool, int64_t seq_id, int32_t layer, int64_t num_tokens, float *k_out, float *v_out);
// Writes token `pos` of one KV head (or all heads when head < 0) from k, v rows [Hkv][D] of src_dtype, in the
// layout of its page once that holds page_tokens tokens (kernel_api.h: k_index_at).
void pool_write_token(const fd_pool &pool, const int32_t *pages, int64_t pos, int head,
                      const void *k, const void *v, int32_t src_dtype, int page_tokens);
// A page going from `before` to `after` tokens: the K tile held by rows at `before` that is full at `after`
// (if any) is rewritten into pairs, for one KV head or all (head < 0). Before the new tokens are written.
void pool_complete_k_tile(const fd_pool &pool, uint8_t *page, int head, int before, int after);
// The decode step's write: token pos, the page's last, after every earlier one (completes its K tile).
void pool_write_next_token(const fd_pool &pool, const int32_t *pages, int64_t pos, int head,
                           const void *k, const void *v, int32_t src_dtype);
int32_t pool_attend(fd_pool &pool, int32_t layer, int64_t batch, const int64_t *seq_ids, int32_t num_q_heads,
                    const void *q, int32_t q_dtype, const void *k, const void *v, int32_t in_dtype, void *out,
                    int32_t out_dtype, float *lse);

}  // namespace fdn
#endif
