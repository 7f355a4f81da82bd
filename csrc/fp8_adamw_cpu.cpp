// CPU kernel of the FP8 AdamW update: plain C++17 + OpenMP, C ABI (fp8_adamw.h), loaded with ctypes by
// megaeff/kernels/fp8_adamw_cpp.py. Build: c++ -O3 -fopenmp -ffp-contract=off -fno-fast-math -shared -fPIC.
// Bit-exact with megaeff/optim/fp8_adamw_ref.py: all arithmetic is in fp8_adamw_math.h.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fp8_adamw.h"
#include "fp8_adamw_math.h"

namespace {

using namespace megaeff_fp8;
using Desc = MegaeffFp8AdamwDesc;
static_assert(sizeof(Desc) == 144, "fp8_adamw.h: the descriptor layout is part of the ABI");

// A group's dequantized value depends only on the code byte, and 128 elements share far fewer distinct codes
// than that: computing each code once saves most of the float64 exp2/log2 calls of the decode.
class DequantMemo {
  public:
    DequantMemo(const float* meta, int fmt) : g_{meta[0], meta[1], meta[2]}, fmt_(fmt) {}

    float operator()(uint8_t c) {
        const uint64_t bit = uint64_t{1} << (c & 63);
        if (!(done_[c >> 6] & bit)) {
            value_[c] = dequantize_value(fp8_decode(c, fmt_), g_);
            done_[c >> 6] |= bit;
        }
        return value_[c];
    }

  private:
    GroupMeta g_;
    int fmt_;
    uint64_t done_[4] = {0, 0, 0, 0};
    float value_[256];
};

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

// One group: gl is the tensor-local group index.
void update_group(const Desc& d, int64_t gl) {
    const int64_t r0 = gl / d.groups_per_row * d.rows_per_group;
    const int64_t c0 = gl % d.groups_per_row * d.cols_per_group;
    const int64_t nr = std::min(d.rows_per_group, d.n_rows - r0);
    const int64_t nc = std::min(d.cols_per_group, d.n_cols - c0);
    float* m_meta = d.m_meta + 3 * gl;
    float* v_meta = d.v_meta + 3 * gl;
    DequantMemo m_old(m_meta, d.m_format), v_old(v_meta, d.v_format);

    float m[kGroupSize], v[kGroupSize];
    AbsRange m_range, v_range;
    for (int64_t r = 0, j = 0; r < nr; ++r) {
        const int64_t base = (r0 + r) * d.n_cols + c0;
        for (int64_t c = 0; c < nc; ++c, ++j) {
            const int64_t o = base + c;
            const AdamwOut u = adamw_value(d.param[o], d.grad[o], m_old(d.m_codes[o]), v_old(d.v_codes[o]), d);
            d.param[o] = u.p;
            m[j] = u.m;
            v[j] = u.v;
            m_range.add(u.m);
            v_range.add(u.v);
        }
    }

    const bool expand = d.expand != 0;
    const GroupMeta gm = group_meta(m_range.max, m_range.min_nonzero, d.m_format, expand);
    const GroupMeta gv = group_meta(v_range.max, v_range.min_nonzero, d.v_format, expand);
    const bool m_zero = m_range.max == 0.0f, v_zero = v_range.max == 0.0f;
    for (int64_t r = 0, j = 0; r < nr; ++r) {
        const int64_t base = (r0 + r) * d.n_cols + c0;
        for (int64_t c = 0; c < nc; ++c, ++j) {
            d.m_codes[base + c] = fp8_encode(quantize_value(m[j], gm, m_zero, d.m_format), d.m_format);
            d.v_codes[base + c] = fp8_encode(quantize_value(v[j], gv, v_zero, d.v_format), d.v_format);
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

}  // namespace

extern "C" {

int megaeff_fp8_adamw_step_cpu(const Desc* descs, int n, int64_t total_groups, int num_threads) {
    if (n < 0 || total_groups < 0 || (n > 0 && !descs) || !valid(descs, n, total_groups)) return -1;
    const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
    // Static chunks: consecutive groups stay on one thread (contiguous memory), and groups cost about the same.
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < total_groups; ++g) {
        const Desc& d = descs[find_desc(descs, n, g)];
        update_group(d, g - d.group_offset);
    }
    return 0;
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
