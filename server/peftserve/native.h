// What our C++ kernels share: float32 vectors of values in the model's dtype. peftserve/native.py puts
// this before each kernel's source, after SCALAR's definition; at::vec comes from inductor's prefix header.

#include <torch/csrc/inductor/cpp_prefix.h>

#include <algorithm>
#include <type_traits>

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

// Stores the first `count` values, rounded into T.
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

}  // namespace
