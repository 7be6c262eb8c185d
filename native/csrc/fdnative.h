/* fastdecode native attention library: the plain C ABI.
 *
 * Conventions (ggml-style): an opaque context with create/destroy, the caller owns every buffer it
 * passes, every call returns an fd_status, and on failure fd_last_error() returns a message for the
 * calling thread. No C++ exception and no exit() crosses this boundary. Only the symbols below are
 * exported (the library is built with -fvisibility=hidden).
 */
#ifndef FASTDECODE_FDNATIVE_H
#define FASTDECODE_FDNATIVE_H

#include <stdint.h>

#define FD_ABI_VERSION 5

#ifdef __cplusplus
extern "C" {
#endif

#define FD_API __attribute__((visibility("default")))

typedef enum fd_status {
    FD_OK = 0,
    FD_EINVAL = 1,     /* bad argument (shape, dtype, layer, duplicate id in a batch, ...) */
    FD_ENOMEM = 2,     /* the operating system refused memory */
    FD_EEXIST = 3,     /* sequence id already allocated */
    FD_ENOENT = 4,     /* unknown sequence id */
    FD_EFULL = 5,      /* the pool has too few free pages; nothing was changed */
    FD_EINTERNAL = 6   /* a bug: an unexpected C++ exception was caught at the boundary */
} fd_status;

typedef enum fd_dtype { FD_F32 = 0, FD_F16 = 1, FD_BF16 = 2 } fd_dtype;

/* ISA paths, in increasing preference. AVX512_BF16 is AVX512 plus bf16 dot products for q.K when
 * both q and the KV are bf16; AMX does those (and P.V when the output is bf16 too) as tile products. */
typedef enum fd_isa {
    FD_ISA_GENERIC = 0, FD_ISA_AVX2 = 1, FD_ISA_AVX512 = 2, FD_ISA_AVX512_BF16 = 3, FD_ISA_AMX = 4, FD_ISA_COUNT = 5
} fd_isa;

typedef struct fd_pool fd_pool;

typedef struct fd_pool_config {
    int32_t num_layers;
    int32_t num_kv_heads;
    int32_t head_dim;          /* multiple of 16, at most 256 */
    int32_t kv_dtype;          /* fd_dtype */
    int32_t page_size;         /* tokens per page, multiple of 16, at most 256 */
    int32_t chunk_pages;       /* pages per attention work item (the data-fixed split) */
    int64_t capacity_bytes;    /* rounded down to whole pages */
    int32_t num_threads;       /* >= 1 */
    int32_t num_cpus;          /* length of cpu_list, 0 = no pinning */
    const int32_t *cpu_list;   /* thread i is pinned to cpu_list[i % num_cpus] */
    int32_t isa;               /* fd_isa, or -1 for the best the build and CPU support */
    int32_t prefetch_far;      /* 1: the attention's second prefetch level (next-but-one block into L2), 0: off,
                                  -1: on where it pays (Intel cores: see fd_prefetch_far_default) */
} fd_pool_config;

typedef struct fd_pool_info {
    int64_t num_total_pages;
    int64_t num_free_pages;
    int64_t page_bytes;        /* K and V of page_size tokens, all KV heads, one layer */
    int64_t num_sequences;
    int32_t isa;
    int32_t num_threads;
    int32_t prefetch_far;
} fd_pool_info;

FD_API int32_t fd_abi_version(void);
FD_API const char *fd_last_error(void);
FD_API const char *fd_isa_name(int32_t isa);
/* 1 when the path was compiled into this library and the running CPU (and OS) support it. */
FD_API int32_t fd_isa_supported(int32_t isa);
/* The default path: the most preferred supported one, except AVX512_BF16 where its dot product runs slowly
 * (fd_bf16_dot_cost above 2). */
FD_API int32_t fd_isa_best(void);
/* Time of one zmm vdpbf16ps over one zmm FMA at full throughput on this CPU, measured once; 0 where the
 * AVX512_BF16 path is not available. */
FD_API double fd_bf16_dot_cost(void);
/* 1 where a pool's prefetch_far = -1 turns the second prefetch level on (an Intel CPU), else 0. */
FD_API int32_t fd_prefetch_far_default(void);

FD_API int32_t fd_pool_create(const fd_pool_config *config, fd_pool **out_pool);
FD_API int32_t fd_pool_destroy(fd_pool *pool);
FD_API int32_t fd_pool_get_info(fd_pool *pool, fd_pool_info *out_info);
FD_API int32_t fd_pool_can_allocate_tokens(fd_pool *pool, int64_t num_tokens_per_layer, int32_t *out_ok);

FD_API int32_t fd_seq_allocate(fd_pool *pool, int64_t seq_id);
FD_API int32_t fd_seq_free(fd_pool *pool, int64_t seq_id);
FD_API int32_t fd_seq_len(fd_pool *pool, int64_t seq_id, int32_t layer, int64_t *out_len);

/* Appends num_tokens tokens. layer >= 0: k, v are [T, Hkv, D]; layer == -1: [L, T, Hkv, D] for all
 * layers at once. Either every layer gets its tokens or (FD_EFULL) nothing changes. */
FD_API int32_t fd_append(fd_pool *pool, int64_t seq_id, int32_t layer, int64_t num_tokens,
                         const void *k, const void *v, int32_t src_dtype);

/* Copies a sequence's cache at one layer, converted to float32, into k_out, v_out [T, Hkv, D]
 * where T = max_tokens must equal the sequence length at that layer. */
FD_API int32_t fd_read(fd_pool *pool, int64_t seq_id, int32_t layer, int64_t max_tokens,
                       float *k_out, float *v_out);

/* Fused decode step for one layer and a batch: append k, v [B, Hkv, D] (in_dtype) to each sequence,
 * then attend q [B, Hq, D] (q_dtype) over its whole cache. Writes out [B, Hq, D] (out_dtype) and, if
 * lse is not NULL, lse [B, Hq] = log(sum(exp(q.k / sqrt(D)))). If the pool lacks pages for the batch,
 * FD_EFULL and nothing is appended for any sequence. */
FD_API int32_t fd_attend(fd_pool *pool, int32_t layer, int64_t batch, const int64_t *seq_ids,
                         int32_t num_q_heads, const void *q, int32_t q_dtype,
                         const void *k, const void *v, int32_t in_dtype,
                         void *out, int32_t out_dtype, float *lse);

/* A read-bandwidth probe (STREAM-like): a buffer mapped with transparent huge pages and first
 * touched by the threads that read it. */
FD_API int32_t fd_buffer_create(int64_t num_bytes, int32_t num_threads, const int32_t *cpu_list,
                                int32_t num_cpus, void **out_ptr);
FD_API int32_t fd_buffer_destroy(void *ptr, int64_t num_bytes);
/* Reads the buffer with every thread (vectorised, several accumulators) num_runs times; writes the
 * best rate in GB/s (1e9 bytes/s). */
FD_API int32_t fd_read_bandwidth(const void *ptr, int64_t num_bytes, int32_t num_threads,
                                 const int32_t *cpu_list, int32_t num_cpus, int32_t isa,
                                 int32_t num_runs, double *out_gbps);
/* The same read over a pool's whole memory (every page, used or free) with the pool's threads and ISA path:
 * what that memory delivers, wherever it landed (on some hosts one region reads slower than another). */
FD_API int32_t fd_pool_read_bandwidth(fd_pool *pool, int32_t num_runs, double *out_gbps);

#ifdef __cplusplus
}
#endif
#endif
