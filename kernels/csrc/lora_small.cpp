// loraplex's per-token LoRA op for small CPU steps (decode): one call per layer instead of a
// dozen torch ops. Built by kernels/native.py; the pure-torch reference is
// kernels/reference.py (add_lora_linear), the tests compare the two.
//
// Semantics (for every token t with slot[t] >= 0; tokens on slot -1 are not touched):
//   y = scale * lora_a[slot[t]] @ x[t]                              // [R_total]
//   out[t, offset + col_i : offset + col_i + N_i] += lora_b_i[slot[t]] @ y[r_i : r_i + R_i]
// Each token reads only its own slot's rows: no padding, no gathered weights.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

template <typename W, typename X>
inline float dot(const W* w, const X* x, int64_t n) {
  float acc = 0.f;
  for (int64_t k = 0; k < n; ++k) acc += static_cast<float>(w[k]) * static_cast<float>(x[k]);
  return acc;
}

template <typename A, typename W>
void run(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& token_slots,
         const torch::Tensor& lora_a, const std::vector<torch::Tensor>& lora_b, double scale,
         int64_t offset) {
  const int64_t num_tokens = token_slots.size(0);
  const int64_t hidden = lora_a.size(2), rank_total = lora_a.size(1);
  const int64_t* slots = token_slots.data_ptr<int64_t>();
  const A* x_data = x.data_ptr<A>();
  A* out_data = out.data_ptr<A>();
  const int64_t x_stride = x.stride(0), out_stride = out.stride(0);
  const W* a_data = lora_a.data_ptr<W>();
  std::vector<const W*> b_data;
  std::vector<int64_t> widths, ranks;
  for (const auto& b : lora_b) {
    b_data.push_back(b.data_ptr<W>());
    widths.push_back(b.size(1));
    ranks.push_back(b.size(2));
  }
  const float s = static_cast<float>(scale);
  at::parallel_for(0, num_tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(rank_total);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      const A* xt = x_data + t * x_stride;
      const W* a = a_data + slot * rank_total * hidden;              // [R_total, H]
      for (int64_t r = 0; r < rank_total; ++r) y[r] = s * dot(a + r * hidden, xt, hidden);
      A* ot = out_data + t * out_stride + offset;
      int64_t rank_start = 0;
      for (size_t i = 0; i < b_data.size(); ++i) {
        const int64_t width = widths[i], rank = ranks[i];
        const W* b = b_data[i] + slot * width * rank;                // [N_i, R_i]
        const float* yi = y.data() + rank_start;
        for (int64_t n = 0; n < width; ++n)
          ot[n] = static_cast<A>(static_cast<float>(ot[n]) + dot(b + n * rank, yi, rank));
        ot += width;
        rank_start += rank;
      }
    }
  });
}

void add_lora_linear(torch::Tensor out, torch::Tensor x, torch::Tensor token_slots, torch::Tensor lora_a,
                     std::vector<torch::Tensor> lora_b, double scale, int64_t offset) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && lora_a.dim() == 3, "out [T, N], x [T, H], lora_a [S, R, H]");
  TORCH_CHECK(token_slots.dtype() == torch::kLong && token_slots.is_contiguous(), "token_slots: contiguous int64");
  TORCH_CHECK(x.size(0) >= token_slots.size(0) && out.size(0) >= token_slots.size(0), "fewer rows than tokens");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && lora_a.is_contiguous(), "rows must be contiguous");
  TORCH_CHECK(x.size(1) == lora_a.size(2), "x and lora_a disagree on H");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "x and out: one dtype");
  int64_t rank_total = 0, width_total = 0;
  for (const auto& b : lora_b) {
    TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.scalar_type() == lora_a.scalar_type() &&
                b.size(0) == lora_a.size(0), "lora_b: contiguous [S, N_i, R_i] in lora_a's dtype");
    rank_total += b.size(2);
    width_total += b.size(1);
  }
  TORCH_CHECK(rank_total == lora_a.size(1), "the slices' ranks must add up to lora_a's R");
  TORCH_CHECK(offset >= 0 && offset + width_total <= out.size(1), "columns out of range");
  // Slots are checked, not trusted: a slot past the stacked weights would read another buffer.
  const int64_t* slots = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < token_slots.size(0); ++t)
    TORCH_CHECK(slots[t] >= -1 && slots[t] < lora_a.size(0), "token slot out of range: ", slots[t]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_small_act", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lora_a.scalar_type(), "lora_small_w", [&] {
      run<A, scalar_t>(out, x, token_slots, lora_a, lora_b, scale, offset);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_lora_linear", &add_lora_linear, "per-token LoRA for small steps (see the file's Semantics)");
}
