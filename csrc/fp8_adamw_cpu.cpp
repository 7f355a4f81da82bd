// CPU kernel of the FP8 AdamW update: plain C++17 + OpenMP, C ABI (fp8_adamw.h), loaded with ctypes by
// megaeff/kernels/fp8_adamw_cpp.py with the flags listed there (-ffp-contract=off, no fast-math). Bit-exact with
// megaeff/kernels/fp8_adamw_ref.py: the exact arithmetic is fp8_adamw_math.h; the float64 exp2/log2 of quantize
// and dequantize go through the fast path of fp8_adamw_fastmath.h, which keeps a result only where it provably
// equals the exact one and otherwise falls back to the exact libm path.
//
// Vectorization without -march=native (the kernel cache is shared by nodes of different CPUs): the loops are
// compiled for AVX2 and the baseline (target_clones), the polynomial loops once more with FMA; picked at run time.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fp8_adamw.h"
#include "fp8_adamw_fastmath.h"
#include "fp8_adamw_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MEGAEFF_CLONES __attribute__((target_clones("avx2", "default")))
// The polynomial loops get a third build with FMA (every AVX2 CPU of AMD and Intel has it), chosen at run time.
#define MEGAEFF_FMA_BUILD __attribute__((target("avx2,fma")))
#endif
#endif
#ifndef MEGAEFF_CLONES
#define MEGAEFF_CLONES
#endif

namespace {

using namespace megaeff_fp8;
using Desc = MegaeffFp8AdamwDesc;
static_assert(sizeof(Desc) == 144, "fp8_adamw.h: the descriptor layout is part of the ABI");

// How the fast path runs: fast = 0 is the exact libm path only. The other two are test hooks: e_scale
// multiplies E (0: trust the approximation blindly) and perturb adds a relative error to the approximations
// (a bad polynomial); the tests show that the bit-exact comparison catches both.
struct FastCtl {
    bool fast;
    double e_scale, perturb;
};

// Counters of the fast path, summed over threads: [0] quantized elements that took the interval check,
// [1] of them fell back to libm, [2] dequantized elements that took it, [3] of them fell back.
struct Stats {
    int64_t n[4] = {0, 0, 0, 0};
};

enum : uint8_t { kFastOk = 0, kSpecial = 1, kFallback = 2 };

// Quantize's interval. The exact q = fp32(fp32(P) / scale), P libm's float64 power: each FP32 rounding moves a
// normal value by at most 2^-24 relatively (overflow only upwards), so q lies within a factor 1 -+ E of ours,
// fp32 Pa * fp32(1 / scale), when E covers |Pa / P - 1|, those two roundings and our own three (the reciprocal,
// the product, the factor 1 -+ E): fast::pow_bound does, with |z| <= 32. A q below 2^-100 (far below every FP8
// code but 0, and where FP32 subnormals would break the relative bounds) is left to the exact path, and so is a
// group whose 1 / scale would not be a normal FP32 number.
constexpr float kQuantMinQ = 0x1p-100f;
constexpr float kQuantMaxScale = 0x1p100f;

// Two loops: the power and its interval, and the FP8 encoding of both ends (all FP32/int32: 8 AVX2 lanes), which
// together would not fit the registers. qlo < 0 marks an element the interval check cannot take: -1 special
// (t not normal), -2 out of range.
template <int FMT, bool FMA>
MEGAEFF_FAST void quantize_fast_t(const float* __restrict__ x, int n, GroupMeta g, float e_scale, float pf,
                                  uint8_t* __restrict__ code, uint8_t* __restrict__ flag) {
    const float inv_scale = 1.0f / g.scale, fmax = fp8_max(FMT);
    float qlo[kGroupSize], qhi[kGroupSize];
    for (int j = 0; j < n; ++j) {
        const float t = div_rn(std::fabs(x[j]), g.centre);  // the exact path's t, bit for bit
        const bool normal = (t >= fast::kMinNormal) & (t <= fast::kMaxFinite);  // & not &&: no branches
        float z;
        const float p = fast::pow_f32<FMA>(normal ? t : 1.0f, g.k, &z) * pf;
        const bool in_range = normal & (std::fabs(z) <= fast::kPowMaxZ);
        // The clamp, FP32 rounding and fp8_encode are monotone: the codes of the two ends bound the exact one.
        const float e = fast::pow_bound(g.k, z) * e_scale, q = p * inv_scale;
        const float lo = q * (1.0f - e), hi = q * (1.0f + e);
        const bool ok = in_range & (hi >= kQuantMinQ);
        qlo[j] = ok ? (lo > fmax ? fmax : lo) : (normal ? -2.0f : -1.0f);
        qhi[j] = hi > fmax ? fmax : hi;
    }
    for (int j = 0; j < n; ++j) {
        const float lo = qlo[j] < 0.0f ? 0.0f : qlo[j];
        const uint32_t clo = fast::encode_magnitude<FMT>(lo), chi = fast::encode_magnitude<FMT>(qhi[j]);
        code[j] = static_cast<uint8_t>(clo | ((f32_bits(x[j]) >> 24) & 0x80u));  // t normal: x is not +-0
        const uint32_t f = qlo[j] == -1.0f ? kSpecial : (qlo[j] < 0.0f || clo != chi ? kFallback : kFastOk);
        flag[j] = static_cast<uint8_t>(f);
    }
}

template <bool FMA>
MEGAEFF_FAST void quantize_fast_fmt(const float* x, int n, GroupMeta g, int fmt, float e_scale, float pf,
                                    uint8_t* code, uint8_t* flag) {
    if (fmt == MEGAEFF_FP8_E5M2)
        quantize_fast_t<MEGAEFF_FP8_E5M2, FMA>(x, n, g, e_scale, pf, code, flag);
    else
        quantize_fast_t<MEGAEFF_FP8_E4M3, FMA>(x, n, g, e_scale, pf, code, flag);
}

MEGAEFF_CLONES void quantize_fast_plain(const float* x, int n, GroupMeta g, int fmt, float e_scale, float pf,
                                        uint8_t* code, uint8_t* flag) {
    quantize_fast_fmt<false>(x, n, g, fmt, e_scale, pf, code, flag);
}

// dequantize_value for every element, with the root from the fast path where its interval check allows. Per
// element rather than per distinct code: the vector loop is cheaper than finding the distinct codes.
template <bool FMA>
MEGAEFF_FAST void dequantize_fast_t(const float* __restrict__ c, int n, GroupMeta g, double lo_f, double hi_f,
                                    double pf, float* __restrict__ out, uint8_t* __restrict__ flag) {
    const double inv_k = 1.0 / static_cast<double>(g.k);
    for (int j = 0; j < n; ++j) {
        const float y = mul_rn(c[j], g.scale);
        const float a = std::fabs(y);
        const bool normal = (a >= fast::kMinNormal) & (a <= fast::kMaxFinite);
        const double root = fast::exp2_f64<FMA>(fast::log2_f32<FMA>(normal ? a : 1.0f) * inv_k) * pf;
        const float rlo = static_cast<float>(root * lo_f), rhi = static_cast<float>(root * hi_f);
        out[j] = mul_rn(mul_rn(sign_of(y), rlo), g.centre);
        flag[j] = static_cast<uint8_t>((!normal) | ((normal & (rlo != rhi)) << 1));
    }
}

MEGAEFF_CLONES void dequantize_fast_plain(const float* c, int n, GroupMeta g, double lo_f, double hi_f, double pf,
                                          float* out, uint8_t* flag) {
    dequantize_fast_t<false>(c, n, g, lo_f, hi_f, pf, out, flag);
}

#ifdef MEGAEFF_FMA_BUILD
MEGAEFF_FMA_BUILD void quantize_fast_fma(const float* x, int n, GroupMeta g, int fmt, float e_scale, float pf,
                                         uint8_t* code, uint8_t* flag) {
    quantize_fast_fmt<true>(x, n, g, fmt, e_scale, pf, code, flag);
}

MEGAEFF_FMA_BUILD void dequantize_fast_fma(const float* c, int n, GroupMeta g, double lo_f, double hi_f, double pf,
                                           float* out, uint8_t* flag) {
    dequantize_fast_t<true>(c, n, g, lo_f, hi_f, pf, out, flag);
}

bool cpu_has_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif

void quantize_fast(const float* x, int n, GroupMeta g, int fmt, float e_scale, float pf, uint8_t* code,
                   uint8_t* flag) {
#ifdef MEGAEFF_FMA_BUILD
    if (cpu_has_fma()) return quantize_fast_fma(x, n, g, fmt, e_scale, pf, code, flag);
#endif
    quantize_fast_plain(x, n, g, fmt, e_scale, pf, code, flag);
}

void dequantize_fast(const float* c, int n, GroupMeta g, double lo_f, double hi_f, double pf, float* out,
                     uint8_t* flag) {
#ifdef MEGAEFF_FMA_BUILD
    if (cpu_has_fma()) return dequantize_fast_fma(c, n, g, lo_f, hi_f, pf, out, flag);
#endif
    dequantize_fast_plain(c, n, g, lo_f, hi_f, pf, out, flag);
}

// adamw_value over a group's gathered arrays, and the max / min nonzero magnitude of the new moments. The
// reductions run on the bits (for non-negative floats the integer order is the value order; NaN is mapped to
// "no candidate", as the scalar `a > max ? a : max` ignores it): integer min/max reductions vectorize.
MEGAEFF_CLONES void adamw_group(const Desc& desc, int n, float* __restrict__ p, const float* __restrict__ g,
                                const float* __restrict__ m0, const float* __restrict__ v0, float* __restrict__ m,
                                float* __restrict__ v, float* range) {
    constexpr int32_t kInfBits = 0x7F800000;
    const Desc d = desc;  // a local copy: the scalars cannot alias the arrays, so the loop vectorizes
    int32_t m_max = 0, v_max = 0, m_min = kInfBits, v_min = kInfBits;
    for (int j = 0; j < n; ++j) {
        const AdamwOut u = adamw_value(p[j], g[j], m0[j], v0[j], d);
        p[j] = u.p;
        m[j] = u.m;
        v[j] = u.v;
        const float am = std::fabs(u.m), av = std::fabs(u.v);
        const int32_t bm = static_cast<int32_t>(f32_bits(am)), bv = static_cast<int32_t>(f32_bits(av));
        const int32_t xm = am == am ? bm : 0, xv = av == av ? bv : 0;
        const int32_t nm = am > 0.0f ? bm : kInfBits, nv = av > 0.0f ? bv : kInfBits;
        m_max = xm > m_max ? xm : m_max;
        v_max = xv > v_max ? xv : v_max;
        m_min = nm < m_min ? nm : m_min;
        v_min = nv < v_min ? nv : v_min;
    }
    range[0] = bits_f32(static_cast<uint32_t>(m_max));
    range[1] = bits_f32(static_cast<uint32_t>(m_min));
    range[2] = bits_f32(static_cast<uint32_t>(v_max));
    range[3] = bits_f32(static_cast<uint32_t>(v_min));
}

// k == 1 groups (constant, non-expanded, or a ratio too wide to expand) have no pow: quantize_value is a few
// exact FP32 operations, run here in vector form, the same operations in the same order. A NaN or infinite x
// (flag 1) is left to the scalar path, whose NaN sign the select below need not reproduce.
template <int FMT>
MEGAEFF_FAST void quantize_k1_t(const float* __restrict__ x, int n, GroupMeta g, uint8_t* __restrict__ code,
                                uint8_t* __restrict__ flag) {
    const float fmax = fp8_max(FMT), scale = g.scale > 0.0f ? g.scale : 1.0f;
    for (int j = 0; j < n; ++j) {
        const float q = div_rn(div_rn(std::fabs(x[j]), g.centre), scale);  // |sign(x) * t / scale|
        const uint32_t c = fast::encode_magnitude<FMT>(q > fmax ? fmax : q);
        code[j] = static_cast<uint8_t>(c | (x[j] < 0.0f ? 0x80u : 0u));  // -tiny gives -0: code 0x80, like fp8_encode
        flag[j] = static_cast<uint8_t>(!(std::fabs(x[j]) <= fast::kMaxFinite));
    }
}

MEGAEFF_CLONES void quantize_k1(const float* x, int n, GroupMeta g, int fmt, uint8_t* code, uint8_t* flag) {
    if (fmt == MEGAEFF_FP8_E5M2)
        quantize_k1_t<MEGAEFF_FP8_E5M2>(x, n, g, code, flag);
    else
        quantize_k1_t<MEGAEFF_FP8_E4M3>(x, n, g, code, flag);
}

// dequantize_value for k == 1: root_k(|y|, 1) is |y|. NaN codes (flag 1) are left to the scalar path.
MEGAEFF_CLONES void dequantize_k1(const float* __restrict__ c, int n, GroupMeta g, float* __restrict__ out,
                                  uint8_t* __restrict__ flag) {
    for (int j = 0; j < n; ++j) {
        const float y = mul_rn(c[j], g.scale);
        out[j] = mul_rn(mul_rn(sign_of(y), std::fabs(y)), g.centre);
        flag[j] = static_cast<uint8_t>(!(std::fabs(y) <= fast::kMaxFinite));
    }
}

// The fast path needs k > 1 (k == 1 has no pow) and a sane meta; a checkpoint could hold anything.
bool fast_meta(GroupMeta g) {
    return g.k > 1.0f && g.k <= 64.0f && g.centre >= fast::kMinNormal && g.centre <= fast::kMaxFinite &&
           g.scale >= fast::kMinNormal && g.scale <= fast::kMaxFinite;
}

// Codes of x[0..n) under meta g: quantize_value + fp8_encode, through the fast path where it applies.
void quantize_group(const float* x, int n, GroupMeta g, bool zero, int fmt, const FastCtl& ctl, Stats& st,
                    uint8_t* code) {
    uint8_t flag[kGroupSize] = {};  // zeroed: the scan below reads whole 8-byte words
    const bool k1 = g.k == 1.0f && g.centre > 0.0f;
    if (zero || !ctl.fast || !(k1 || (fast_meta(g) && g.scale <= kQuantMaxScale))) {
        for (int j = 0; j < n; ++j) code[j] = fp8_encode(quantize_value(x[j], g, zero, fmt), fmt);
        return;
    }
    if (k1) {
        quantize_k1(x, n, g, fmt, code, flag);
    } else {
        const float e_scale = static_cast<float>(ctl.e_scale), pf = static_cast<float>(1.0 + ctl.perturb);
        quantize_fast(x, n, g, fmt, e_scale, pf, code, flag);
    }
    int special = 0;
    for (int j = 0; j < n; j += 8) {
        uint64_t any;  // eight flags at a time: nearly all are 0
        memcpy(&any, flag + j, 8);
        if (!any) continue;
        for (int i = j; i < std::min(j + 8, n); ++i) {
            if (flag[i] == kFastOk) continue;
            code[i] = fp8_encode(quantize_value(x[i], g, false, fmt), fmt);
            st.n[1] += flag[i] == kFallback;
            special += flag[i] == kSpecial;
        }
    }
    if (!k1) st.n[0] += n - special;
}

// FP8 code -> FP32 for both formats, built once (thread-safe static initialization, read-only afterwards).
const float* decode_table(int fmt) {
    struct Tables {
        float v[2][256];
        Tables() {
            for (int f = 0; f < 2; ++f)
                for (int c = 0; c < 256; ++c) v[f][c] = fp8_decode(static_cast<uint8_t>(c), f);
        }
    };
    static const Tables tables;
    return tables.v[fmt == MEGAEFF_FP8_E5M2 ? 1 : 0];
}

// out[j] = dequantize_value(fp8_decode(codes[j]), g).
void dequantize_group(const uint8_t* codes, int n, GroupMeta g, int fmt, const FastCtl& ctl, Stats& st,
                      float* out) {
    const float* decode = decode_table(fmt);
    const bool k1 = g.k == 1.0f;
    if (!ctl.fast || !(k1 || fast_meta(g))) {
        for (int j = 0; j < n; ++j) out[j] = dequantize_value(decode[codes[j]], g);
        return;
    }
    float c[kGroupSize];
    uint8_t flag[kGroupSize] = {};  // zeroed: the scan below reads whole 8-byte words
    for (int j = 0; j < n; ++j) c[j] = decode[codes[j]];  // a gather the vector loop need not do
    if (k1) {
        dequantize_k1(c, n, g, out, flag);
    } else {
        const double e = fast::kRootE * ctl.e_scale;
        dequantize_fast(c, n, g, 1.0 - e, 1.0 + e, 1.0 + ctl.perturb, out, flag);
    }
    int special = 0;
    for (int j = 0; j < n; j += 8) {
        uint64_t any;
        memcpy(&any, flag + j, 8);
        if (!any) continue;
        for (int i = j; i < std::min(j + 8, n); ++i) {
            if (flag[i] == kFastOk) continue;
            out[i] = dequantize_value(c[i], g);
            st.n[3] += flag[i] == kFallback;
            special += flag[i] == kSpecial;
        }
    }
    if (!k1) st.n[2] += n - special;
}

struct AbsRange {
    float max = 0.0f;
    float min_nonzero = std::numeric_limits<float>::infinity();

    void add(float x) {
        const float a = std::fabs(x);
        max = a > max ? a : max;
        if (a > 0.0f && a < min_nonzero) min_nonzero = a;
    }
};

void write_meta(float* meta, GroupMeta g) {
    meta[0] = g.scale;
    meta[1] = g.k;
    meta[2] = g.centre;
}

GroupMeta read_meta(const float* meta) { return GroupMeta{meta[0], meta[1], meta[2]}; }

// One group: gl is the tensor-local group index. Its elements are gathered into contiguous arrays so that the
// math loops see unit stride.
void update_group(const Desc& d, int64_t gl, const FastCtl& ctl, Stats& st) {
    const int64_t r0 = gl / d.groups_per_row * d.rows_per_group;
    const int64_t c0 = gl % d.groups_per_row * d.cols_per_group;
    const int64_t nr = std::min(d.rows_per_group, d.n_rows - r0);
    const int64_t nc = std::min(d.cols_per_group, d.n_cols - c0);
    const int n = static_cast<int>(nr * nc);
    float* m_meta = d.m_meta + 3 * gl;
    float* v_meta = d.v_meta + 3 * gl;

    uint8_t mc[kGroupSize], vc[kGroupSize];
    float p[kGroupSize], g[kGroupSize], m0[kGroupSize], v0[kGroupSize], m[kGroupSize], v[kGroupSize], range[4];
    for (int64_t r = 0, j = 0; r < nr; ++r) {
        const int64_t base = (r0 + r) * d.n_cols + c0;
        for (int64_t c = 0; c < nc; ++c, ++j) {
            mc[j] = d.m_codes[base + c];
            vc[j] = d.v_codes[base + c];
            p[j] = d.param[base + c];
            g[j] = d.grad[base + c];
        }
    }
    dequantize_group(mc, n, read_meta(m_meta), d.m_format, ctl, st, m0);
    dequantize_group(vc, n, read_meta(v_meta), d.v_format, ctl, st, v0);
    adamw_group(d, n, p, g, m0, v0, m, v, range);

    const bool expand = d.expand != 0;
    const GroupMeta gm = group_meta(range[0], range[1], d.m_format, expand);
    const GroupMeta gv = group_meta(range[2], range[3], d.v_format, expand);
    quantize_group(m, n, gm, range[0] == 0.0f, d.m_format, ctl, st, mc);
    quantize_group(v, n, gv, range[2] == 0.0f, d.v_format, ctl, st, vc);
    for (int64_t r = 0, j = 0; r < nr; ++r) {
        const int64_t base = (r0 + r) * d.n_cols + c0;
        for (int64_t c = 0; c < nc; ++c, ++j) {
            d.m_codes[base + c] = mc[j];
            d.v_codes[base + c] = vc[j];
            d.param[base + c] = p[j];
        }
    }
    write_meta(m_meta, gm);
    write_meta(v_meta, gv);
}

bool valid_format(int32_t f) { return f == MEGAEFF_FP8_E4M3 || f == MEGAEFF_FP8_E5M2; }

// Layouts come from Python, but a wrong one would write out of bounds: check everything the loops rely on.
bool valid(const Desc* descs, int n, int64_t total_groups) {
    int64_t offset = 0;
    for (int i = 0; i < n; ++i) {
        const Desc& d = descs[i];
        if (!d.param || !d.grad || !d.m_codes || !d.m_meta || !d.v_codes || !d.v_meta) return false;
        if (!valid_format(d.m_format) || !valid_format(d.v_format)) return false;
        if (d.n_rows < 1 || d.n_cols < 1 || d.rows_per_group < 1 || d.cols_per_group < 1) return false;
        if (d.rows_per_group * d.cols_per_group > kGroupSize) return false;
        if (d.groups_per_row != (d.n_cols + d.cols_per_group - 1) / d.cols_per_group) return false;
        if (d.group_offset != offset) return false;
        offset += (d.n_rows + d.rows_per_group - 1) / d.rows_per_group * d.groups_per_row;
    }
    return offset == total_groups;
}

// Index of the descriptor holding global group g: the last one whose group_offset <= g.
int find_desc(const Desc* descs, int n, int64_t g) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (descs[mid].group_offset <= g)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

#ifdef MEGAEFF_FMA_BUILD
MEGAEFF_FMA_BUILD void fast_error_fma(const float* t, const float* k, int64_t n, double* out) {
    fast::max_error<true>(t, k, n, out);
}
#endif

}  // namespace

extern "C" {

int megaeff_fp8_adamw_step_cpu_ex(const Desc* descs, int n, int64_t total_groups, int num_threads, int fast,
                                  double e_scale, double perturb, int64_t* stats) {
    if (n < 0 || total_groups < 0 || (n > 0 && !descs) || !valid(descs, n, total_groups)) return -1;
    const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
    const FastCtl ctl{fast != 0, e_scale, perturb};
    int64_t sum[4] = {0, 0, 0, 0};
#pragma omp parallel num_threads(threads)
    {
        Stats st;
        // Static chunks: consecutive groups stay on one thread (contiguous memory), and groups cost about the same.
#pragma omp for schedule(static)
        for (int64_t g = 0; g < total_groups; ++g) {
            const Desc& d = descs[find_desc(descs, n, g)];
            update_group(d, g - d.group_offset, ctl, st);
        }
        for (int i = 0; i < 4; ++i) {
#pragma omp atomic
            sum[i] += st.n[i];
        }
    }
    if (stats)
        for (int i = 0; i < 4; ++i) stats[i] = sum[i];
    return 0;
}

int megaeff_fp8_adamw_step_cpu(const Desc* descs, int n, int64_t total_groups, int num_threads) {
    return megaeff_fp8_adamw_step_cpu_ex(descs, n, total_groups, num_threads, 1, 1.0, 0.0, nullptr);
}

// The fast path's error bounds E: [0] quantize's power (the smallest pow_bound, at k = 1 and z = 0; it grows
// with k and |z|), [1] dequantize's root (kRootE).
void megaeff_fp8_fast_bounds(double* out) {
    out[0] = fast::pow_bound(1.0f, 0.0f);
    out[1] = fast::kRootE;
}

// Largest relative distance of the fast pow and root (before the FP32 rounding) from libm's float64 ones, over
// t[i] > 0 and k[i] > 1, with the polynomials the kernel runs on this CPU (FMA or not): the measured side of
// fp8_adamw_fastmath.h's error budget, for the tests.
void megaeff_fp8_fast_error(const float* t, const float* k, int64_t n, double* out) {
#ifdef MEGAEFF_FMA_BUILD
    if (cpu_has_fma()) return fast_error_fma(t, k, n, out);
#endif
    fast::max_error<false>(t, k, n, out);
}

int64_t megaeff_fp8_adamw_desc_size(void) { return static_cast<int64_t>(sizeof(Desc)); }

double megaeff_fp8_log2_target_range(int fmt) { return log2_target_range(fmt); }

void megaeff_fp8_encode(const float* x, uint8_t* codes, int64_t n, int fmt) {
    const float fmax = fp8_max(fmt);
    for (int64_t i = 0; i < n; ++i) {
        const float q = x[i] < -fmax ? -fmax : (x[i] > fmax ? fmax : x[i]);
        codes[i] = fp8_encode(q, fmt);
    }
}

void megaeff_fp8_decode(const uint8_t* codes, float* x, int64_t n, int fmt) {
    for (int64_t i = 0; i < n; ++i) x[i] = fp8_decode(codes[i], fmt);
}

void megaeff_fp8_pow(const float* t, const float* k, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = pow_k(t[i], k[i]);
}

void megaeff_fp8_root(const float* y, const float* k, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = root_k(y[i], k[i]);
}

void megaeff_fp8_quantize_groups(const float* x, int64_t n_groups, int64_t width, int fmt, int expand, uint8_t* codes,
                                 float* meta) {
    for (int64_t g = 0; g < n_groups; ++g) {
        const float* xg = x + g * width;
        AbsRange range;
        for (int64_t i = 0; i < width; ++i) range.add(xg[i]);
        const GroupMeta gm = group_meta(range.max, range.min_nonzero, fmt, expand != 0);
        for (int64_t i = 0; i < width; ++i)
            codes[g * width + i] = fp8_encode(quantize_value(xg[i], gm, range.max == 0.0f, fmt), fmt);
        write_meta(meta + 3 * g, gm);
    }
}

void megaeff_fp8_dequantize_groups(const uint8_t* codes, const float* meta, int64_t n_groups, int64_t width, int fmt,
                                   float* x) {
    for (int64_t g = 0; g < n_groups; ++g) {
        const GroupMeta gm{meta[3 * g], meta[3 * g + 1], meta[3 * g + 2]};
        for (int64_t i = 0; i < width; ++i)
            x[g * width + i] = dequantize_value(fp8_decode(codes[g * width + i], fmt), gm);
    }
}

}  // extern "C"
