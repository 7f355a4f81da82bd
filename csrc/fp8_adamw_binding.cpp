// Torch binding of the fused CUDA FP8 AdamW kernel: checks the tensors, builds the descriptors of fp8_adamw.h
// and calls the C ABI on the current stream. The only csrc/ file that sees torch headers (the .cu stays plain
// CUDA, so it compiles without a CUDA-enabled torch). Python side: megaeff/kernels/fp8_adamw_cuda.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <climits>
#include <vector>

#include "fp8_adamw.h"

namespace {

void check(const at::Tensor& t, const at::Device& device, const char* what, size_t i) {
    TORCH_CHECK(t.device() == device, "entry ", i, ": ", what, " is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.is_contiguous(), "entry ", i, ": ", what, " must be contiguous");
}

// layouts: n_rows, n_cols, rows_per_group, cols_per_group per tensor; scalars: the 8 StepScalars fields (FP32
// values) in declaration order; flags: m format, v format, expand (MEGAEFF_FP8_* ids).
void step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
          const std::vector<at::Tensor>& m_codes, const std::vector<at::Tensor>& m_metas,
          const std::vector<at::Tensor>& v_codes, const std::vector<at::Tensor>& v_metas,
          const std::vector<int64_t>& layouts, const std::vector<double>& scalars,
          const std::vector<int64_t>& flags) {
    const size_t n = params.size();
    TORCH_CHECK(grads.size() == n && m_codes.size() == n && m_metas.size() == n && v_codes.size() == n &&
                    v_metas.size() == n && layouts.size() == 4 * n && scalars.size() == 8 * n && flags.size() == 3 * n,
                "fp8_adamw step: inconsistent argument lengths");
    if (n == 0) return;
    TORCH_CHECK(n <= static_cast<size_t>(INT_MAX), "fp8_adamw step: too many tensors");
    const at::Device device = params[0].device();
    TORCH_CHECK(device.is_cuda(), "fp8_adamw step: tensors must be on a CUDA device, got ", device);
    const c10::cuda::CUDAGuard guard(device);

    std::vector<MegaeffFp8AdamwDesc> descs(n);
    int64_t offset = 0;
    for (size_t i = 0; i < n; ++i) {
        const int64_t* lay = &layouts[4 * i];
        const int64_t n_rows = lay[0], n_cols = lay[1], rpg = lay[2], cpg = lay[3];
        TORCH_CHECK(n_rows > 0 && n_cols > 0 && rpg > 0 && cpg > 0 && rpg * cpg <= 128, "entry ", i, ": bad layout");
        const int64_t gpr = (n_cols + cpg - 1) / cpg, n_groups = (n_rows + rpg - 1) / rpg * gpr;
        const int64_t numel = n_rows * n_cols;
        const at::Tensor* t[6] = {&params[i], &grads[i], &m_codes[i], &m_metas[i], &v_codes[i], &v_metas[i]};
        const char* names[6] = {"param", "grad", "m codes", "m meta", "v codes", "v meta"};
        for (int j = 0; j < 6; ++j) check(*t[j], device, names[j], i);
        TORCH_CHECK(params[i].scalar_type() == at::kFloat && grads[i].scalar_type() == at::kFloat, "entry ", i,
                    ": param and grad must be float32");
        TORCH_CHECK(m_metas[i].scalar_type() == at::kFloat && v_metas[i].scalar_type() == at::kFloat, "entry ", i,
                    ": metas must be float32");
        TORCH_CHECK(m_codes[i].element_size() == 1 && v_codes[i].element_size() == 1, "entry ", i,
                    ": codes must be 1-byte tensors");
        TORCH_CHECK(params[i].numel() == numel && grads[i].numel() == numel && m_codes[i].numel() == numel &&
                        v_codes[i].numel() == numel,
                    "entry ", i, ": tensor sizes do not match the layout");
        TORCH_CHECK(m_metas[i].numel() == 3 * n_groups && v_metas[i].numel() == 3 * n_groups, "entry ", i,
                    ": metas must be [", n_groups, ", 3]");
        const int64_t* f = &flags[3 * i];
        TORCH_CHECK((f[0] == MEGAEFF_FP8_E4M3 || f[0] == MEGAEFF_FP8_E5M2) &&
                        (f[1] == MEGAEFF_FP8_E4M3 || f[1] == MEGAEFF_FP8_E5M2),
                    "entry ", i, ": unknown FP8 format id");

        MegaeffFp8AdamwDesc& d = descs[i];
        d.param = params[i].data_ptr<float>();
        d.grad = grads[i].data_ptr<float>();
        d.m_codes = static_cast<uint8_t*>(m_codes[i].data_ptr());
        d.m_meta = m_metas[i].data_ptr<float>();
        d.v_codes = static_cast<uint8_t*>(v_codes[i].data_ptr());
        d.v_meta = v_metas[i].data_ptr<float>();
        d.n_rows = n_rows;
        d.n_cols = n_cols;
        d.rows_per_group = rpg;
        d.cols_per_group = cpg;
        d.groups_per_row = gpr;
        d.group_offset = offset;
        // Already FP32 values (StepScalars): the narrowing is exact.
        const double* s = &scalars[8 * i];
        d.beta1 = static_cast<float>(s[0]);
        d.one_minus_beta1 = static_cast<float>(s[1]);
        d.beta2 = static_cast<float>(s[2]);
        d.one_minus_beta2 = static_cast<float>(s[3]);
        d.eps = static_cast<float>(s[4]);
        d.decay = static_cast<float>(s[5]);
        d.step_size = static_cast<float>(s[6]);
        d.bias_correction2_sqrt = static_cast<float>(s[7]);
        d.m_format = static_cast<int32_t>(f[0]);
        d.v_format = static_cast<int32_t>(f[1]);
        d.expand = f[2] != 0;
        d.reserved = 0;
        offset += n_groups;
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    const int err = megaeff_fp8_adamw_step(descs.data(), static_cast<int>(n), offset, stream);
    TORCH_CHECK(err == 0, "megaeff_fp8_adamw_step failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("step", &step, "Fused FP8 AdamW update of all given tensors in one launch (csrc/fp8_adamw.cu)");
}
