// One AdamW step for a float32 CPU weight whose pruned entries (keep == false) must stay exactly zero.
//
// This is torch.optim.AdamW's update applied to the gradient multiplied by the keep-mask, in one pass
// over memory; masking the gradient in a pass of its own first would read and write every gradient once
// more. A pruned entry has weight, exp_avg and exp_avg_sq all zero (gradprune's registry
// zeroes them when the masks change), so with a zero gradient every update below leaves it at +0.0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace {

// On x86-64 compiled for AVX-512, AVX2 and the baseline; the best the CPU has is picked at load time.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void update(float* __restrict param, const float* __restrict grad, float* __restrict exp_avg,
            float* __restrict exp_avg_sq, const uint8_t* __restrict keep, int64_t begin, int64_t end,
            float one_minus_beta1, float beta2, float one_minus_beta2, float bias_correction2_sqrt, float eps,
            float decay, float step_size) {
  for (int64_t i = begin; i < end; ++i) {
    const float loaded = grad[i];  // loaded unconditionally so that the loop vectorises
    const float g = keep[i] ? loaded : 0.0f;
    const float m = exp_avg[i] + one_minus_beta1 * (g - exp_avg[i]);  // lerp, as torch does
    const float v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g;
    const float denom = std::sqrt(v) / bias_correction2_sqrt + eps;
    param[i] = param[i] * decay - step_size * m / denom;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

}  // namespace

void masked_adamw_(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                   torch::Tensor keep, double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t step) {
  for (const auto& t : {param, grad, exp_avg, exp_avg_sq}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "masked_adamw_ needs contiguous float32 CPU tensors");
    TORCH_CHECK(t.numel() == param.numel(), "masked_adamw_: tensors of different sizes");
  }
  TORCH_CHECK(keep.device().is_cpu() && keep.scalar_type() == at::kBool && keep.is_contiguous() &&
                  keep.numel() == param.numel(),
              "masked_adamw_ needs a contiguous bool CPU mask shaped like the weight");
  TORCH_CHECK(step >= 1, "masked_adamw_: step counts from 1");
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const uint8_t* k = reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>());
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  const float bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  at::parallel_for(0, param.numel(), 32768, [&](int64_t begin, int64_t end) {
    update(p, g, m, v, k, begin, end, static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
           static_cast<float>(1.0 - beta2), bias_correction2_sqrt, static_cast<float>(eps), decay, step_size);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("masked_adamw_", &masked_adamw_, "AdamW step of a float32 CPU weight with a keep-mask, in place");
}
