// The CPU's low-rank kernel for rows: decode tokens and prefill spans (low_rank_rows.py says where it sits
// and why).
//
// For each row i of a step, with its adapter's factors at stack index[i]:
//
//     y[token_i] = round(y[token_i] + weight_i * (x[token_i] · A[index_i]ᵀ) · Bᵀ[index_i])
//
// in float32, rounded once into the model's dtype, written in place. A row's arithmetic depends on its
// own data only (rows are shared out among the threads whole, and a block of rows keeps each row's sums
// apart), so its bits are the same alone or in any step. Low-rank products are thin: per row, `rank` dot
// products over `in`, then `rank` scaled rows of Bᵀ summed over `out`. Each loop keeps several independent
// accumulators in flight and widens every loaded value once, which is what a generated reduction (one
// accumulator per output) does not do; consecutive rows of one adapter share each load of its factors
// (kBlock), which cut a prefill span's cost from about 48 to 29 us a token over bench-1b's 28 layers in
// bf16 (ad hoc, both kernels in one process).
//
// In bfloat16 on a CPU with AVX512-BF16 (the caller says, `bf16_dot`), the product by A runs on the
// bf16 dot-product instruction: 32 products per instruction, each exact in float32 (a bf16 times a bf16
// fits its mantissa), summed in pairs into float32 lanes with round-to-nearest. Only the order of the
// additions differs from the generic loop, and values below float32's normal range (1e-38) count as
// zero. It cut the compute of bench-1b's 64-row step from 4.3 to 3.2 ms (bench_rows_kernel.py).
//
// Built by low_rank_rows.py through inductor's C++ code cache, once per dtype: SCALAR and what
// peftserve/native.h defines (Floats, widen, round_into, total) come before this file, and `kernel` is the
// entry it binds.

#include <torch/csrc/inductor/cpp_prefix.h>

#include <omp.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ROWS_BF16_DOT 1
#endif

#include <algorithm>
#include <iterator>
#include <type_traits>
#include <vector>

namespace {

// Rows of one adapter run kBlock at a time: each value of its A and Bᵀ loaded once for all of them. Each
// (row, output) keeps its own accumulator, summed in the same order whatever the block, so a row's bits
// are the same in any block (a prefill span's token has the bits it has alone). Blocks of 6 or 8 rows (with
// half the ranks or outputs per pass, to keep the accumulators in registers) were slower than 4.
constexpr int kBlock = 4;

// h[b * rank + r] = weight[b] * (x[b] · a[r]) for the B rows x[b] and r < rank (a multiple of 4): Q rows of A
// per pass over the block's rows of x (four, or two beside 3-4 rows: 2 * B * Q vectors of accumulators).
template <typename T, int B>
void shrink(const T* const* x, const T* a, const float* weight, int64_t in, int64_t rank, float* h) {
  constexpr int Q = B <= 2 ? 4 : 2;
  for (int64_t r = 0; r < rank; r += Q) {
    const T* a0 = a + r * in;
    Floats acc[B][Q];
    for (auto& row : acc) {
      std::fill(std::begin(row), std::end(row), Floats(0));
    }
    for (int64_t k = 0; k < in; k += kWidth) {
      const int64_t count = std::min(kWidth, in - k);  // the masked loads read zeros past the end
      Floats ak[Q];
      for (int q = 0; q < Q; ++q) {
        ak[q] = widen(a0 + q * in + k, count);
      }
      for (int b = 0; b < B; ++b) {
        const Floats xk = widen(x[b] + k, count);
        for (int q = 0; q < Q; ++q) {
          acc[b][q] = at::vec::fmadd(ak[q], xk, acc[b][q]);
        }
      }
    }
    for (int b = 0; b < B; ++b) {
      for (int q = 0; q < Q; ++q) {
        h[b * rank + r + q] = total(acc[b][q]) * weight[b];
      }
    }
  }
}

#ifdef ROWS_BF16_DOT
// shrink for bfloat16 on the dot-product instruction (the header says how it rounds), four rows of A per
// pass; built for that instruction set whatever the flags of the rest of the file, and called only where
// the CPU has it.
template <int B>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void shrink_bf16_dot(
    const at::BFloat16* const* x, const at::BFloat16* a, const float* weight, int64_t in, int64_t rank,
    float* h) {
  constexpr int64_t kPairs = 32;  // bf16 values per 512-bit register
  constexpr int Q = 4;
  for (int64_t r = 0; r < rank; r += Q) {
    const at::BFloat16* a0 = a + r * in;
    __m512 acc[B][Q];
    for (auto& row : acc) {
      std::fill(std::begin(row), std::end(row), _mm512_setzero_ps());
    }
    for (int64_t k = 0; k < in; k += kPairs) {
      const int64_t count = std::min(kPairs, in - k);  // the masked loads read zeros past the end
      const __mmask32 m = count == kPairs ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
      __m512bh ak[Q];
      for (int q = 0; q < Q; ++q) {
        ak[q] = (__m512bh)_mm512_maskz_loadu_epi16(m, a0 + q * in + k);
      }
      for (int b = 0; b < B; ++b) {
        const __m512bh xk = (__m512bh)_mm512_maskz_loadu_epi16(m, x[b] + k);
        for (int q = 0; q < Q; ++q) {
          acc[b][q] = _mm512_dpbf16_ps(acc[b][q], xk, ak[q]);
        }
      }
    }
    for (int b = 0; b < B; ++b) {
      for (int q = 0; q < Q; ++q) {
        h[b * rank + r + q] = _mm512_reduce_add_ps(acc[b][q]) * weight[b];
      }
    }
  }
}
#endif

// shrink on the instruction `bf16_dot` asks for, where this build and dtype have it.
template <typename T, int B>
inline void shrink_rows(const T* const* x, const T* a, const float* weight, int64_t in, int64_t rank, float* h,
                        bool bf16_dot) {
#ifdef ROWS_BF16_DOT
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (bf16_dot) {
      shrink_bf16_dot<B>(x, a, weight, in, rank, h);
      return;
    }
  }
#endif
  shrink<T, B>(x, a, weight, in, rank, h);
}

// y[b][o] = round(y[b][o] + sum_r h[b * rank + r] * bt[r, o]) for the B rows y[b]: two vectors of outputs
// per pass over the rank.
template <typename T, int B>
void expand(const float* h, const T* bt, T* const* y, int64_t out, int64_t rank) {
  int64_t o = 0;
  for (; o + 2 * kWidth <= out; o += 2 * kWidth) {
    Floats acc[B][2];
    for (auto& row : acc) {
      std::fill(std::begin(row), std::end(row), Floats(0));
    }
    for (int64_t r = 0; r < rank; ++r) {
      const Floats b0 = widen(bt + r * out + o), b1 = widen(bt + r * out + o + kWidth);
      for (int b = 0; b < B; ++b) {
        const Floats hr(h[b * rank + r]);
        acc[b][0] = at::vec::fmadd(hr, b0, acc[b][0]);
        acc[b][1] = at::vec::fmadd(hr, b1, acc[b][1]);
      }
    }
    for (int b = 0; b < B; ++b) {
      round_into(y[b] + o, widen(y[b] + o) + acc[b][0]);
      round_into(y[b] + o + kWidth, widen(y[b] + o + kWidth) + acc[b][1]);
    }
  }
  for (; o < out; o += kWidth) {
    const int64_t count = std::min(kWidth, out - o);
    Floats acc[B];
    std::fill(std::begin(acc), std::end(acc), Floats(0));
    for (int64_t r = 0; r < rank; ++r) {
      const Floats br = widen(bt + r * out + o, count);
      for (int b = 0; b < B; ++b) {
        acc[b] = at::vec::fmadd(Floats(h[b * rank + r]), br, acc[b]);
      }
    }
    for (int b = 0; b < B; ++b) {
      round_into(y[b] + o, widen(y[b] + o, count) + acc[b], count);
    }
  }
}

// The B rows token[0..B) of one adapter, whose factors are a [rank, in] and bt [rank, out]; h: B * rank floats.
template <typename T, int B>
void block(const T* x, int64_t x_stride, T* y, int64_t y_stride, const int64_t* token, const float* weight,
           const T* a, const T* bt, int64_t rank, int64_t in, int64_t out, bool bf16_dot, float* h) {
  const T* xs[B];
  T* ys[B];
  for (int b = 0; b < B; ++b) {
    xs[b] = x + token[b] * x_stride;
    ys[b] = y + token[b] * y_stride;
  }
  shrink_rows<T, B>(xs, a, weight, in, rank, h, bf16_dot);
  expand<T, B>(h, bt, ys, out, rank);
}

// block for a run of `count` rows (1 to kBlock), each size its own build.
template <typename T>
void block_of(int64_t count, const T* x, int64_t x_stride, T* y, int64_t y_stride, const int64_t* token,
              const float* weight, const T* a, const T* bt, int64_t rank, int64_t in, int64_t out, bool bf16_dot,
              float* h) {
  static_assert(kBlock == 4, "one case per block size");
  switch (count) {
    case 4:
      return block<T, 4>(x, x_stride, y, y_stride, token, weight, a, bt, rank, in, out, bf16_dot, h);
    case 3:
      return block<T, 3>(x, x_stride, y, y_stride, token, weight, a, bt, rank, in, out, bf16_dot, h);
    case 2:
      return block<T, 2>(x, x_stride, y, y_stride, token, weight, a, bt, rank, in, out, bf16_dot, h);
    default:
      return block<T, 1>(x, x_stride, y, y_stride, token, weight, a, bt, rank, in, out, bf16_dot, h);
  }
}

// What a row costs when its adapter's factors come from memory (the row before it had another adapter),
// next to a row that finds them in cache and shares their loads with its block: 64 bf16 rows over 51
// adapters took 8.6 ms at bench-1b, over one adapter 2.0 ms (benchmarks/bench_rows_kernel.py), so about
// 4.2 to 1, rounded to 4.
constexpr int64_t kFetchCost = 4;

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

// The end of the block that starts at row i: up to kBlock rows of index[i] before `end`.
int64_t block_end(const int64_t* index, int64_t i, int64_t end) {
  int64_t next = i + 1;
  while (next < end && next - i < kBlock && index[next] == index[i]) {
    ++next;
  }
  return next;
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
    std::vector<float> h(kBlock * rank);
    for (int64_t i = share_start(cost, index, me, team), next; i < end; i = next) {
      next = block_end(index, i, end);
      block_of(next - i, x, x_stride, y, y_stride, token + i, weight + i, a + index[i] * rank * in,
               bt + index[i] * rank * out, rank, in, out, bf16_dot != 0, h.data());
    }
  }
}
