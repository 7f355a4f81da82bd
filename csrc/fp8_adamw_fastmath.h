// CPU-only fast path of the FP8 AdamW contract (fp8_adamw_math.h): polynomial log2/exp2 that the compiler can
// vectorize (FP32 for quantize's power, float64 for dequantize's root), used only where they PROVABLY give the
// exact contract's result; everything else runs the exact libm path of fp8_adamw_math.h. Not for nvcc: the
// CUDA kernel keeps the exact path.
//
// Why the result is exact. The contract computes P = fp32(exp2_libm(k * log2_libm(t))) (quantize) and
// R = fp32(exp2_libm(log2_libm(y) / k)) (dequantize) and then only monotone FP32 steps (division by a positive
// scale, clamp, fp8_encode; rounding to FP32). Let P* be the float64 value libm returns before that rounding and
// Pa our approximation. If |Pa / P* - 1| <= E, then P* lies in [Pa(1-E), Pa(1+E)], and every monotone pipeline
// maps P* between its images of the two ends: when both ends give the same FP8 code (or the same FP32 root),
// that is the exact one. Otherwise the caller runs the exact path (a "fallback", counted).
//
// Error budget. Guards: t and y positive normal FP32 (|log2| <= 150), k in (1, 64], |z| <= 32 for the power
// (z = k log2 t) and |z| <= 150 / k for the root (z = log2(y) / k); anything else takes the exact path.
// - libm (glibc's log2/exp2 are < 1 ulp; we allow 4 ulp = 2^-50 each): the power's log2 error, scaled by k, is
//   <= |z| 2^-50 <= 32 * 2^-50, the product rounding adds 32 * 2^-53, exp2 turns an absolute error d of z into
//   ln2 * d relative, plus its own 2^-50: < 2^-45. The root: 150 * 2^-50 / k + 150 * 2^-53: < 2^-42.9.
// - ours, power (pow_f32, FP32, 8 lanes): m - 1 exact, s = (m-1)/(m+1) within 2^-22.9; series to s^8/9
//   (truncation < 2^-28.8) with FP32 roundings: l = log2 m within 2^-21.2 relative, |l| <= 1/2, so 2^-22.2
//   absolute; z = k e + k l (k e exact): |dz| <= k 2^-22 + |z| 2^-24. exp: degree-6 Taylor (< 2^-22.5) with
//   FP32 roundings (< 2^-21.4): < 2^-20.8. So < 2^-20.8 + ln2 |dz| relative, plus libm's < 2^-45; the interval
//   also absorbs six FP32 roundings (the exact pipeline's two, our reciprocal of the scale, product, 1 -+ E and
//   the product with it): < 2^-21.4. Total < 2^-20 + k 2^-22.5 + |z| 2^-24.5; pow_bound(k, z) = 2^-18 + k 2^-20
//   + |z| 2^-22 is >= 4x that term by term (measured: the approximation alone uses 8% of it).
// - ours, root: series to s^16/17 (< 2^-49.9), degree 11 (< 2^-46.1), roundings of z <= 150 * 2^-52: < 2^-43.5
//   (measured 2^-46). E_root = kRootE = 2^-36: 50x the sum with libm's.
// tests/unit/test_fp8_adamw_fastpath.py measures the polynomials against libm and checks the whole update bit for
// bit against the torch reference on inputs built to land inside E (so the fallback runs), and that an error
// beyond E is caught. Fallbacks are rare on real states: quantize ~2 E / (FP8 spacing ~2^-4) ~ 2^-12 per
// element, dequantize ~2 E / 2^-24 = 2^-11 per element.
#ifndef MEGAEFF_FP8_ADAMW_FASTMATH_H
#define MEGAEFF_FP8_ADAMW_FASTMATH_H

#include <algorithm>
#include <cmath>

#include "fp8_adamw_math.h"

namespace megaeff_fp8 {
namespace fast {

constexpr double kRootE = 0x1p-36;
constexpr double kMaxZ = 160.0;
constexpr float kMinNormal = 0x1p-126f;
constexpr float kMaxFinite = 0x1.fffffep127f;
constexpr float kInf = __builtin_inff();

#define MEGAEFF_FAST inline __attribute__((always_inline))

MEGAEFF_FAST uint64_t f64_bits(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

MEGAEFF_FAST double bits_f64(uint64_t u) {
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

// 1 / i! and 1 / (2i + 1): the polynomial coefficients (float64 roundings of the exact ones, covered by the budget).
constexpr double inv_factorial(int i) { return i <= 1 ? 1.0 : inv_factorial(i - 1) / i; }
constexpr double inv_odd(int i) { return 1.0 / (2 * i + 1); }

// a * b + c, fused where FMA (one rounding instead of two: only tighter than the budget assumes). Used only in
// the polynomials; the contract's own FP32 operations are never fused.
template <bool FMA>
MEGAEFF_FAST double mad(double a, double b, double c) {
    if (FMA) return __builtin_fma(a, b, c);
    return a * b + c;
}

// log2 of a positive normal FP32 x, in float64. x = 2^e * m with m in [sqrt(1/2), sqrt(2)): subtracting the bits
// of ~sqrt(1/2) before taking the exponent moves the split point there (all 32-bit integer work). The atanh
// series 2s(1 + s^2/3 + s^4/5 + ...), s = (m-1)/(m+1), to s^16/17, in Estrin's order: a short dependency chain,
// so that the vector units are not left waiting on one long Horner chain.
template <bool FMA>
MEGAEFF_FAST double log2_f32(float x) {
    const uint32_t b = f32_bits(x);
    const int32_t e = static_cast<int32_t>(b - 0x3F3504F3u) >> 23;
    const double m = static_cast<double>(bits_f32(b - (static_cast<uint32_t>(e) << 23)));
    const double s = (m - 1.0) / (m + 1.0);
    const double y = s * s, y2 = y * y, y4 = y2 * y2;
    const double p01 = mad<FMA>(inv_odd(1), y, inv_odd(0)), p23 = mad<FMA>(inv_odd(3), y, inv_odd(2));
    const double p45 = mad<FMA>(inv_odd(5), y, inv_odd(4)), p67 = mad<FMA>(inv_odd(7), y, inv_odd(6));
    const double p = mad<FMA>(inv_odd(8), y4 * y4, mad<FMA>(mad<FMA>(p67, y2, p45), y4, mad<FMA>(p23, y2, p01)));
    return mad<FMA>(s * p, 0x1.71547652b82fep+1, static_cast<double>(e));  // 2 / ln 2
}

// 2^z for |z| <= kMaxZ. n = round(z) through the 1.5 * 2^52 trick, whose low mantissa bits then hold n: the
// factor 2^n is built from them with 64-bit integer adds and shifts (vectorizable without AVX-512). 2^(z - n) by
// the Taylor polynomial of exp at g = (z - n) ln 2 of degree 11, in Estrin's order.
template <bool FMA>
MEGAEFF_FAST double exp2_f64(double z) {
    const double magic = 0x1.8p52;
    const double shifted = z + magic;
    const double n = shifted - magic;
    const double g = (z - n) * 0x1.62e42fefa39efp-1;  // z - n is exact, |g| <= ln2 / 2
    const double g2 = g * g, g4 = g2 * g2, g8 = g4 * g4;
    const double p01 = 1.0 + g, p23 = mad<FMA>(inv_factorial(3), g, inv_factorial(2));
    const double p45 = mad<FMA>(inv_factorial(5), g, inv_factorial(4));
    const double p67 = mad<FMA>(inv_factorial(7), g, inv_factorial(6));
    const double p89 = mad<FMA>(inv_factorial(9), g, inv_factorial(8));
    const double pab = mad<FMA>(inv_factorial(11), g, inv_factorial(10));
    const double low = mad<FMA>(mad<FMA>(p67, g2, p45), g4, mad<FMA>(p23, g2, p01));
    return mad<FMA>(mad<FMA>(pab, g2, p89), g8, low) * bits_f64((f64_bits(shifted) + 1023u) << 52);
}

template <bool FMA>
MEGAEFF_FAST float fmadf(float a, float b, float c) {
    if (FMA) return __builtin_fmaf(a, b, c);
    return a * b + c;
}

// Quantize's power t^k in FP32 arithmetic (8 lanes), for |k log2 t| <= kPowMaxZ. Its relative error is below
// pow_bound(k, z) (see the budget at the top); the interval check then takes twice that plus the exact
// pipeline's FP32 roundings. z is returned for the bound.
constexpr float kPowMaxZ = 32.0f;

template <bool FMA>
MEGAEFF_FAST float pow_f32(float t, float k, float* z_out) {
    const uint32_t b = f32_bits(t);
    const int32_t e = static_cast<int32_t>(b - 0x3F3504F3u) >> 23;
    const float m = bits_f32(b - (static_cast<uint32_t>(e) << 23));
    const float s = (m - 1.0f) / (m + 1.0f);  // m - 1 is exact
    const float y = s * s;
    float p = fmadf<FMA>(1.0f / 9, y, 1.0f / 7);
    p = fmadf<FMA>(p, y, 1.0f / 5);
    p = fmadf<FMA>(p, y, 1.0f / 3);
    p = fmadf<FMA>(p, y, 1.0f);
    const float l = s * p * 0x1.715476p+1f;                       // log2 m, |l| <= 1/2
    const float z = fmadf<FMA>(k, l, k * static_cast<float>(e));  // k e exact: k = j / 16, j <= 1024
    *z_out = z;
    const float magic = 0x1.8p23f;
    const float shifted = z + magic;
    const float n = shifted - magic;
    const float g = (z - n) * 0x1.62e430p-1f;  // z - n exact
    float q = fmadf<FMA>(1.0f / 720, g, 1.0f / 120);
    q = fmadf<FMA>(q, g, 1.0f / 24);
    q = fmadf<FMA>(q, g, 1.0f / 6);
    q = fmadf<FMA>(q, g, 0.5f);
    q = fmadf<FMA>(q, g, 1.0f);
    q = fmadf<FMA>(q, g, 1.0f);
    return q * bits_f32((f32_bits(shifted) + 127u) << 23);
}

// The relative error bound of pow_f32 against libm's float64 power (before any FP32 rounding), >= 3x the
// derived one term by term, plus the FP32 roundings of the exact pipeline (fp32(P), / scale) and of ours.
MEGAEFF_FAST float pow_bound(float k, float z) { return 0x1p-18f + k * 0x1p-20f + std::fabs(z) * 0x1p-22f; }

// fp8_encode for 0 <= q <= FMAX (not NaN) without branches: both of its branches, then a select.
template <int FMT>
MEGAEFF_FAST uint32_t encode_magnitude(float q) {
    constexpr bool e5 = FMT == MEGAEFF_FP8_E5M2;
    constexpr uint32_t mbits = e5 ? 2u : 3u, bias = e5 ? 15u : 7u;
    constexpr uint32_t magic = (128u - bias + 23u - mbits) << 23;
    const uint32_t a = f32_bits(q);
    const uint32_t sub = f32_bits(q + bits_f32(magic)) - magic;
    const uint32_t odd = (a >> (23u - mbits)) & 1u;
    const uint32_t nrm = (a + ((bias - 127u) << 23) + ((1u << (22u - mbits)) - 1u) + odd) >> (23u - mbits);
    const uint32_t r = a < ((128u - bias) << 23) ? sub : nrm;
    return a >= f32_bits(fp8_max(FMT)) ? (e5 ? 0x7Bu : 0x7Eu) : (r & 0xFFu);
}

// Largest relative distance of pow (t^k, as a fraction of pow_bound) and root (t^(1/k)) from libm's float64
// ones, over t[0..n), k[0..n).
template <bool FMA>
MEGAEFF_FAST void max_error(const float* t, const float* k, int64_t n, double* out) {
    out[0] = out[1] = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double kd = k[i], lt = log2(static_cast<double>(t[i]));
        const double pow_exact = exp2(kd * lt), root_exact = exp2(lt / kd);
        float z;
        const double pow_fast = pow_f32<FMA>(t[i], k[i], &z);
        const double root_fast = exp2_f64<FMA>(log2_f32<FMA>(t[i]) * (1.0 / kd));
        out[0] = std::max(out[0], std::fabs(pow_fast / pow_exact - 1.0) / pow_bound(k[i], z));
        out[1] = std::max(out[1], std::fabs(root_fast / root_exact - 1.0));
    }
}

}  // namespace fast
}  // namespace megaeff_fp8

#endif  // MEGAEFF_FP8_ADAMW_FASTMATH_H
