// Fused CUDA kernel of the FP8 AdamW update (contract: megaeff/optim/fp8_adamw_ref.py), C ABI (fp8_adamw.h).
//
// One launch for all groups of all parameters: block b updates global group b, one thread per element (128),
// and finds its tensor by binary search over the descriptors' group offsets. The element and group math is
// fp8_adamw_math.h, the code the CPU kernel runs and the CPU tests check bit for bit; this file adds the block
// reductions and the FP8 casts. Build with --fmad=false (the math uses __f*_rn intrinsics anyway) and without
// --use_fast_math / -ftz=true: second moments live in the FP32 subnormal range.
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <limits.h>

#include "fp8_adamw.h"
#include "fp8_adamw_math.h"

namespace {

using namespace megaeff_fp8;
using Desc = MegaeffFp8AdamwDesc;
static_assert(sizeof(Desc) == 144, "fp8_adamw.h: the descriptor layout is part of the ABI");

constexpr int kThreads = kGroupSize;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ float decode(uint8_t code, int fmt) {
    if (fmt == MEGAEFF_FP8_E5M2) {
        __nv_fp8_e5m2 c;
        c.__x = code;
        return static_cast<float>(c);
    }
    __nv_fp8_e4m3 c;
    c.__x = code;
    return static_cast<float>(c);
}

// q is already clamped to +-FMAX (quantize_value): the conversion's own saturation never decides anything.
__device__ __forceinline__ uint8_t encode(float q, int fmt) {
    const __nv_fp8_interpretation_t kind = fmt == MEGAEFF_FP8_E5M2 ? __NV_E5M2 : __NV_E4M3;
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(q, __NV_SATFINITE, kind));
}

// max |m|, min nonzero |m|, max |v|, min nonzero |v| over the block (exact in any order). Padding threads pass
// 0 and +inf.
struct Ranges {
    float m_max, m_min, v_max, v_min;
};

__device__ __forceinline__ Ranges block_ranges(Ranges r) {
    __shared__ Ranges partial[kWarps];
    for (int o = 16; o > 0; o >>= 1) {
        r.m_max = fmaxf(r.m_max, __shfl_xor_sync(kFullMask, r.m_max, o));
        r.m_min = fminf(r.m_min, __shfl_xor_sync(kFullMask, r.m_min, o));
        r.v_max = fmaxf(r.v_max, __shfl_xor_sync(kFullMask, r.v_max, o));
        r.v_min = fminf(r.v_min, __shfl_xor_sync(kFullMask, r.v_min, o));
    }
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = r;
    __syncthreads();
    Ranges t = partial[0];
    for (int w = 1; w < kWarps; ++w) {
        t.m_max = fmaxf(t.m_max, partial[w].m_max);
        t.m_min = fminf(t.m_min, partial[w].m_min);
        t.v_max = fmaxf(t.v_max, partial[w].v_max);
        t.v_min = fminf(t.v_min, partial[w].v_min);
    }
    return t;
}

__device__ __forceinline__ int find_desc(const Desc* __restrict__ descs, int n, int64_t g) {
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

__global__ void __launch_bounds__(kThreads) fp8_adamw_kernel(const Desc* __restrict__ descs, int n) {
    __shared__ int desc_index;
    const int64_t g = blockIdx.x;
    if (threadIdx.x == 0) desc_index = find_desc(descs, n, g);
    __syncthreads();
    const Desc& d = descs[desc_index];

    const int64_t gl = g - d.group_offset;
    const int64_t r = threadIdx.x / d.cols_per_group, c = threadIdx.x % d.cols_per_group;
    const int64_t row = gl / d.groups_per_row * d.rows_per_group + r;
    const int64_t col = gl % d.groups_per_row * d.cols_per_group + c;
    const bool valid = r < d.rows_per_group && row < d.n_rows && col < d.n_cols;
    const int64_t o = row * d.n_cols + col;
    float* m_meta = d.m_meta + 3 * gl;
    float* v_meta = d.v_meta + 3 * gl;

    const float inf = __int_as_float(0x7F800000);
    float m = 0.0f, v = 0.0f;
    if (valid) {
        const GroupMeta m_old{m_meta[0], m_meta[1], m_meta[2]};
        const GroupMeta v_old{v_meta[0], v_meta[1], v_meta[2]};
        const float m0 = dequantize_value(decode(d.m_codes[o], d.m_format), m_old);
        const float v0 = dequantize_value(decode(d.v_codes[o], d.v_format), v_old);
        const AdamwOut u = adamw_value(d.param[o], d.grad[o], m0, v0, d);
        d.param[o] = u.p;
        m = u.m;
        v = u.v;
    }
    const float am = fabsf(m), av = fabsf(v);
    // Every thread has read the old metadata before the reduction's barrier, so thread 0 may overwrite it after.
    const Ranges t = block_ranges(Ranges{am, am > 0.0f ? am : inf, av, av > 0.0f ? av : inf});

    const bool expand = d.expand != 0;
    const GroupMeta gm = group_meta(t.m_max, t.m_min, d.m_format, expand);
    const GroupMeta gv = group_meta(t.v_max, t.v_min, d.v_format, expand);
    if (valid) {
        d.m_codes[o] = encode(quantize_value(m, gm, t.m_max == 0.0f, d.m_format), d.m_format);
        d.v_codes[o] = encode(quantize_value(v, gv, t.v_max == 0.0f, d.v_format), d.v_format);
    }
    if (threadIdx.x == 0) {
        m_meta[0] = gm.scale;
        m_meta[1] = gm.k;
        m_meta[2] = gm.centre;
        v_meta[0] = gv.scale;
        v_meta[1] = gv.k;
        v_meta[2] = gv.centre;
    }
}

}  // namespace

extern "C" int megaeff_fp8_adamw_step(const Desc* host_descs, int n, int64_t total_groups, struct CUstream_st* stream) {
    if (n <= 0 || total_groups <= 0) return static_cast<int>(cudaSuccess);
    if (!host_descs || total_groups > INT_MAX) return static_cast<int>(cudaErrorInvalidValue);
    const size_t bytes = static_cast<size_t>(n) * sizeof(Desc);
    // Stream-ordered scratch: no global state, and the memcpy from pageable memory returns only once host_descs
    // has been staged, so the caller may free it.
    Desc* dev = nullptr;
    cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&dev), bytes, stream);
    if (err != cudaSuccess) return static_cast<int>(err);
    err = cudaMemcpyAsync(dev, host_descs, bytes, cudaMemcpyHostToDevice, stream);
    if (err == cudaSuccess) {
        fp8_adamw_kernel<<<static_cast<unsigned>(total_groups), kThreads, 0, stream>>>(dev, n);
        err = cudaGetLastError();
    }
    const cudaError_t freed = cudaFreeAsync(dev, stream);
    return static_cast<int>(err != cudaSuccess ? err : freed);
}
