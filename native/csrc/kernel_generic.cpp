// Baseline path: portable C++ over 8-lane arrays (the compiler vectorises it for the baseline ISA).
#include <math.h>

#include "kernel_api.h"

namespace {

struct V {
    struct R { float v[8]; };
    static constexpr int W = 8;
    static constexpr int TV = 2;
    static constexpr int ACC = 4;
    static inline R zero() { R r; for (int i = 0; i < W; ++i) r.v[i] = 0.0f; return r; }
    static inline R set1(float x) { R r; for (int i = 0; i < W; ++i) r.v[i] = x; return r; }
    static inline R load(const float *p) { R r; for (int i = 0; i < W; ++i) r.v[i] = p[i]; return r; }
    static inline void store(float *p, R a) { for (int i = 0; i < W; ++i) p[i] = a.v[i]; }
    static inline R fma(R a, R b, R c) { for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
    static inline R mul(R a, R b) { for (int i = 0; i < W; ++i) a.v[i] *= b.v[i]; return a; }
    static inline R add(R a, R b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
    static inline R sub(R a, R b) { for (int i = 0; i < W; ++i) a.v[i] -= b.v[i]; return a; }
    static inline R max(R a, R b) { for (int i = 0; i < W; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }
    static inline float hmax(R a) { float m = a.v[0]; for (int i = 1; i < W; ++i) m = a.v[i] > m ? a.v[i] : m; return m; }
    static inline float hsum(R a) {
        return ((a.v[0] + a.v[4]) + (a.v[1] + a.v[5])) + ((a.v[2] + a.v[6]) + (a.v[3] + a.v[7]));
    }
    static inline bool any_greater(R a, R b) {
        bool r = false;
        for (int i = 0; i < W; ++i) r |= a.v[i] > b.v[i];
        return r;
    }
    static inline float first(R a) { return a.v[0]; }
    // Lanes from num_kept on (all when num_kept <= 0) set to fill.
    static inline R keep_first(R a, int num_kept, float fill) { for (int i = 0; i < W; ++i) a.v[i] = i < num_kept ? a.v[i] : fill; return a; }
    static inline void hmax4(R x[4]) { for (int g = 0; g < 4; ++g) x[g] = set1(hmax(x[g])); }
    static inline void hsum4(R x[4]) { for (int g = 0; g < 4; ++g) x[g] = set1(hsum(x[g])); }
    static inline R exp(R a) { for (int i = 0; i < W; ++i) a.v[i] = expf(a.v[i]); return a; }
    static inline R load_f16(const uint16_t *p) { R r; for (int i = 0; i < W; ++i) r.v[i] = fdn::f16_to_f32(p[i]); return r; }
    static inline R load_bf16(const uint16_t *p) { R r; for (int i = 0; i < W; ++i) r.v[i] = fdn::bf16_to_f32(p[i]); return r; }
    // 2W bf16 in pairs: lo takes the even elements, hi the odd ones.
    static inline void load_bf16_pair(const uint16_t *p, R &lo, R &hi) {
        for (int i = 0; i < W; ++i) {
            lo.v[i] = fdn::bf16_to_f32(p[2 * i]);
            hi.v[i] = fdn::bf16_to_f32(p[2 * i + 1]);
        }
    }
};

#include "kernel_body.h"

const fdn::KernelTable kTable = make_table(nullptr, nullptr);

}  // namespace

const fdn::KernelTable *fdn::kernels_generic() { return &kTable; }
