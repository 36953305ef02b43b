// loraplex's LoRA op for small CPU steps (decode, short prefill runs): one call per layer
// instead of a dozen torch ops. Built by kernels/native.py; the pure-torch reference is
// kernels/reference.py (add_lora_linear), the tests compare the two.
//
// Semantics (for every token t with slot[t] >= 0; tokens on slot -1 are not touched):
//   y = scale * lora_a[slot[t]] @ x[t]                                       // [R_total]
//   out[t, offset + col_i : offset + col_i + N_i] += y[r_i : r_i + R_i] @ lora_b_t_i[slot[t]]
// lora_a [S, R_total, H] (the slices' A concatenated along the rank); lora_b_t_i [S, R_i, N_i]
// (B transposed: each rank row is a contiguous run of the output). Tokens are taken in tiles of
// up to TILE tokens on one slot, grouped by slot wherever they sit in the batch (a prefill run,
// or a decode step's sequences on one adapter), which share each weight row they read. Each
// token reads only its own slot's rows: no padding, no gathered weights.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace {

constexpr int64_t TILE = 4;  // tokens of one run sharing each weight row read

template <typename W, typename X>
inline float dot(const W* w, const X* x, int64_t n) {
  float acc = 0.f;
  for (int64_t k = 0; k < n; ++k) acc += static_cast<float>(w[k]) * static_cast<float>(x[k]);
  return acc;
}

template <typename A, typename W>
void run(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& token_slots,
         const torch::Tensor& lora_a, const std::vector<torch::Tensor>& lora_b_t, double scale, int64_t offset) {
  const int64_t num_tokens = token_slots.size(0);
  const int64_t hidden = lora_a.size(2), rank_total = lora_a.size(1);
  const int64_t* slots = token_slots.data_ptr<int64_t>();
  const A* x_data = x.data_ptr<A>();
  A* out_data = out.data_ptr<A>();
  const int64_t x_stride = x.stride(0), out_stride = out.stride(0);
  const W* a_data = lora_a.data_ptr<W>();
  std::vector<const W*> b_data;
  std::vector<int64_t> widths, ranks;
  int64_t width_total = 0;
  for (const auto& b : lora_b_t) {
    b_data.push_back(b.data_ptr<W>());
    ranks.push_back(b.size(1));
    widths.push_back(b.size(2));
    width_total += b.size(2);
  }
  // The tokens with an adapter, by slot (stable: a run keeps its order), then tiles of them:
  // (first position in `order`, tokens), all on one slot.
  std::vector<int64_t> order;
  order.reserve(num_tokens);
  for (int64_t t = 0; t < num_tokens; ++t)
    if (slots[t] >= 0) order.push_back(t);
  std::stable_sort(order.begin(), order.end(), [slots](int64_t a, int64_t b) { return slots[a] < slots[b]; });
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i = 0; i < static_cast<int64_t>(order.size()); ++i) {
    if (!tiles.empty()) {
      auto& last = tiles.back();
      if (slots[order[last.first]] == slots[order[i]] && last.second < TILE) {
        ++last.second;
        continue;
      }
    }
    tiles.emplace_back(i, 1);
  }
  const float s = static_cast<float>(scale);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(TILE * rank_total), acc(TILE * width_total);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* tokens = order.data() + tiles[i].first;  // this tile's tokens, one slot
      const int64_t count = tiles[i].second, slot = slots[tokens[0]];
      const W* a = a_data + slot * rank_total * hidden;  // [R_total, H]
      if (count == TILE) {
        const A* x0 = x_data + tokens[0] * x_stride;
        const A* x1 = x_data + tokens[1] * x_stride;
        const A* x2 = x_data + tokens[2] * x_stride;
        const A* x3 = x_data + tokens[3] * x_stride;
        for (int64_t r = 0; r < rank_total; ++r) {
          const W* w = a + r * hidden;
          float c0 = 0, c1 = 0, c2 = 0, c3 = 0;
          for (int64_t k = 0; k < hidden; ++k) {
            const float wk = static_cast<float>(w[k]);
            c0 += wk * static_cast<float>(x0[k]);
            c1 += wk * static_cast<float>(x1[k]);
            c2 += wk * static_cast<float>(x2[k]);
            c3 += wk * static_cast<float>(x3[k]);
          }
          y[r] = s * c0;
          y[rank_total + r] = s * c1;
          y[2 * rank_total + r] = s * c2;
          y[3 * rank_total + r] = s * c3;
        }
      } else {
        for (int64_t j = 0; j < count; ++j)
          for (int64_t r = 0; r < rank_total; ++r)
            y[j * rank_total + r] = s * dot(a + r * hidden, x_data + tokens[j] * x_stride, hidden);
      }
      std::fill(acc.begin(), acc.begin() + count * width_total, 0.f);
      int64_t rank_start = 0, col = 0;
      for (size_t k = 0; k < b_data.size(); ++k) {
        const int64_t width = widths[k], rank = ranks[k];
        const W* bt = b_data[k] + slot * rank * width;   // [R_i, N_i]
        for (int64_t r = 0; r < rank; ++r) {
          const W* row = bt + r * width;
          for (int64_t j = 0; j < count; ++j) {
            const float yr = y[j * rank_total + rank_start + r];
            float* accj = acc.data() + j * width_total + col;
            for (int64_t n = 0; n < width; ++n) accj[n] += yr * static_cast<float>(row[n]);
          }
        }
        rank_start += rank;
        col += width;
      }
      for (int64_t j = 0; j < count; ++j) {
        A* ot = out_data + tokens[j] * out_stride + offset;
        const float* accj = acc.data() + j * width_total;
        for (int64_t n = 0; n < width_total; ++n) ot[n] = static_cast<A>(static_cast<float>(ot[n]) + accj[n]);
      }
    }
  });
}

void add_lora_linear(torch::Tensor out, torch::Tensor x, torch::Tensor token_slots, torch::Tensor lora_a,
                     std::vector<torch::Tensor> lora_b_t, double scale, int64_t offset) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && lora_a.dim() == 3, "out [T, N], x [T, H], lora_a [S, R, H]");
  TORCH_CHECK(token_slots.dtype() == torch::kLong && token_slots.is_contiguous(), "token_slots: contiguous int64");
  TORCH_CHECK(x.size(0) >= token_slots.size(0) && out.size(0) >= token_slots.size(0), "fewer rows than tokens");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && lora_a.is_contiguous(), "rows must be contiguous");
  TORCH_CHECK(x.size(1) == lora_a.size(2), "x and lora_a disagree on H");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "x and out: one dtype");
  int64_t rank_total = 0, width_total = 0;
  for (const auto& b : lora_b_t) {
    TORCH_CHECK(b.dim() == 3 && b.is_contiguous() && b.scalar_type() == lora_a.scalar_type() &&
                b.size(0) == lora_a.size(0), "lora_b_t: contiguous [S, R_i, N_i] in lora_a's dtype");
    rank_total += b.size(1);
    width_total += b.size(2);
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
      run<A, scalar_t>(out, x, token_slots, lora_a, lora_b_t, scale, offset);
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_lora_linear", &add_lora_linear, "LoRA for small steps (see the file's Semantics)");
}
