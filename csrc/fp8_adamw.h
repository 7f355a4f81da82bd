/* C ABI of the FP8 AdamW update kernels (megaeff/optim/fp8_adamw_ref.py is the contract).
 *
 * Plain C so that ctypes (CPU kernel), the torch binding and nvcc all see one layout. Every field is 8 or 4
 * bytes and 8-byte fields come first, so the struct has no padding and its size (144) is the same everywhere;
 * megaeff/kernels/fp8_adamw_cpp.py mirrors it and checks megaeff_fp8_adamw_desc_size().
 */
#ifndef MEGAEFF_FP8_ADAMW_H
#define MEGAEFF_FP8_ADAMW_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { MEGAEFF_FP8_E4M3 = 0, MEGAEFF_FP8_E5M2 = 1 };

/* One parameter tensor. Groups follow megaeff/precision/group_quant.py's GroupLayout on the tensor viewed as
 * [n_rows, n_cols]; the tensor's groups are the global groups [group_offset, group_offset + n_groups). */
typedef struct MegaeffFp8AdamwDesc {
    float* param;          /* FP32, updated in place */
    const float* grad;     /* FP32 */
    uint8_t* m_codes;      /* FP8 bit patterns, shaped like param */
    float* m_meta;         /* [n_groups, 3]: scale, k, centre */
    uint8_t* v_codes;
    float* v_meta;
    int64_t n_rows;
    int64_t n_cols;
    int64_t rows_per_group;
    int64_t cols_per_group;
    int64_t groups_per_row;
    int64_t group_offset;
    float beta1;
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float eps;
    float decay;
    float step_size;
    float bias_correction2_sqrt;
    int32_t m_format; /* MEGAEFF_FP8_* */
    int32_t v_format;
    int32_t expand;   /* nonzero: Dynamic Range Expansion */
    int32_t reserved; /* keeps the size a multiple of 8; set to 0 */
} MegaeffFp8AdamwDesc;

/* CUDA: copies the n descriptors (host memory, ordered by group_offset, group offsets contiguous from 0) to the
 * device and launches one kernel of total_groups blocks on `stream` (a cudaStream_t; NULL is the legacy default
 * stream). Returns a cudaError_t (0 on success). Asynchronous: host_descs may be freed on return. */
struct CUstream_st;
int megaeff_fp8_adamw_step(const MegaeffFp8AdamwDesc* host_descs, int n, int64_t total_groups,
                           struct CUstream_st* stream);

/* CPU: same update, OpenMP over groups with num_threads threads (<= 0: the OpenMP default). Returns 0, or -1
 * when a descriptor is invalid (unknown format, a group wider than 128); nothing is written then. */
int megaeff_fp8_adamw_step_cpu(const MegaeffFp8AdamwDesc* descs, int n, int64_t total_groups, int num_threads);

/* CPU library only: its pieces, for the tests and the ctypes loader. */
int64_t megaeff_fp8_adamw_desc_size(void);
double megaeff_fp8_log2_target_range(int fmt);
void megaeff_fp8_encode(const float* x, uint8_t* codes, int64_t n, int fmt); /* clamps like precision.fp8.to_fp8 */
void megaeff_fp8_decode(const uint8_t* codes, float* x, int64_t n, int fmt);
void megaeff_fp8_pow(const float* t, const float* k, float* out, int64_t n);  /* group_quant._pow */
void megaeff_fp8_root(const float* y, const float* k, float* out, int64_t n); /* group_quant._root */
/* group_quant.quantize_groups / dequantize_groups on [n_groups, width] FP32 groups (width <= 128). */
void megaeff_fp8_quantize_groups(const float* x, int64_t n_groups, int64_t width, int fmt, int expand,
                                 uint8_t* codes, float* meta);
void megaeff_fp8_dequantize_groups(const uint8_t* codes, const float* meta, int64_t n_groups, int64_t width,
                                   int fmt, float* x);

#ifdef __cplusplus
}
#endif

#endif /* MEGAEFF_FP8_ADAMW_H */
