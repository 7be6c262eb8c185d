// Vector exp shared by the x86 SIMD units: Cody-Waite range reduction, a degree-6 polynomial
// (relative error ~2e-7 on the reduced range) and an exponent-field scale. Inputs are clamped to
// [-86, 88], so exp(-inf) gives a tiny positive number (callers zero masked lanes themselves).
// Included inside each unit's anonymous namespace after `struct V` declares R, set1, fma, mul.
#define FD_EXP_CONSTANTS                                       \
    static constexpr float kLog2e = 1.44269504088896341f;      \
    static constexpr float kLn2Hi = 0.693359375f;              \
    static constexpr float kLn2Lo = -2.12194440e-4f;           \
    static constexpr float kC6 = 1.0f / 720.0f, kC5 = 1.0f / 120.0f, kC4 = 1.0f / 24.0f, kC3 = 1.0f / 6.0f;
