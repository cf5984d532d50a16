// The CPU's paged-attention kernel (paged_kernel.py says where it sits and why).
//
// For each packed token t at KV index p of the sequence in row r of the block tables, and each query head
// h (reading KV head h / G):
//
//     s[j]      = cap(scaling * q[t, h] · K[slot(r, j), h / G])      for first[t] <= j <= p
//     out[t, h] = sum_j softmax(s)[j] * V[slot(r, j), h / G]
//
// with slot(r, j) = tables[r, j / block_size] * block_size + j % block_size and cap(x) = softcap *
// tanh(x / softcap) (identity when softcap is 0). Everything runs in float32 and is rounded once into the
// model's dtype. Only the entries a token may see are read: nothing is gathered, masked or padded, and the
// G query heads that share a KV head read each of its keys and values once, together.
//
// A work item is one token's KV heads (or one KV head, when there are too few tokens to share out), its
// entries walked a block at a time; each value row's weighted sum runs per block, then adds to the
// token's float32 sums. The threads take items as they come (a prefill token's context may be hundreds of
// entries, a decode token's a few), and a head's arithmetic never depends on which thread runs it or on
// the other items, so a token's bits are the same alone or in any step (blocks are its own sequence's).
//
// In bfloat16 on a CPU with AVX512-BF16 (the caller says, `bf16_dot`), the scores run on the bf16
// dot-product instruction: each product of two bf16 values is exact in float32, summed in pairs into
// float32 lanes; the generic loop widens every value to float32 first.
//
// Built by paged_kernel.py through inductor's C++ code cache, once per dtype: SCALAR and what
// peftserve/native.h defines (Floats, widen, round_into, total) come before this file, and `kernel` is the
// entry it binds.

#include <torch/csrc/inductor/cpp_prefix.h>

#include <omp.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ATTENTION_BF16_DOT 1
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int kHeads = 8;  // query heads per pass over a KV head's entries (their sums stay in registers)

// out[g * stride] = q[g] · key for `heads` (<= kHeads) float queries `dim` apart, pre-scaled.
template <typename T>
inline void scores_of(const float* q, int heads, const T* key, int64_t dim, float* out, int64_t stride) {
  Floats acc[kHeads];
  std::fill(std::begin(acc), std::begin(acc) + heads, Floats(0));
  for (int64_t d = 0; d < dim; d += kWidth) {
    const int64_t count = std::min(kWidth, dim - d);
    const Floats k = widen(key + d, count);
    for (int g = 0; g < heads; ++g) {
      acc[g] = at::vec::fmadd(Floats::loadu(q + g * dim + d, count), k, acc[g]);
    }
  }
  for (int g = 0; g < heads; ++g) {
    out[g * stride] = total(acc[g]);
  }
}

#ifdef ATTENTION_BF16_DOT
// scores_of for bfloat16 on the bf16 dot-product instruction: `q` holds the heads' bf16 queries as they
// came (`q_head` apart, unscaled), and the sums are scaled after. Built for that instruction set whatever
// the flags of the rest of the file, and called only where the CPU has it.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void scores_bf16_dot(
    const at::BFloat16* q, int64_t q_head, int heads, const at::BFloat16* key, int64_t dim, float scaling,
    float* out, int64_t stride) {
  constexpr int64_t kPairs = 32;  // bf16 values per 512-bit register
  __m512 acc[kHeads];
  std::fill(std::begin(acc), std::begin(acc) + heads, _mm512_setzero_ps());
  for (int64_t d = 0; d < dim; d += kPairs) {
    const int64_t count = std::min(kPairs, dim - d);  // the masked loads read zeros past the end
    const __mmask32 m = count == kPairs ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
    const __m512bh k = (__m512bh)_mm512_maskz_loadu_epi16(m, key + d);
    for (int g = 0; g < heads; ++g) {
      acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_maskz_loadu_epi16(m, q + g * q_head + d), k);
    }
  }
  for (int g = 0; g < heads; ++g) {
    out[g * stride] = _mm512_reduce_add_ps(acc[g]) * scaling;
  }
}
#endif

// One key row's scores for `heads` query heads: on the bf16 dot-product instruction where this build and
// dtype have it and `dot` asks for it (from `q`, the bf16 queries `q_head` apart), else from `qf`, the
// float queries `dim` apart, pre-scaled.
template <typename T>
inline void score(const T* q, int64_t q_head, const float* qf, int heads, const T* key, int64_t dim, float scaling,
                  bool dot, float* out, int64_t stride) {
#ifdef ATTENTION_BF16_DOT
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (dot) {
      scores_bf16_dot(q, q_head, heads, key, dim, scaling, out, stride);
      return;
    }
  }
#endif
  scores_of(qf, heads, key, dim, out, stride);
}

// s[0:n] = softmax(cap(s[0:n])) in place.
inline void softmax(float* s, int64_t n, float softcap) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t w = Vec::size();
  if (softcap != 0.0f) {
    const Vec cap(softcap);
    for (int64_t j = 0; j < n; j += w) {
      const int64_t count = std::min(w, n - j);
      (cap * (Vec::loadu(s + j, count) / cap).tanh()).store(s + j, count);
    }
  }
  const int64_t whole = n - n % w;
  float top = -std::numeric_limits<float>::infinity();
  if (whole) {
    Vec m = Vec::loadu(s);
    for (int64_t j = w; j < whole; j += w) {
      m = at::vec::maximum(m, Vec::loadu(s + j));
    }
    top = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  }
  for (int64_t j = whole; j < n; ++j) {
    top = std::max(top, s[j]);
  }
  Vec sums(0.0f);
  for (int64_t j = 0; j < n; j += w) {
    const int64_t count = std::min(w, n - j);
    const Vec e = (Vec::loadu(s + j, count) - Vec(top)).exp();
    e.store(s + j, count);
    sums += count == w ? e : Vec::set(Vec(0.0f), e, count);
  }
  const Vec scale(1.0f / at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sums));
  for (int64_t j = 0; j < n; j += w) {
    const int64_t count = std::min(w, n - j);
    (Vec::loadu(s + j, count) * scale).store(s + j, count);
  }
}

}  // namespace

// q: [T, Hq, D] with strides (q_token, q_head, 1); keys, values: one layer's pool, [slots, Hkv, D] with
// strides (kv_slot, kv_head, 1); out: [T, Hq, D], contiguous; token_pos, token_row, first: [T]; tables:
// [rows, width], contiguous. softcap: 0 for none. bf16_dot: the CPU has AVX512-BF16 (bfloat16 only).
extern "C" void kernel(const SCALAR* q, int64_t q_token, int64_t q_head, const SCALAR* keys, const SCALAR* values,
                       int64_t kv_slot, int64_t kv_head, SCALAR* out, const int64_t* token_pos,
                       const int64_t* token_row, const int64_t* first, const int64_t* tables, int64_t width,
                       int64_t num_tokens, int64_t num_heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                       float scaling, float softcap, int64_t bf16_dot, int64_t threads) {
  const int64_t group = num_heads / kv_heads;
  // A work item is a token's KV heads, whose entries lie together in each slot's row: a block of the pool is
  // then read front to back. With too few tokens to keep the threads busy, each KV head is an item.
  const int64_t split = num_tokens >= 4 * threads ? 1 : kv_heads, own = kv_heads / split;
  const int64_t items = num_tokens * split, rows = own * group;  // rows: the item's query heads
  const bool dot = bf16_dot != 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
  {
    // per thread: the item's scaled queries, its scores then weights, its outputs' float32 sums
    std::vector<float> qf(rows * dim), s, acc(rows * dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t t = item / split, h0 = item % split * own;
      const int64_t lo = first[t], hi = token_pos[t], n = hi - lo + 1;
      const int64_t* table = tables + token_row[t] * width;
      const SCALAR* q0 = q + t * q_token + h0 * group * q_head;  // the item's first query head
      s.resize(rows * n);  // s[r * n + j - lo]: query head h0 * group + r's score, then weight, of entry j
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t d = 0; d < dim; d += kWidth) {
          const int64_t count = std::min(kWidth, dim - d);
          (widen(q0 + r * q_head + d, count) * Floats(scaling)).store(qf.data() + r * dim + d, count);
        }
      }
      // Calls visit(j, slot) for each visible entry j, a block at a time (first_j, last_j, slot of j = base + j).
      auto each_block = [&](auto&& visit) {
        for (int64_t b = lo / block_size, last = hi / block_size; b <= last; ++b) {
          const int64_t start = b * block_size;
          visit(std::max(lo, start), std::min(hi, start + block_size - 1), table[b] * block_size - start);
        }
      };

      each_block([&](int64_t j0, int64_t j1, int64_t base) {
        for (int64_t hh = 0; hh < own; ++hh) {
          const SCALAR* kh = keys + (h0 + hh) * kv_head;
          for (int64_t g0 = 0; g0 < group; g0 += kHeads) {
            const int heads = static_cast<int>(std::min<int64_t>(kHeads, group - g0));
            const int64_t r = hh * group + g0;
            for (int64_t j = j0; j <= j1; ++j) {
              score(q0 + r * q_head, q_head, qf.data() + r * dim, heads, kh + (base + j) * kv_slot, dim, scaling,
                    dot, s.data() + r * n + j - lo, n);
            }
          }
        }
      });
      for (int64_t r = 0; r < rows; ++r) {
        softmax(s.data() + r * n, n, softcap);
      }

      // out = weights · V: per block, a chunk of the head dimension at a time, kHeads heads' sums in
      // registers, then added to the item's sums
      std::fill(acc.begin(), acc.end(), 0.0f);
      each_block([&](int64_t j0, int64_t j1, int64_t base) {
        for (int64_t hh = 0; hh < own; ++hh) {
          const SCALAR* vh = values + (h0 + hh) * kv_head;
          for (int64_t g0 = 0; g0 < group; g0 += kHeads) {
            const int heads = static_cast<int>(std::min<int64_t>(kHeads, group - g0));
            const int64_t r = hh * group + g0;
            const float* w = s.data() + r * n - lo;
            for (int64_t d = 0; d < dim; d += kWidth) {
              const int64_t count = std::min(kWidth, dim - d);
              Floats sums[kHeads];
              std::fill(std::begin(sums), std::begin(sums) + heads, Floats(0));
              for (int64_t j = j0; j <= j1; ++j) {
                const Floats v = widen(vh + (base + j) * kv_slot + d, count);
                for (int g = 0; g < heads; ++g) {
                  sums[g] = at::vec::fmadd(Floats(w[g * n + j]), v, sums[g]);
                }
              }
              for (int g = 0; g < heads; ++g) {
                float* a = acc.data() + (r + g) * dim + d;
                (Floats::loadu(a, count) + sums[g]).store(a, count);
              }
            }
          }
        }
      });
      SCALAR* o = out + (t * num_heads + h0 * group) * dim;
      for (int64_t i = 0; i < rows * dim; i += kWidth) {
        const int64_t count = std::min(kWidth, rows * dim - i);
        round_into(o + i, Floats::loadu(acc.data() + i, count), count);
      }
    }
  }
}
