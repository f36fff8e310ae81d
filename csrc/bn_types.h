// Torch-free types shared by the CPU and CUDA kernels and their bindings.
#pragma once
#include <cstdint>

namespace fastbn {

// 16-bit storage types. Bit-compatible with c10::Half / __half and c10::BFloat16 /
// __nv_bfloat16; the kernels load them as raw bits and convert with bn_math.h.
struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };

// Accumulation type: float for f16/bf16/float, double for double.
template <class T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <class T> using acc_t = typename acc_type<T>::type;

// Memory view of an activation tensor of shape (N, C, *spatial), S = prod(spatial).
//  planar        (NCHW-contiguous):            x[(n * C + c) * S + s]
//  channels_last (NHWC, NDHWC, 2-D (N, C)):    x[(n * S + s) * C + c]   ("rows" of C values)
struct Geometry {
  int64_t N = 0, C = 0, S = 1;
  bool channels_last = false;
  int64_t numel() const { return N * C * S; }
  int64_t count() const { return N * S; }  // values per channel (m)
  int64_t rows() const { return N * S; }   // channels_last: number of rows of C values
};

// Per-channel statistics vectors the kernels read. All pointers are acc_t, length C.
// The scale source is either invstd (train) or the running variance (eval), in which
// case invstd = 1 / sqrt(var + eps) is computed on the fly.
template <class Acc> struct ChannelStats {
  const Acc* mean = nullptr;
  const Acc* scale_src = nullptr;
  bool src_is_var = false;
  Acc eps = 0;
};

// Optional per-channel affine parameters (acc_t, length C); null means weight=1 / bias=0.
template <class Acc> struct Affine {
  const Acc* weight = nullptr;
  const Acc* bias = nullptr;
};

// Running statistics updated in place by a training forward or merge_stats (acc_t, length C;
// mean == nullptr: no update). The update's factor is `momentum`, or 1 / *batches when
// `batches` is set: num_batches_tracked, already incremented for this batch (momentum=None,
// the cumulative average), read on the device.
template <class Acc> struct RunningStats {
  Acc* mean = nullptr;
  Acc* var = nullptr;
  const int64_t* batches = nullptr;
  double momentum = 0.0;
};

}  // namespace fastbn
