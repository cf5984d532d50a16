// The CPU's low-rank kernel for decode rows (low_rank_rows.py says where it sits and why).
//
// For each row i of a step, with its adapter's factors at stack index[i]:
//
//     y[token_i] = round(y[token_i] + weight_i * (x[token_i] · A[index_i]ᵀ) · Bᵀ[index_i])
//
// in float32, rounded once into the model's dtype, written in place. A row's arithmetic depends on its
// own data only (rows are shared out among the threads whole), so its bits are the same alone or in any
// step. Low-rank products are thin: per row, `rank` dot products over `in`, then `rank` scaled rows
// of Bᵀ summed over `out`. Each loop keeps several independent accumulators in flight and widens every
// loaded value once, which is what a generated reduction (one accumulator per output) does not do.
//
// In bfloat16 on a CPU with AVX512-BF16 (the caller says, `bf16_dot`), the product by A runs on the
// bf16 dot-product instruction: 32 products per instruction, each exact in float32 (a bf16 times a bf16
// fits its mantissa), summed in pairs into float32 lanes with round-to-nearest. Only the order of the
// additions differs from the generic loop, and values below float32's normal range (1e-38) count as
// zero. It cut the compute of bench-1b's 64-row step from 4.3 to 3.2 ms (bench_rows_kernel.py).
//
// Built by low_rank_rows.py through inductor's C++ code cache, once per dtype: SCALAR is defined before
// this file, at::vec comes from inductor's prefix header, and `kernel` is the entry it binds.

#include <torch/csrc/inductor/cpp_prefix.h>

#include <omp.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ROWS_BF16_DOT 1
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using Floats = at::vec::VectorizedN<float, 2>;
constexpr int64_t kWidth = Floats::size();

// Loads `count` values as floats, zeros after them (VectorizedN's own masked load fills with ones).
template <typename T>
inline Floats widen(const T* p, int64_t count = kWidth) {
  if constexpr (std::is_same_v<T, float>) {
    using Half = at::vec::Vectorized<float>;
    Floats v;
    v[0] = Half::loadu(p, std::min(count, int64_t{Half::size()}));
    v[1] = count > Half::size() ? Half::loadu(p + Half::size(), count - Half::size()) : Half(0);
    return v;
  } else {
    return at::vec::convert<float, 2, T, 1>(at::vec::Vectorized<T>::loadu(p, count));
  }
}

template <typename T>
inline void round_into(T* p, const Floats& v, int64_t count = kWidth) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, count);
  } else {
    at::vec::convert<T, 1, float, 2>(v).store(p, count);
  }
}

inline float total(const Floats& v) {
  return at::vec::vec_reduce_all<float, 2>(
      [](at::vec::Vectorized<float>& a, at::vec::Vectorized<float>& b) { return a + b; }, v);
}

// h[r] = weight * (x · a[r]) for r < rank (a multiple of 4): four rows of A per pass over x.
template <typename T>
void shrink(const T* x, const T* a, float weight, int64_t in, int64_t rank, float* h) {
  for (int64_t r = 0; r < rank; r += 4) {
    const T* a0 = a + r * in;
    Floats acc0(0), acc1(0), acc2(0), acc3(0);
    for (int64_t k = 0; k < in; k += kWidth) {
      const int64_t count = std::min(kWidth, in - k);  // the masked loads read zeros past the end
      const Floats xk = widen(x + k, count);
      acc0 = at::vec::fmadd(widen(a0 + k, count), xk, acc0);
      acc1 = at::vec::fmadd(widen(a0 + in + k, count), xk, acc1);
      acc2 = at::vec::fmadd(widen(a0 + 2 * in + k, count), xk, acc2);
      acc3 = at::vec::fmadd(widen(a0 + 3 * in + k, count), xk, acc3);
    }
    h[r] = total(acc0) * weight;
    h[r + 1] = total(acc1) * weight;
    h[r + 2] = total(acc2) * weight;
    h[r + 3] = total(acc3) * weight;
  }
}

#ifdef ROWS_BF16_DOT
// shrink for bfloat16 on the dot-product instruction (the header says how it rounds); built for that
// instruction set whatever the flags of the rest of the file, and called only where the CPU has it.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void shrink_bf16_dot(
    const at::BFloat16* x, const at::BFloat16* a, float weight, int64_t in, int64_t rank, float* h) {
  constexpr int64_t kPairs = 32;  // bf16 values per 512-bit register
  for (int64_t r = 0; r < rank; r += 4) {
    const at::BFloat16* a0 = a + r * in;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += kPairs) {
      const int64_t count = std::min(kPairs, in - k);  // the masked loads read zeros past the end
      const __mmask32 m = count == kPairs ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
      const __m512bh xk = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
      acc0 = _mm512_dpbf16_ps(acc0, xk, (__m512bh)_mm512_maskz_loadu_epi16(m, a0 + k));
      acc1 = _mm512_dpbf16_ps(acc1, xk, (__m512bh)_mm512_maskz_loadu_epi16(m, a0 + in + k));
      acc2 = _mm512_dpbf16_ps(acc2, xk, (__m512bh)_mm512_maskz_loadu_epi16(m, a0 + 2 * in + k));
      acc3 = _mm512_dpbf16_ps(acc3, xk, (__m512bh)_mm512_maskz_loadu_epi16(m, a0 + 3 * in + k));
    }
    h[r] = _mm512_reduce_add_ps(acc0) * weight;
    h[r + 1] = _mm512_reduce_add_ps(acc1) * weight;
    h[r + 2] = _mm512_reduce_add_ps(acc2) * weight;
    h[r + 3] = _mm512_reduce_add_ps(acc3) * weight;
  }
}
#endif

// h[r] = weight * (x · a[r]) on the instruction `bf16_dot` asks for, where this build and dtype have it.
template <typename T>
inline void shrink_row(const T* x, const T* a, float weight, int64_t in, int64_t rank, float* h,
                       bool bf16_dot) {
#ifdef ROWS_BF16_DOT
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (bf16_dot) {
      shrink_bf16_dot(x, a, weight, in, rank, h);
      return;
    }
  }
#endif
  shrink(x, a, weight, in, rank, h);
}

// y[o] = round(y[o] + sum_r h[r] * bt[r, o]): two vectors of outputs per pass over the rank.
template <typename T>
void expand(const float* h, const T* bt, T* y, int64_t out, int64_t rank) {
  int64_t o = 0;
  for (; o + 2 * kWidth <= out; o += 2 * kWidth) {
    Floats acc0(0), acc1(0);
    for (int64_t r = 0; r < rank; ++r) {
      const Floats hr(h[r]);
      acc0 = at::vec::fmadd(hr, widen(bt + r * out + o), acc0);
      acc1 = at::vec::fmadd(hr, widen(bt + r * out + o + kWidth), acc1);
    }
    round_into(y + o, widen(y + o) + acc0);
    round_into(y + o + kWidth, widen(y + o + kWidth) + acc1);
  }
  for (; o < out; o += kWidth) {
    const int64_t count = std::min(kWidth, out - o);
    Floats acc(0);
    for (int64_t r = 0; r < rank; ++r) {
      acc = at::vec::fmadd(Floats(h[r]), widen(bt + r * out + o, count), acc);
    }
    round_into(y + o, widen(y + o, count) + acc, count);
  }
}

// What a row costs when its adapter's factors come from memory (the row before it had another adapter),
// next to a row that finds them in cache: 64 bf16 rows over 51 adapters took 9.7 ms at bench-1b, over
// one adapter 4.1 ms (benchmarks/bench_rows_kernel.py), so about 2.7 to 1, rounded to 3.
constexpr int64_t kFetchCost = 3;

// cost[i]: the summed cost of rows before i (cost[n] is the total).
std::vector<int64_t> running_cost(const int64_t* index, int64_t n) {
  std::vector<int64_t> cost(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    cost[i + 1] = cost[i] + (i == 0 || index[i] != index[i - 1] ? kFetchCost : 1);
  }
  return cost;
}

// The first row of share `k` of `shares`: consecutive rows, each share about the same cost. A cut that
// falls fewer than kFetchCost rows before the end of a run of one adapter moves to its end, so that
// both sides do not fetch the same factors; a longer run (a prefill span) is cut where it falls.
int64_t share_start(const std::vector<int64_t>& cost, const int64_t* index, int64_t k, int64_t shares) {
  const int64_t n = static_cast<int64_t>(cost.size()) - 1;
  const int64_t cut = std::lower_bound(cost.begin(), cost.end() - 1, cost.back() * k / shares) - cost.begin();
  int64_t end = cut;  // the end of the run the cut falls in
  while (end > 0 && end < n && index[end] == index[end - 1]) {
    ++end;
  }
  return end - cut < kFetchCost ? end : cut;
}

}  // namespace

// x: [T, in] rows x_stride apart; y: [T, out] rows y_stride apart, updated in place; token, index, weight:
// [n] each; a: [capacity, rank, in] and bt: [capacity, rank, out], contiguous. Rows come grouped by
// index, and each thread takes a run of them of about equal cost (a plain even split of the rows gave
// one thread all of a prefill span's cached rows and the other every fetch). bf16_dot: the CPU has
// AVX512-BF16 (used for bfloat16 only).
extern "C" void kernel(const SCALAR* x, int64_t x_stride, SCALAR* y, int64_t y_stride, const int64_t* token,
                       const int64_t* index, const float* weight, int64_t n, const SCALAR* a, const SCALAR* bt,
                       int64_t rank, int64_t in, int64_t out, int64_t bf16_dot, int64_t threads) {
  const std::vector<int64_t> cost = running_cost(index, n);
#pragma omp parallel num_threads(threads) if (threads > 1 && n > 1)
  {
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t end = share_start(cost, index, me + 1, team);
    std::vector<float> h(rank);
    for (int64_t i = share_start(cost, index, me, team); i < end; ++i) {
      shrink_row(x + token[i] * x_stride, a + index[i] * rank * in, weight[i], in, rank, h.data(),
                 bf16_dot != 0);
      expand(h.data(), bt + index[i] * rank * out, y + token[i] * y_stride, out, rank);
    }
  }
}
