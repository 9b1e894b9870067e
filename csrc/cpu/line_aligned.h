// Float buffers aligned to cache lines. std::vector's default alignment is 16 bytes, so every
// 64-byte vector load and store of a kernel's loop over such a buffer straddled two lines.
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace ldmfast::cpu {

template <typename T>
struct LineAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};

using FloatBuffer = std::vector<float, LineAligned<float>>;

}  // namespace ldmfast::cpu
