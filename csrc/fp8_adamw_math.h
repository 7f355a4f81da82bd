// Per-element and per-group math of the FP8 AdamW contract, shared by the CPU (g++) and CUDA (nvcc) kernels so
// that the CUDA kernel runs the very code the CPU tests check bit for bit against megaeff/optim/fp8_adamw_ref.py.
//
// Every FP32 and float64 operation goes through the *_rn helpers: on the device they are the IEEE
// round-to-nearest intrinsics (no FMA contraction whatever the flags), on the host plain operators compiled with
// -ffp-contract=off. The order of operations mirrors the torch reference literally, including its quirks (see
// expansion_k).
#ifndef MEGAEFF_FP8_ADAMW_MATH_H
#define MEGAEFF_FP8_ADAMW_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fp8_adamw.h"

#if defined(__CUDACC__)
#define MEGAEFF_HD __host__ __device__ __forceinline__
#else
#define MEGAEFF_HD inline
#endif

namespace megaeff_fp8 {

constexpr int kGroupSize = 128;
constexpr double kMaxK = 32.0;               // group_quant.K_MAX
constexpr float kConstantScale = 0.00390625f;  // 2^-8: a constant-magnitude group's codes are exactly +-256

struct GroupMeta {
    float scale, k, centre;
};

MEGAEFF_HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
#endif
}

MEGAEFF_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
#endif
}

#if defined(__CUDA_ARCH__)
MEGAEFF_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
MEGAEFF_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
MEGAEFF_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
MEGAEFF_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
MEGAEFF_HD float sqrt_rn(float a) { return __fsqrt_rn(a); }
MEGAEFF_HD double dmul_rn(double a, double b) { return __dmul_rn(a, b); }
MEGAEFF_HD double ddiv_rn(double a, double b) { return __ddiv_rn(a, b); }
MEGAEFF_HD float to_f32(double x) { return __double2float_rn(x); }
#else
MEGAEFF_HD float mul_rn(float a, float b) { return a * b; }
MEGAEFF_HD float add_rn(float a, float b) { return a + b; }
MEGAEFF_HD float sub_rn(float a, float b) { return a - b; }
MEGAEFF_HD float div_rn(float a, float b) { return a / b; }
MEGAEFF_HD float sqrt_rn(float a) { return sqrtf(a); }
MEGAEFF_HD double dmul_rn(double a, double b) { return a * b; }
MEGAEFF_HD double ddiv_rn(double a, double b) { return a / b; }
MEGAEFF_HD float to_f32(double x) { return static_cast<float>(x); }
#endif

MEGAEFF_HD float fp8_max(int fmt) { return fmt == MEGAEFF_FP8_E5M2 ? 57344.0f : 448.0f; }

// log2(FMAX^2 / 2) exactly as Python's math.log2 gives it (megaeff/precision/fp8.py): a literal, so that no libm
// can disagree on the constant that picks k. tests/unit/test_fp8_adamw_kernels.py checks it.
MEGAEFF_HD double log2_target_range(int fmt) {
    return fmt == MEGAEFF_FP8_E5M2 ? 0x1.e9d5d9fd5010bp+4 : 0x1.09d5d9fd5010bp+4;
}

// torch.sign: +0 for both zeros (so sign(x) * p is +0 for a zero x), NaN stays NaN.
MEGAEFF_HD float sign_of(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? 0.0f : x)); }

// group_quant._pow: t for k == 1, 0 unless t > 0, else fp32(exp2(k * log2 t)) in float64.
MEGAEFF_HD float pow_k(float t, float k) {
    if (k == 1.0f) return t;
    if (!(t > 0.0f)) return 0.0f;
    return to_f32(exp2(dmul_rn(static_cast<double>(k), log2(static_cast<double>(t)))));
}

// group_quant._root: y for k == 1, 0 unless y > 0, else fp32(exp2(log2(y) / k)) in float64.
MEGAEFF_HD float root_k(float y, float k) {
    if (k == 1.0f) return y;
    if (!(y > 0.0f)) return 0.0f;
    return to_f32(exp2(ddiv_rn(log2(static_cast<double>(y)), static_cast<double>(k))));
}

// group_quant.expansion_exponent. The reference writes 16 * L / log2(R) with a Python float on the left, which
// torch evaluates as log2(R).reciprocal() * (16 * L): two roundings, reproduced here as they are.
MEGAEFF_HD float expansion_k(float ratio, int fmt) {
    const double inv = ddiv_rn(1.0, log2(static_cast<double>(ratio)));
    double kf = ddiv_rn(floor(dmul_rn(inv, 16.0 * log2_target_range(fmt))), 16.0);
    kf = kf < 1.0 ? 1.0 : (kf > kMaxK ? kMaxK : kf);
    return to_f32(kf);
}

// group_quant.quantize_groups' per-group part. mx = max |x|, mn = min nonzero |x| (+inf when there is none).
MEGAEFF_HD GroupMeta group_meta(float mx, float mn, int fmt, bool expand) {
    const bool zero = mx == 0.0f;
    const bool constant = !zero && mn == mx;
    if (zero) return GroupMeta{0.0f, 1.0f, 1.0f};
    if (constant) return GroupMeta{kConstantScale, 1.0f, mx};
    if (!expand) return GroupMeta{div_rn(mx, fp8_max(fmt)), 1.0f, 1.0f};
    const float k = expansion_k(div_rn(mx, mn), fmt);
    const float centre = mul_rn(sqrt_rn(mx), sqrt_rn(mn));
    return GroupMeta{div_rn(pow_k(div_rn(mx, centre), k), fp8_max(fmt)), k, centre};
}

// The clamped FP32 value whose FP8 rounding is the code of x (`zero`: the group's max is 0).
MEGAEFF_HD float quantize_value(float x, GroupMeta g, bool zero, int fmt) {
    if (zero) return 0.0f;
    const float y = mul_rn(sign_of(x), pow_k(div_rn(fabsf(x), g.centre), g.k));
    // A no-expansion scale can underflow to 0 (mx ~ 1e-45): the reference then divides by 1.
    const float q = div_rn(y, g.scale > 0.0f ? g.scale : 1.0f);
    const float fmax = fp8_max(fmt);
    return q < -fmax ? -fmax : (q > fmax ? fmax : q);
}

// group_quant.dequantize_groups for one element whose code decodes to `c`.
MEGAEFF_HD float dequantize_value(float c, GroupMeta g) {
    const float y = mul_rn(c, g.scale);
    return mul_rn(mul_rn(sign_of(y), root_k(fabsf(y), g.k)), g.centre);
}

struct AdamwOut {
    float p, m, v;
};

// fp8_adamw_ref.adamw_math for one element.
MEGAEFF_HD AdamwOut adamw_value(float p, float g, float m0, float v0, const MegaeffFp8AdamwDesc& d) {
    AdamwOut o;
    o.m = add_rn(mul_rn(m0, d.beta1), mul_rn(g, d.one_minus_beta1));
    o.v = add_rn(mul_rn(v0, d.beta2), mul_rn(mul_rn(g, g), d.one_minus_beta2));
    const float den = add_rn(div_rn(sqrt_rn(o.v), d.bias_correction2_sqrt), d.eps);
    o.p = sub_rn(mul_rn(p, d.decay), mul_rn(div_rn(o.m, den), d.step_size));
    return o;
}

// Exact FP8 -> FP32 (torch's float8_e4m3fn / float8_e5m2 bit layouts).
MEGAEFF_HD float fp8_decode(uint8_t code, int fmt) {
    const bool e5 = fmt == MEGAEFF_FP8_E5M2;
    const int mbits = e5 ? 2 : 3, bias = e5 ? 15 : 7;
    const uint32_t e = (code & 0x7Fu) >> mbits, m = code & ((1u << mbits) - 1u);
    float mag;
    if (e == 0) {
        mag = static_cast<float>(m) * (e5 ? 0x1p-16f : 0x1p-9f);  // subnormal: exact
    } else if (e5 && e == 31) {
        mag = m ? bits_f32(0x7FC00000u) : bits_f32(0x7F800000u);
    } else if (!e5 && e == 15 && m == 7) {
        mag = bits_f32(0x7FC00000u);
    } else {
        mag = bits_f32(((e + 127u - static_cast<uint32_t>(bias)) << 23) | (m << (23 - mbits)));
    }
    return (code & 0x80u) ? -mag : mag;
}

// FP32 -> FP8, round to nearest even, for |x| <= FMAX (callers clamp first; larger values saturate). The
// algorithm of c10's fp8e4m3fn/fp8e5m2 conversions, which torch's CPU cast uses: the subnormal range rounds
// through an FP32 addition of a power of two whose ulp is the FP8 subnormal step.
MEGAEFF_HD uint8_t fp8_encode(float x, int fmt) {
    const bool e5 = fmt == MEGAEFF_FP8_E5M2;
    const uint32_t mbits = e5 ? 2u : 3u, bias = e5 ? 15u : 7u;
    uint32_t a = f32_bits(x);
    const uint32_t sign = a & 0x80000000u;
    a ^= sign;
    uint8_t r;
    if (a > 0x7F800000u) {
        r = 0x7F;  // NaN
    } else if (a >= f32_bits(fp8_max(fmt))) {
        r = e5 ? 0x7B : 0x7E;
    } else if (a < ((128u - bias) << 23)) {  // below the smallest normal 2^(1 - bias)
        const uint32_t magic = (128u - bias + 23u - mbits) << 23;
        r = static_cast<uint8_t>(f32_bits(add_rn(bits_f32(a), bits_f32(magic))) - magic);
    } else {
        const uint32_t odd = (a >> (23u - mbits)) & 1u;
        a += ((bias - 127u) << 23) + ((1u << (22u - mbits)) - 1u) + odd;  // unsigned wrap-around is intended
        r = static_cast<uint8_t>(a >> (23u - mbits));
    }
    return static_cast<uint8_t>(r | (sign >> 24));
}

}  // namespace megaeff_fp8

#endif  // MEGAEFF_FP8_ADAMW_MATH_H
