// The exported C ABI: argument checks, the per-thread last error, ISA dispatch, and the boundary
// that stops every C++ exception.
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <new>

#include "pool.h"

namespace fdn {

static thread_local char t_last_error[512];

void set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_last_error, sizeof(t_last_error), fmt, ap);
    va_end(ap);
}

#if defined(__x86_64__) || defined(__i386__)
static bool cpu_has_f16c() {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}
#endif

#ifdef FD_HAVE_AVX512
static bool cpu_has_avx512() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && cpu_has_f16c();
}
#endif

#ifdef FD_HAVE_AMX
// AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), the tile state enabled in XCR0 (bits 17, 18), and
// this process's permission to use it (Linux: arch_prctl ARCH_REQ_XCOMP_PERM; process-wide, asked once).
static bool cpu_has_amx() {
    static const bool has = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;
        if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return false;
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo & (3u << 17)) != (3u << 17)) return false;
        constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return has;
}
#endif

static const KernelTable *kernels_for(int32_t isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#endif
    switch (isa) {
        case FD_ISA_GENERIC: return kernels_generic();
#ifdef FD_HAVE_AVX2
        case FD_ISA_AVX2:
            if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c()) return kernels_avx2();
            return nullptr;
#endif
#ifdef FD_HAVE_AVX512
        case FD_ISA_AVX512:
            return cpu_has_avx512() ? kernels_avx512() : nullptr;
        case FD_ISA_AVX512_BF16:
            return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16") ? kernels_avx512_bf16() : nullptr;
#endif
#if defined(FD_HAVE_AVX512) && defined(FD_HAVE_AMX)
        case FD_ISA_AMX:   // its fallback for shapes that do not fit the tiles is the AVX512-BF16 path
            return kernels_for(FD_ISA_AVX512_BF16) && cpu_has_amx() ? kernels_amx() : nullptr;
#endif
        default: return nullptr;
    }
}

// The bf16 dot-product path spends four vdpbf16ps per 64 bytes of bf16 KV where the float32 path spends eight
// FMAs and two widening operations. vdpbf16ps runs at an FMA's rate on some cores (Zen 5) and at a seventh
// of it on others (the H100 host's Xeon: docs/benchmarks.md, issue 3), so the bf16 path is the default only
// where one costs at most twice an FMA; forcing it (isa argument or environment) still works everywhere.
static constexpr double kMaxBf16DotCost = 2.0;

static double bf16_dot_cost() {
#ifdef FD_HAVE_AVX512
    if (kernels_for(FD_ISA_AVX512_BF16)) return bf16_dot_relative_cost();
#endif
    return 0.0;
}

// The second prefetch level pays on Intel cores, where a near-only prefetch is bound by a core's sixteen line-fill
// buffers (H100 host's Xeon: 4-9% faster at 16 threads), and costs 1-3% on the Zen 5 dev VM, whose cores keep
// more in flight (docs/benchmarks.md, "Session 6").
static bool prefetch_far_default() {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    return __get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;   // GenuineIntel
#else
    return false;
#endif
}

static int32_t best_isa() {
    for (int32_t isa = FD_ISA_COUNT - 1; isa > 0; --isa) {
        if (!kernels_for(isa)) continue;
        if (isa == FD_ISA_AVX512_BF16 && bf16_dot_cost() > kMaxBf16DotCost) continue;
        return isa;
    }
    return FD_ISA_GENERIC;
}

template <class F>
static int32_t guarded(F &&body) {
    try {
        return body();
    } catch (const std::bad_alloc &) {
        set_error("out of memory");
        return FD_ENOMEM;
    } catch (const std::exception &e) {
        set_error("internal error: %s", e.what());
        return FD_EINTERNAL;
    } catch (...) {
        set_error("internal error: unknown exception");
        return FD_EINTERNAL;
    }
}

template <class F>
static int32_t with_pool(fd_pool *pool, F &&body) {
    if (!pool) return set_error("null pool"), FD_EINVAL;
    return guarded([&]() -> int32_t {
        std::lock_guard<std::mutex> lock(pool->mutex);
        return body(*pool);
    });
}

static Team make_team(int32_t num_threads, const int32_t *cpu_list, int32_t num_cpus) {
    Team team;
    team.num_threads = num_threads;
    if (cpu_list && num_cpus > 0) team.cpus.assign(cpu_list, cpu_list + num_cpus);
    return team;
}

// Thread tid's share of a buffer of `count` floats: the same split for first touch and for reads.
static void thread_slice(size_t count, int num_threads, int tid, size_t *begin, size_t *end) {
    size_t per = (count + num_threads - 1) / num_threads;
    per = (per + 1023) / 1024 * 1024;
    *begin = std::min(count, per * tid);
    *end = std::min(count, *begin + per);
}

// The best of num_runs reads of num_bytes at ptr by the team's threads (each a contiguous slice), in GB/s.
static double best_read_gbps(const void *ptr, size_t num_bytes, const KernelTable &kernels, const Team &team,
                             int32_t num_runs) {
    const size_t count = num_bytes / sizeof(float);
    const float *data = static_cast<const float *>(ptr);
    double best = 0.0, sink = 0.0;
    CallerPin pin(team);
    for (int run = 0; run < num_runs; ++run) {
        const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(team.num_threads) reduction(+ : sink)
        {
            const int tid = omp_get_thread_num();
            if (tid > 0) pin_worker(team, tid);
            size_t begin, end;
            thread_slice(count, omp_get_num_threads(), tid, &begin, &end);
            sink += kernels.read_sum(data + begin, end - begin);
        }
        const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, (double)(count * sizeof(float)) / seconds / 1e9);
    }
    if (sink == -1.0) set_error("unreachable");   // keeps the reads observable
    return best;
}

}  // namespace fdn

using namespace fdn;

extern "C" {

int32_t fd_abi_version(void) { return FD_ABI_VERSION; }

const char *fd_last_error(void) { return t_last_error; }

const char *fd_isa_name(int32_t isa) {
    static const char *const names[FD_ISA_COUNT] = {"generic", "avx2", "avx512", "avx512_bf16", "amx"};
    return isa >= 0 && isa < FD_ISA_COUNT ? names[isa] : nullptr;
}

int32_t fd_isa_supported(int32_t isa) { return kernels_for(isa) != nullptr; }

int32_t fd_isa_best(void) { return best_isa(); }

double fd_bf16_dot_cost(void) { return bf16_dot_cost(); }

int32_t fd_prefetch_far_default(void) { return prefetch_far_default(); }

int32_t fd_pool_create(const fd_pool_config *config, fd_pool **out_pool) {
    if (!config || !out_pool) return set_error("null argument"), FD_EINVAL;
    return guarded([&]() -> int32_t {
        const int32_t isa = config->isa < 0 ? best_isa() : config->isa;
        const KernelTable *kernels = kernels_for(isa);
        if (!kernels) return set_error("ISA path %d is not available in this build on this CPU", isa), FD_EINVAL;
        fd_pool_config resolved = *config;
        if (resolved.prefetch_far < 0) resolved.prefetch_far = prefetch_far_default();
        return pool_create(resolved, kernels, isa, out_pool);
    });
}

int32_t fd_pool_destroy(fd_pool *pool) {
    if (!pool) return FD_OK;
    return guarded([&]() -> int32_t {
        { std::lock_guard<std::mutex> lock(pool->mutex); }
        pool_destroy(pool);
        return FD_OK;
    });
}

int32_t fd_pool_get_info(fd_pool *pool, fd_pool_info *info) {
    if (!info) return set_error("null argument"), FD_EINVAL;
    return with_pool(pool, [&](fd_pool &p) -> int32_t {
        info->num_total_pages = p.num_pages;
        info->num_free_pages = (int64_t)p.free_pages.size();
        info->page_bytes = (int64_t)p.page_bytes;
        info->num_sequences = (int64_t)p.seqs.size();
        info->isa = p.isa;
        info->num_threads = p.team.num_threads;
        info->prefetch_far = p.prefetch_far;
        return FD_OK;
    });
}

int32_t fd_pool_can_allocate_tokens(fd_pool *pool, int64_t num_tokens_per_layer, int32_t *out_ok) {
    if (!out_ok || num_tokens_per_layer < 0) return set_error("bad argument"), FD_EINVAL;
    return with_pool(pool, [&](fd_pool &p) -> int32_t {
        // an append takes at most INT32_MAX tokens (and a larger count would overflow the page arithmetic)
        *out_ok = num_tokens_per_layer <= INT32_MAX &&
                  p.pages_for(num_tokens_per_layer) * p.num_layers <= (int64_t)p.free_pages.size();
        return FD_OK;
    });
}

int32_t fd_seq_allocate(fd_pool *pool, int64_t seq_id) {
    return with_pool(pool, [&](fd_pool &p) { return pool_seq_allocate(p, seq_id); });
}

int32_t fd_seq_free(fd_pool *pool, int64_t seq_id) {
    return with_pool(pool, [&](fd_pool &p) { return pool_seq_free(p, seq_id); });
}

int32_t fd_seq_len(fd_pool *pool, int64_t seq_id, int32_t layer, int64_t *out_len) {
    if (!out_len) return set_error("null argument"), FD_EINVAL;
    return with_pool(pool, [&](fd_pool &p) -> int32_t {
        SeqState *s = nullptr;
        if (int32_t st = pool_find(p, seq_id, layer, &s)) return st;
        *out_len = s->lens[(size_t)layer];
        return FD_OK;
    });
}

int32_t fd_append(fd_pool *pool, int64_t seq_id, int32_t layer, int64_t num_tokens, const void *k, const void *v,
                  int32_t src_dtype) {
    if (num_tokens > 0 && (!k || !v)) return set_error("null k or v"), FD_EINVAL;
    return with_pool(pool, [&](fd_pool &p) { return pool_append(p, seq_id, layer, num_tokens, k, v, src_dtype); });
}

int32_t fd_read(fd_pool *pool, int64_t seq_id, int32_t layer, int64_t max_tokens, float *k_out, float *v_out) {
    if (max_tokens > 0 && (!k_out || !v_out)) return set_error("null output"), FD_EINVAL;
    return with_pool(pool, [&](fd_pool &p) { return pool_read(p, seq_id, layer, max_tokens, k_out, v_out); });
}

int32_t fd_attend(fd_pool *pool, int32_t layer, int64_t batch, const int64_t *seq_ids, int32_t num_q_heads,
                  const void *q, int32_t q_dtype, const void *k, const void *v, int32_t in_dtype, void *out,
                  int32_t out_dtype, float *lse) {
    if (batch > 0 && (!seq_ids || !q || !k || !v || !out)) return set_error("null argument"), FD_EINVAL;
    return with_pool(pool, [&](fd_pool &p) {
        return pool_attend(p, layer, batch, seq_ids, num_q_heads, q, q_dtype, k, v, in_dtype, out, out_dtype, lse);
    });
}

int32_t fd_buffer_create(int64_t num_bytes, int32_t num_threads, const int32_t *cpu_list, int32_t num_cpus,
                         void **out_ptr) {
    if (!out_ptr || num_bytes < 4096) return set_error("buffer must be at least 4096 bytes"), FD_EINVAL;
    if (int32_t st = check_team_args(num_threads, cpu_list, num_cpus)) return st;
    return guarded([&]() -> int32_t {
        void *mem = mmap(nullptr, (size_t)num_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) return set_error("mmap of %lld bytes failed", (long long)num_bytes), FD_ENOMEM;
        madvise(mem, (size_t)num_bytes, MADV_HUGEPAGE);
        const Team team = make_team(num_threads, cpu_list, num_cpus);
        const size_t count = (size_t)num_bytes / sizeof(float);
        float *data = static_cast<float *>(mem);
        CallerPin pin(team);
#pragma omp parallel num_threads(team.num_threads)
        {
            const int tid = omp_get_thread_num();
            if (tid > 0) pin_worker(team, tid);
            size_t begin, end;
            thread_slice(count, omp_get_num_threads(), tid, &begin, &end);
            for (size_t i = begin; i < end; ++i) data[i] = 1.0f;
        }
        *out_ptr = mem;
        return FD_OK;
    });
}

int32_t fd_buffer_destroy(void *ptr, int64_t num_bytes) {
    if (ptr && munmap(ptr, (size_t)num_bytes) != 0) return set_error("munmap failed"), FD_EINVAL;
    return FD_OK;
}

int32_t fd_read_bandwidth(const void *ptr, int64_t num_bytes, int32_t num_threads, const int32_t *cpu_list,
                          int32_t num_cpus, int32_t isa, int32_t num_runs, double *out_gbps) {
    if (!ptr || !out_gbps || num_bytes < 4096 || num_runs < 1) return set_error("bad argument"), FD_EINVAL;
    if (int32_t st = check_team_args(num_threads, cpu_list, num_cpus)) return st;
    return guarded([&]() -> int32_t {
        const KernelTable *kernels = kernels_for(isa < 0 ? best_isa() : isa);
        if (!kernels) return set_error("ISA path %d is not available", isa), FD_EINVAL;
        const Team team = make_team(num_threads, cpu_list, num_cpus);
        *out_gbps = best_read_gbps(ptr, (size_t)num_bytes, *kernels, team, num_runs);
        return FD_OK;
    });
}

int32_t fd_pool_read_bandwidth(fd_pool *pool, int32_t num_runs, double *out_gbps) {
    if (!out_gbps || num_runs < 1) return set_error("bad argument"), FD_EINVAL;
    return with_pool(pool, [&](fd_pool &p) -> int32_t {
        *out_gbps = best_read_gbps(p.base, p.map_bytes, *p.kernels, p.team, num_runs);
        return FD_OK;
    });
}

}  // extern "C"
