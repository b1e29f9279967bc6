// AdamW steps for float32 CPU weights whose pruned entries (keep == false) must stay exactly zero.
//
// This is torch.optim.AdamW's update applied to the gradient multiplied by the keep-mask, in one pass
// over memory; masking the gradient in a pass of its own first would read and write every gradient once
// more. A pruned entry has weight and exp_avg zero and exp_avg_sq positive (gradprune's registry sets
// them when the masks change and when the optimizer is attached: a tiny normal floor in exp_avg_sq, see
// gradprune/optimizer_state.py), so with its gradient taken as zero every update below leaves it at +0.0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
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
            float decay, float step_size, float grad_scale) {
  for (int64_t i = begin; i < end; ++i) {
    const float scaled = grad[i] * grad_scale;  // kept or not (-fno-trapping-math lets it vectorise)
    const float g = keep[i] ? scaled : 0.0f;
    const float m = exp_avg[i] + one_minus_beta1 * (g - exp_avg[i]);  // lerp, as torch does
    const float v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g;
    const float denom = std::sqrt(v) / bias_correction2_sqrt + eps;
    param[i] = param[i] * decay - step_size * m / denom;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

// Sum of the squares of the kept gradient entries in [begin, end): float partial sums over short runs
// (vectorised), added up in double.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
double kept_sum_of_squares(const float* __restrict grad, const uint8_t* __restrict keep, int64_t begin, int64_t end) {
  double total = 0.0;
  for (int64_t start = begin; start < end; start += 4096) {
    const int64_t stop = std::min(end, start + 4096);
    float partial = 0.0f;
#pragma omp simd reduction(+ : partial)
    for (int64_t i = start; i < stop; ++i) {
      const float loaded = grad[i];
      const float g = keep[i] ? loaded : 0.0f;
      partial += g * g;
    }
    total += partial;
  }
  return total;
}

void check(const at::Tensor& t, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
              "masked_adamw_: each weight, gradient, exp_avg and exp_avg_sq must be a contiguous float32 CPU "
              "tensor and each mask a contiguous bool CPU tensor, all of the weight's size");
}

}  // namespace

// One AdamW step for each weight of a parameter group (same lr, betas, eps and weight decay); ``steps``
// holds each weight's step count, already incremented for this step (as torch keeps it in the state).
// Kept gradient entries are multiplied by ``grad_scale`` first (gradient clipping's factor, or 1).
void masked_adamw_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                   std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> keeps, std::vector<at::Tensor> steps,
                   double lr, double beta1, double beta2, double eps, double weight_decay, double grad_scale) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count &&
                  keeps.size() == count && steps.size() == count,
              "masked_adamw_: lists of different lengths");
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  for (size_t t = 0; t < count; ++t) {
    const int64_t numel = params[t].numel();
    for (const auto& tensor : {params[t], grads[t], exp_avgs[t], exp_avg_sqs[t]}) check(tensor, at::kFloat, numel);
    check(keeps[t], at::kBool, numel);
    const double step = steps[t].item<double>();
    TORCH_CHECK(step >= 1, "masked_adamw_: step counts from 1");
    const float step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, step)));
    const float bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
    float* p = params[t].data_ptr<float>();
    const float* g = grads[t].data_ptr<float>();
    float* m = exp_avgs[t].data_ptr<float>();
    float* v = exp_avg_sqs[t].data_ptr<float>();
    const uint8_t* k = reinterpret_cast<const uint8_t*>(keeps[t].data_ptr<bool>());
    at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
      update(p, g, m, v, k, begin, end, static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
             static_cast<float>(1.0 - beta2), bias_correction2_sqrt, static_cast<float>(eps), decay, step_size,
             static_cast<float>(grad_scale));
    });
  }
}

// The sum of the squares of the kept entries of all these gradients (for clipping by the norm of the
// live weights' gradients without masking them first).
double kept_squared_norm(std::vector<at::Tensor> grads, std::vector<at::Tensor> keeps) {
  TORCH_CHECK(grads.size() == keeps.size(), "kept_squared_norm: lists of different lengths");
  double total = 0.0;
  for (size_t t = 0; t < grads.size(); ++t) {
    const int64_t numel = grads[t].numel();
    check(grads[t], at::kFloat, numel);
    check(keeps[t], at::kBool, numel);
    const float* g = grads[t].data_ptr<float>();
    const uint8_t* k = reinterpret_cast<const uint8_t*>(keeps[t].data_ptr<bool>());
    total += at::parallel_reduce(
        0, numel, 32768, 0.0,
        [&](int64_t begin, int64_t end, double identity) { return identity + kept_sum_of_squares(g, k, begin, end); },
        [](double a, double b) { return a + b; });
  }
  return total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("masked_adamw_", &masked_adamw_, "AdamW step of float32 CPU weights with keep-masks, in place");
  module.def("kept_squared_norm", &kept_squared_norm, "sum of squares of the kept gradient entries");
}
