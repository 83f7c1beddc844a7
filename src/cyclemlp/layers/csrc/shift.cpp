// Cycle FC's shift in one pass over memory: out[b, y, x, c] = in[b, y + dy_c, x + dx_c, c], zero
// where the source lies outside the grid. Channels-last (B, H, W, C) in and out.
//
// Both offset patterns give only a few distinct offsets (3 for stepsize 3), so every output pixel
// reads at most that many source pixels. The kernel points one pointer at each (or at a row of
// zeros when it lies outside), loads all of them for every channel and keeps the one the channel
// selects. The loads are unconditional and the select is a compare and blend, so the compiler
// vectorises the channel loop; the pixels it reads sit next to each other in cache, so the
// memory traffic is one read of the input and one write of the output, as for a copy.
//
// The kernel moves bits: elements are handled as unsigned integers of their size, so every dtype
// of 1, 2, 4 or 8 bytes is shifted exactly (signed zeros, NaN payloads and all). The adjoint of a
// shift is the shift by the negated offsets, so the same kernel serves the backward pass.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CYCLEMLP_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CYCLEMLP_CLONES
#endif

namespace {

constexpr int kMaxDistinct = 16;

// One output row of W pixels. rows[k]: the source row of distinct offset k, or `zeros` when that
// row lies outside the grid; dx[k]: its column offset; sel[c]: the offset channel c reads at.
template <typename T, int K>
CYCLEMLP_CLONES void shift_row(T* __restrict out, const T* const* rows, const int* dx, const int* __restrict sel,
                               const T* zeros, int64_t width, int64_t channels) {
  for (int64_t x = 0; x < width; ++x) {
    const T* __restrict src[K];
    for (int k = 0; k < K; ++k) {
      const int64_t sx = x + dx[k];
      src[k] = (rows[k] != zeros && sx >= 0 && sx < width) ? rows[k] + sx * channels : zeros;
    }
    T* __restrict o = out + x * channels;
    for (int64_t c = 0; c < channels; ++c) {
      T v = src[0][c];
      const int m = sel[c];
#pragma GCC unroll 16
      for (int k = 1; k < K; ++k) {
        const T w = src[k][c];
        v = m == k ? w : v;
      }
      o[c] = v;
    }
  }
}

// Any number of distinct offsets: a plain per-channel gather.
template <typename T>
void shift_row_any(T* out, const T* const* rows, const int* dx, const int* sel, const T* zeros, int64_t width,
                   int64_t channels) {
  for (int64_t x = 0; x < width; ++x) {
    for (int64_t c = 0; c < channels; ++c) {
      const int k = sel[c];
      const int64_t sx = x + dx[k];
      out[x * channels + c] = (rows[k] != zeros && sx >= 0 && sx < width) ? rows[k][sx * channels + c] : T(0);
    }
  }
}

template <typename T>
using RowFn = void (*)(T*, const T* const*, const int*, const int*, const T*, int64_t, int64_t);

template <typename T>
RowFn<T> row_kernel(int distinct) {
  switch (distinct) {
    case 1: return shift_row<T, 1>;
    case 2: return shift_row<T, 2>;
    case 3: return shift_row<T, 3>;
    case 4: return shift_row<T, 4>;
    case 5: return shift_row<T, 5>;
    case 6: return shift_row<T, 6>;
    case 7: return shift_row<T, 7>;
    case 8: return shift_row<T, 8>;
    case 9: return shift_row<T, 9>;
    default: return shift_row_any<T>;
  }
}

template <typename T>
void run(const at::Tensor& x, at::Tensor& out, const std::vector<int>& dy, const std::vector<int>& dx,
         const std::vector<int>& sel) {
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  const int distinct = static_cast<int>(dy.size());
  const T* in = static_cast<const T*>(x.const_data_ptr());
  T* dst = static_cast<T*>(out.mutable_data_ptr());
  const std::vector<T> zeros(static_cast<size_t>(channels), T(0));
  const RowFn<T> kernel = distinct <= kMaxDistinct ? row_kernel<T>(distinct) : shift_row_any<T>;
  const int64_t row_elements = std::max<int64_t>(1, width * channels);
  const int64_t grain = std::max<int64_t>(1, 32768 / row_elements);  // about 32k elements per task
  at::parallel_for(0, batch * height, grain, [&](int64_t begin, int64_t end) {
    std::vector<const T*> rows(static_cast<size_t>(distinct));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / height, y = r % height;
      for (int k = 0; k < distinct; ++k) {
        const int64_t sy = y + dy[k];
        rows[k] = (sy >= 0 && sy < height) ? in + (b * height + sy) * width * channels : zeros.data();
      }
      kernel(dst + r * width * channels, rows.data(), dx.data(), sel.data(), zeros.data(), width, channels);
    }
  });
}

at::Tensor shift(const at::Tensor& input, const at::Tensor& offsets) {
  TORCH_CHECK(input.dim() == 4, "cyclemlp::shift expects a channels-last (B, H, W, C) tensor; got ", input.dim(),
              "-D input of shape ", input.sizes());
  TORCH_CHECK(input.device().is_cpu(), "cyclemlp::shift runs on the CPU; got a tensor on ", input.device());
  const int64_t channels = input.size(3);
  TORCH_CHECK(offsets.dim() == 2 && offsets.size(0) == channels && offsets.size(1) == 2,
              "cyclemlp::shift needs one (dy, dx) offset per channel, a (", channels, ", 2) tensor; got shape ",
              offsets.sizes());
  const at::Tensor table = offsets.to(at::kCPU, at::kInt).contiguous();
  const int* pairs = table.const_data_ptr<int>();
  std::vector<int> dy, dx, sel(static_cast<size_t>(channels));
  for (int64_t c = 0; c < channels; ++c) {
    size_t k = 0;
    while (k < dy.size() && !(dy[k] == pairs[2 * c] && dx[k] == pairs[2 * c + 1])) ++k;
    if (k == dy.size()) {
      dy.push_back(pairs[2 * c]);
      dx.push_back(pairs[2 * c + 1]);
    }
    sel[static_cast<size_t>(c)] = static_cast<int>(k);
  }
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  switch (x.element_size()) {
    case 1: run<uint8_t>(x, out, dy, dx, sel); break;
    case 2: run<uint16_t>(x, out, dy, dx, sel); break;
    case 4: run<uint32_t>(x, out, dy, dx, sel); break;
    case 8: run<uint64_t>(x, out, dy, dx, sel); break;
    default: TORCH_CHECK(false, "cyclemlp::shift: unsupported element size ", x.element_size(), " of ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(cyclemlp, m) {
  m.def("shift(Tensor x, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(cyclemlp, CPU, m) {
  m.impl("shift", &shift);
}
