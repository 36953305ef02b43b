// loraplex's LoRA op for small CPU steps (decode, prefill runs up to a few hundred tokens): one
// call per layer instead of a dozen torch ops. Built by kernels/native.py twice: x86-64-v3 (AVX2,
// FMA, F16C), and x86-64-v4 with AVX512-BF16 (__AVX512F__: the expand in 16-lane registers;
// __AVX512BF16__: bfloat16 tiles shrink, and expand, with bf16 pair dot products); the pure-torch
// reference is kernels/reference.py (add_lora_linear), the tests compare each build with it.
//
// Semantics (for every token t with slot[t] >= 0; tokens on slot -1 are not touched):
//   y = scale * lora_a[slot[t]] @ x[t]                                       // [R_total]
//   out[t, offset + col_i : offset + col_i + N_i] += y[r_i : r_i + R_i] @ lora_b_t_i[slot[t]]
// lora_a [S, R_total, H] (the slices' A concatenated along the rank); lora_b_t_i [S, R_i, N_i]
// (B transposed: each rank row is a contiguous run of the output). Computed in float32, each
// output element rounded once; except with AVX512-BF16 on bfloat16 inputs and weights, where y
// is rounded to bfloat16 before the expand (as vLLM's GPU kernels and our torch ops round it to
// the weights' dtype) and the products of bf16 pairs are summed in float.
//
// Tokens are taken in tiles of up to TILE tokens on one slot, grouped by slot wherever they sit in
// the batch (a prefill run, or a decode step's sequences on one adapter). A tile reads each weight
// row once for all its tokens, with one accumulator per token held in registers: the shrink's dot
// products run over H (the tile's inputs converted to float once), the expand runs over 8 (16)
// output columns at a time and adds into the output directly. Each token reads only its own
// slot's rows: no padding, no gathered weights. (With AVX512-BF16 a bfloat16 tile's shrink
// multiplies pairs of bf16 inputs and weights straight into float sums instead: the products are
// exact in float either way (subnormals aside), only the order of the additions differs.)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

#define UNROLL _Pragma("GCC unroll 8")

constexpr int64_t TILE = 8;  // tokens of one run sharing each weight row read (8 accumulators)

// 8 lanes of float32 from / to 8 elements of each supported dtype.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
  // Round to nearest even, as c10's float -> bfloat16 conversion; NaN stays NaN (0x7FC0).
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename A, typename W>
struct Operands {
  const int64_t* slots;
  const A* x;
  int64_t x_stride;
  A* out;
  int64_t out_stride, offset;
  const W* a;  // [S, R_total, H]
  int64_t hidden, rank_total;
  std::vector<const W*> b;  // per slice [S, R_i, N_i]
  std::vector<int64_t> ranks, widths;
  float scale;
};

// Accumulators per token and weight row: one tile of one or two tokens has too few independent
// sums to hide the latency of an FMA, so it splits each row over U accumulators.
template <int T>
constexpr int lanes_per_token() { return T == 1 ? 4 : (T == 2 ? 2 : 1); }

// Float vectors of 8 lanes (AVX2), for the expand; Lanes16 below is the 16-lane twin.
struct Lanes8 {
  using V = __m256;
  static constexpr int N = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  template <typename E> static V load(const E* p) { return load8(p); }
  template <typename E> static void store(E* p, V v) { store8(p, v); }
};

// Output columns [n, n + N*U) of one slice for the T tokens of a tile (N lanes a register):
//   out[j, col + n : ...] += ys[j, :rank] @ bt[:rank, n : n + N*U]
// Each broadcast of a token's y serves U registers: with 16 lanes and U >= 2 a tile of 8 tokens
// does four times the multiply-adds per load of 8 lanes and U = 1 (which runs out of load slots
// before FMA units).
template <typename L, typename A, typename W, int T, int U>
inline void expand_columns(const Operands<A, W>& op, const int64_t* tokens, const W* bt, int64_t width,
                           int64_t rank, const float* ys, int64_t col, int64_t n) {
  typename L::V acc[T * U];
  UNROLL for (int i = 0; i < T * U; ++i) acc[i] = L::zero();
  for (int64_t r = 0; r < rank; ++r) {
    typename L::V bn[U];
    UNROLL for (int u = 0; u < U; ++u) bn[u] = L::load(bt + r * width + n + L::N * u);
    UNROLL for (int j = 0; j < T; ++j) {
      const typename L::V yj = L::broadcast(ys + j * op.rank_total + r);
      UNROLL for (int u = 0; u < U; ++u) acc[j * U + u] = L::fma(yj, bn[u], acc[j * U + u]);
    }
  }
  UNROLL for (int j = 0; j < T; ++j) {
    A* o = op.out + tokens[j] * op.out_stride + col + n;
    UNROLL for (int u = 0; u < U; ++u) L::store(o + L::N * u, L::add(L::load(o + L::N * u), acc[j * U + u]));
  }
}

#if defined(__AVX512F__)
// 16 lanes of float32 from / to 16 elements (the x86-64-v4 build's expand: Lanes16), rounded as store8.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

struct Lanes16 {
  using V = __m512;
  static constexpr int N = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  template <typename E> static V load(const E* p) { return load16(p); }
  template <typename E> static void store(E* p, V v) { store16(p, v); }
};
#endif

#if defined(__AVX512BF16__)
// The shrink of a tile of bfloat16 inputs and weights on CPUs with AVX512-BF16 (built only for
// them): pairs of bf16 products summed into 16 float lanes, 32 inputs a step, no widening.
//   y[j, r] = scale * a[r] . x[j]   (a [R_total, H], x rows ``xs[j]``)
template <int T>
inline void shrink_bf16_pairs(const c10::BFloat16* a, const c10::BFloat16* const* xs, int64_t hidden,
                              int64_t rank_total, float scale, float* y) {
  const int64_t full = hidden - hidden % 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (hidden % 32)) - 1);
  for (int64_t r = 0; r < rank_total; ++r) {
    const c10::BFloat16* w = a + r * hidden;
    __m512 acc[T];
    UNROLL for (int j = 0; j < T; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {
      const __m512bh wk = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + k));
      UNROLL for (int j = 0; j < T; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], wk, reinterpret_cast<__m512bh>(_mm512_loadu_si512(xs[j] + k)));
    }
    if (tail) {
      const __m512bh wk = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(tail, w + full));
      UNROLL for (int j = 0; j < T; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], wk, reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(tail, xs[j] + full)));
    }
    UNROLL for (int j = 0; j < T; ++j) y[j * rank_total + r] = scale * _mm512_reduce_add_ps(acc[j]);
  }
}
#endif

#if defined(__AVX512BF16__)
constexpr int64_t MAX_PAIRED_RANK = 128;  // ranks the bf16-pair expand takes (its y pairs live on the stack)

// The expand of a bfloat16 tile on CPUs with AVX512-BF16: each token's y rounded to bfloat16
// pairs (as vLLM's GPU kernels and the torch ops round it to the weights' dtype), two rank rows of
// B^T interleaved into pairs per output column, dot products of pairs summed into float lanes.
template <int T, int V>
inline void expand_columns_bf16(const Operands<c10::BFloat16, c10::BFloat16>& op, const int64_t* tokens,
                                const c10::BFloat16* bt, int64_t width, int64_t rank, const uint32_t* ypairs,
                                int64_t col, int64_t n) {
  __m512 acc[T * V];
  UNROLL for (int i = 0; i < T * V; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t pairs = rank / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bn[V];
    UNROLL for (int v = 0; v < V; ++v) {
      const c10::BFloat16* lo = bt + (2 * p) * width + n + 16 * v;
      const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + width)));
      bn[v] = reinterpret_cast<__m512bh>(_mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
    }
    UNROLL for (int j = 0; j < T; ++j) {
      const uint32_t pair = ypairs[j * (MAX_PAIRED_RANK / 2) + p];
      const __m512bh yj = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      UNROLL for (int v = 0; v < V; ++v) acc[j * V + v] = _mm512_dpbf16_ps(acc[j * V + v], yj, bn[v]);
    }
  }
  UNROLL for (int j = 0; j < T; ++j) {
    c10::BFloat16* o = op.out + tokens[j] * op.out_stride + col + n;
    UNROLL for (int v = 0; v < V; ++v) store16(o + 16 * v, _mm512_add_ps(load16(o + 16 * v), acc[j * V + v]));
  }
}
#endif

// The shrink of a tile (any dtypes): y[j, r] = scale * A[slot, r] . x[j], the inputs widened to
// float once into ``xf`` [T, H].
template <typename A, typename W, int T>
void shrink_tile(const Operands<A, W>& op, const int64_t* tokens, int64_t slot, float* xf, float* y) {
  constexpr int U = lanes_per_token<T>();
  const int64_t hidden = op.hidden, rank_total = op.rank_total;
  const int64_t vector_end = hidden - hidden % 8;
  for (int j = 0; j < T; ++j) {  // the tile's inputs as float, once
    const A* row = op.x + tokens[j] * op.x_stride;
    float* dst = xf + j * hidden;
    for (int64_t k = 0; k < vector_end; k += 8) _mm256_storeu_ps(dst + k, load8(row + k));
    for (int64_t k = vector_end; k < hidden; ++k) dst[k] = static_cast<float>(row[k]);
  }
  // Shrink: y[j, r] = scale * A[slot, r] . x[j]
  const W* a = op.a + slot * rank_total * hidden;
  for (int64_t r = 0; r < rank_total; ++r) {
    const W* w = a + r * hidden;
    __m256 acc[T * U];  // (loops over the accumulators unroll, which keeps them in registers)
    UNROLL for (int i = 0; i < T * U; ++i) acc[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= hidden; k += 8 * U) {
      UNROLL for (int u = 0; u < U; ++u) {
        const __m256 wk = load8(w + k + 8 * u);
        UNROLL for (int j = 0; j < T; ++j)
          acc[j * U + u] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(xf + j * hidden + k + 8 * u), acc[j * U + u]);
      }
    }
    for (; k < vector_end; k += 8) {
      const __m256 wk = load8(w + k);
      UNROLL for (int j = 0; j < T; ++j) acc[j * U] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(xf + j * hidden + k), acc[j * U]);
    }
    float sums[T];
    UNROLL for (int j = 0; j < T; ++j) {
      __m256 sum = acc[j * U];
      UNROLL for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[j * U + u]);
      sums[j] = hsum(sum);
    }
    for (int j = 0; j < T; ++j) {
      for (int64_t kk = vector_end; kk < hidden; ++kk) sums[j] += static_cast<float>(w[kk]) * xf[j * hidden + kk];
      y[j * rank_total + r] = op.scale * sums[j];
    }
  }
}

// The expand of a tile: out[j, cols of slice i] += y[j, ranks of slice i] @ B_i^T[slot].
template <typename A, typename W, int T>
void expand_tile(const Operands<A, W>& op, const int64_t* tokens, int64_t slot, const float* y) {
  constexpr int U = lanes_per_token<T>();
  const int64_t rank_total = op.rank_total;
  // Expand, slice by slice, 8U output columns at a time, added into the output rows.
  int64_t rank_start = 0, col = op.offset;
  for (size_t i = 0; i < op.b.size(); ++i) {
    const int64_t width = op.widths[i], rank = op.ranks[i];
    const W* bt = op.b[i] + slot * rank * width;  // [R_i, N_i]
    const float* ys = y + rank_start;
    int64_t n = 0;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<A, c10::BFloat16> && std::is_same_v<W, c10::BFloat16>) {
      if (rank % 2 == 0 && rank <= MAX_PAIRED_RANK) {
        uint32_t ypairs[T * (MAX_PAIRED_RANK / 2)];
        for (int j = 0; j < T; ++j)
          for (int64_t p = 0; p < rank / 2; ++p) {
            const c10::BFloat16 lo(ys[j * rank_total + 2 * p]), hi(ys[j * rank_total + 2 * p + 1]);
            ypairs[j * (MAX_PAIRED_RANK / 2) + p] = uint32_t(lo.x) | (uint32_t(hi.x) << 16);
          }
        constexpr int VB = T <= 2 ? 4 : 2;
        for (; n + 16 * VB <= width; n += 16 * VB)
          expand_columns_bf16<T, VB>(op, tokens, bt, width, rank, ypairs, col, n);
        for (; n + 16 <= width; n += 16) expand_columns_bf16<T, 1>(op, tokens, bt, width, rank, ypairs, col, n);
        // the rest of the columns (width % 16) below, in float
      }
    }
#endif
#if defined(__AVX512F__)
    constexpr int V = T <= 2 ? 4 : 2;  // 16-lane registers per token
    for (; n + 16 * V <= width; n += 16 * V) expand_columns<Lanes16, A, W, T, V>(op, tokens, bt, width, rank, ys, col, n);
    for (; n + 16 <= width; n += 16) expand_columns<Lanes16, A, W, T, 1>(op, tokens, bt, width, rank, ys, col, n);
#endif
    for (; n + 8 * U <= width; n += 8 * U) expand_columns<Lanes8, A, W, T, U>(op, tokens, bt, width, rank, ys, col, n);
    for (; n + 8 <= width; n += 8) expand_columns<Lanes8, A, W, T, 1>(op, tokens, bt, width, rank, ys, col, n);
    for (; n < width; ++n) {
      for (int j = 0; j < T; ++j) {
        float sum = 0.f;
        for (int64_t r = 0; r < rank; ++r) sum += ys[j * rank_total + r] * static_cast<float>(bt[r * width + n]);
        A* o = op.out + tokens[j] * op.out_stride + col + n;
        *o = static_cast<A>(static_cast<float>(*o) + sum);
      }
    }
    rank_start += rank;
    col += width;
  }
}

// One tile: T tokens (``tokens``) on one slot. ``xf`` [T, H] and ``y`` [T, R_total] are scratch.
template <typename A, typename W, int T>
void tile(const Operands<A, W>& op, const int64_t* tokens, float* xf, float* y) {
  const int64_t slot = op.slots[tokens[0]];
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<A, c10::BFloat16> && std::is_same_v<W, c10::BFloat16> && T >= 4) {
    const c10::BFloat16* xs[T];
    for (int j = 0; j < T; ++j) xs[j] = op.x + tokens[j] * op.x_stride;
    shrink_bf16_pairs<T>(op.a + slot * op.rank_total * op.hidden, xs, op.hidden, op.rank_total, op.scale, y);
  } else
#endif
  {
    shrink_tile<A, W, T>(op, tokens, slot, xf, y);
  }
  expand_tile<A, W, T>(op, tokens, slot, y);
}

template <typename A, typename W>
void run_tile(const Operands<A, W>& op, const int64_t* tokens, int64_t count, float* xf, float* y) {
  switch (count) {
    case 1: return tile<A, W, 1>(op, tokens, xf, y);
    case 2: return tile<A, W, 2>(op, tokens, xf, y);
    case 3: return tile<A, W, 3>(op, tokens, xf, y);
    case 4: return tile<A, W, 4>(op, tokens, xf, y);
    case 5: return tile<A, W, 5>(op, tokens, xf, y);
    case 6: return tile<A, W, 6>(op, tokens, xf, y);
    case 7: return tile<A, W, 7>(op, tokens, xf, y);
    default: return tile<A, W, TILE>(op, tokens, xf, y);
  }
}

template <typename A, typename W>
void run(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& token_slots,
         const torch::Tensor& lora_a, const std::vector<torch::Tensor>& lora_b_t, double scale, int64_t offset) {
  Operands<A, W> op;
  op.slots = token_slots.data_ptr<int64_t>();
  op.x = x.data_ptr<A>();
  op.x_stride = x.stride(0);
  op.out = out.data_ptr<A>();
  op.out_stride = out.stride(0);
  op.offset = offset;
  op.a = lora_a.data_ptr<W>();
  op.hidden = lora_a.size(2);
  op.rank_total = lora_a.size(1);
  for (const auto& b : lora_b_t) {
    op.b.push_back(b.data_ptr<W>());
    op.ranks.push_back(b.size(1));
    op.widths.push_back(b.size(2));
  }
  op.scale = static_cast<float>(scale);
  // The tokens with an adapter, by slot (stable: a run keeps its order), then tiles of them:
  // (first position in `order`, tokens), all on one slot.
  // (The lists and the tiles' scratch are kept per thread between calls: a decode step makes 120
  // calls, each right after a base GEMM has flushed the caches; a fresh, zeroed allocation per call
  // cost ~2 us of each. Workers capture the caller's lists through the references below.)
  const int64_t num_tokens = token_slots.size(0);
  const int64_t* slots = op.slots;
  thread_local std::vector<int64_t> order_of_this_thread;
  thread_local std::vector<std::pair<int64_t, int64_t>> tiles_of_this_thread;
  std::vector<int64_t>& order = order_of_this_thread;
  std::vector<std::pair<int64_t, int64_t>>& tiles = tiles_of_this_thread;
  order.clear();
  tiles.clear();
  for (int64_t t = 0; t < num_tokens; ++t)
    if (slots[t] >= 0) order.push_back(t);
  std::stable_sort(order.begin(), order.end(), [slots](int64_t a, int64_t b) { return slots[a] < slots[b]; });
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
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> xf, y;  // written before read: never zeroed
    xf.resize(std::max<size_t>(xf.size(), TILE * op.hidden));
    y.resize(std::max<size_t>(y.size(), TILE * op.rank_total));
    for (int64_t i = begin; i < end; ++i)
      run_tile(op, order.data() + tiles[i].first, tiles[i].second, xf.data(), y.data());
  });
}

template <typename A>
void run_for_weights(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& token_slots,
                     const torch::Tensor& lora_a, const std::vector<torch::Tensor>& lora_b_t, double scale,
                     int64_t offset) {
  switch (lora_a.scalar_type()) {
    case at::kFloat: return run<A, float>(out, x, token_slots, lora_a, lora_b_t, scale, offset);
    case at::kBFloat16: return run<A, c10::BFloat16>(out, x, token_slots, lora_a, lora_b_t, scale, offset);
    default: return run<A, c10::Half>(out, x, token_slots, lora_a, lora_b_t, scale, offset);
  }
}

bool supported(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// A layer's weights, checked once (when the wrapper makes the layer's record) and held: a call
// with them checks only the step's tensors. (A decode step makes 120 calls, each right after a
// base GEMM has flushed the caches: converting and checking the weights again cost ~2 us of each.)
struct Layer {
  torch::Tensor lora_a;                 // [S, R_total, H]
  std::vector<torch::Tensor> lora_b_t;  // per slice [S, R_i, N_i]
  int64_t width_total = 0;

  Layer(torch::Tensor a, std::vector<torch::Tensor> b) : lora_a(std::move(a)), lora_b_t(std::move(b)) {
    TORCH_CHECK(lora_a.dim() == 3 && lora_a.is_contiguous(), "lora_a: contiguous [S, R, H]");
    TORCH_CHECK(supported(lora_a.scalar_type()), "weights: float32, bfloat16 or float16");
    int64_t rank_total = 0;
    for (const auto& t : lora_b_t) {
      TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.scalar_type() == lora_a.scalar_type() &&
                  t.size(0) == lora_a.size(0), "lora_b_t: contiguous [S, R_i, N_i] in lora_a's dtype");
      rank_total += t.size(1);
      width_total += t.size(2);
    }
    TORCH_CHECK(rank_total == lora_a.size(1), "the slices' ranks must add up to lora_a's R");
  }
};

// Checks a step's tensors against a layer's weights, then runs it.
void run_layer(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& token_slots, const Layer& layer,
               double scale, int64_t offset) {
  const torch::Tensor& lora_a = layer.lora_a;
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2, "out [T, N], x [T, H]");
  TORCH_CHECK(token_slots.dtype() == torch::kLong && token_slots.is_contiguous(), "token_slots: contiguous int64");
  TORCH_CHECK(x.size(0) >= token_slots.size(0) && out.size(0) >= token_slots.size(0), "fewer rows than tokens");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "rows must be contiguous");
  TORCH_CHECK(x.size(1) == lora_a.size(2), "x and lora_a disagree on H");
  TORCH_CHECK(x.scalar_type() == out.scalar_type(), "x and out: one dtype");
  TORCH_CHECK(supported(x.scalar_type()), "dtypes: float32, bfloat16 or float16");
  TORCH_CHECK(offset >= 0 && offset + layer.width_total <= out.size(1), "columns out of range");
  // Slots are checked, not trusted: a slot past the stacked weights would read another buffer.
  const int64_t* slots = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < token_slots.size(0); ++t)
    TORCH_CHECK(slots[t] >= -1 && slots[t] < lora_a.size(0), "token slot out of range: ", slots[t]);
  switch (x.scalar_type()) {
    case at::kFloat: return run_for_weights<float>(out, x, token_slots, lora_a, layer.lora_b_t, scale, offset);
    case at::kBFloat16:
      return run_for_weights<c10::BFloat16>(out, x, token_slots, lora_a, layer.lora_b_t, scale, offset);
    default: return run_for_weights<c10::Half>(out, x, token_slots, lora_a, layer.lora_b_t, scale, offset);
  }
}

void add_lora_linear(torch::Tensor out, torch::Tensor x, torch::Tensor token_slots, torch::Tensor lora_a,
                     std::vector<torch::Tensor> lora_b_t, double scale, int64_t offset) {
  run_layer(out, x, token_slots, Layer(std::move(lora_a), std::move(lora_b_t)), scale, offset);
}

void add_lora_linear_layer(torch::Tensor out, torch::Tensor x, torch::Tensor token_slots, const Layer& layer,
                           double scale, int64_t offset) {
  run_layer(out, x, token_slots, layer, scale, offset);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_lora_linear", &add_lora_linear, "LoRA for small steps (see the file's Semantics)");
  pybind11::class_<Layer>(m, "Layer", "A layer's weights (lora_a, [lora_b_t per slice]), checked once and held")
      .def(pybind11::init<torch::Tensor, std::vector<torch::Tensor>>());
  m.def("add_lora_linear_layer", &add_lora_linear_layer,
        "add_lora_linear(out, x, token_slots, *layer's weights*, scale, offset) with a Layer");
}
