// jaxconv's own CPU kernels for XLA:CPU, called through the XLA FFI (engine "kernel";
// jaxconv.ops.native builds this file and registers the handlers): a direct grouped /
// depthwise 2-D convolution (jaxconv.ops.cpu_conv) and max pooling's forward with the winning
// tap and its backward (jaxconv.ops.pool; at the end of this file).
//
// Layouts: x (N, H, W, C_in) NHWC, w (KH, KW, C_in/G, C_out) HWIO, y (N, Ho, Wo, C_out).
// Zero padding (lo may be negative: a crop) and input dilation (the input gradient of a
// strided conv) are applied while an input row is prepared, never as a padded copy.
//
// Each output row is computed from the KH prepared input rows it reads, kept in a small
// per-thread cache (consecutive output rows share KH - 1 of them); a row that is all zeros
// (padding, or a hole of the input dilation) is skipped. Every term is a vector multiply-add
// over output channels; how a vector of input values is formed depends on the group width
// (L = SIMD lanes, 16 in fp32; og = C_out/G, cg = C_in/G):
//   kDirect   depthwise (cg == og == 1): the input vector itself
//   kBcast    og a multiple of L (ResNeXt stages 3-4): one input value broadcast
//   kShuffle  og dividing L and the vector's groups reading at most 2L input channels
//             (ResNeXt stages 1-2: 4 or 8 channels a group): one permute of the input span
//   kExpand   anything else: rows prepared as e[q][c][co] = x[q, group(co) * cg + c]
// Sums run over (i, j, c) in order in fp32/fp64 registers; results equal lax's within
// rounding. Work is split over output rows on XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
struct Simd {
  static constexpr int kLanes = 64 / sizeof(T);
  typedef T V __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I
      __attribute__((vector_size(64)));
};

template <typename T>
using V = typename Simd<T>::V;
template <typename T>
using I = typename Simd<T>::I;

template <typename T>
inline V<T> load(const T* p) { return *reinterpret_cast<const V<T>*>(p); }
template <typename T>
inline void store(T* p, V<T> v) { *reinterpret_cast<V<T>*>(p) = v; }
template <typename T>
inline V<T> splat(T s) { return V<T>{} + s; }

enum Mode { kDirect, kBcast, kShuffle, kExpand };

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

struct Geo {
  int64_t n, h, w, cin;          // input
  int64_t kh, kw, cg, cout, og;  // kernel: C_in/G, C_out, C_out/G
  int64_t ho, wo;                // output
  int64_t sh, sw, dh, dw;        // stride, kernel dilation
  int64_t lo_h, lo_w, ld_h, ld_w;  // low padding, input dilation
  int64_t wp;                    // prepared pixels per row
  Mode mode;
  int64_t coutp;                 // C_out rounded up to whole vectors
  int64_t px;                    // values per prepared pixel
};

template <typename T>
Geo make_geo(ffi::AnyBuffer x, ffi::AnyBuffer w, int64_t ho, int64_t wo, int64_t sh,
             int64_t sw, int64_t dh, int64_t dw, int64_t lo_h, int64_t lo_w, int64_t ld_h,
             int64_t ld_w) {
  constexpr int L = Simd<T>::kLanes;
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  Geo g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[2], wd[3], 0, ho, wo,
        sh, sw, dh, dw, lo_h, lo_w, ld_h, ld_w, 0, kExpand, 0, 0};
  g.og = g.cout / (g.cin / g.cg);
  g.wp = (wo - 1) * sw + (g.kw - 1) * dw + 1;
  g.coutp = round_up(g.cout, L);
  if (g.cg == 1 && g.og == 1) g.mode = kDirect;
  else if (g.og % L == 0) g.mode = kBcast;
  else if (L % g.og == 0 && (L / g.og) * g.cg <= 2 * L) g.mode = kShuffle;
  g.px = g.mode == kExpand ? g.cg * g.coutp : g.cin;
  return g;
}

// Source index along one axis of prepared position p, or -1 (padding / dilation hole).
inline int64_t source(int64_t p, int64_t lo, int64_t ld, int64_t n) {
  int64_t s = p - lo;
  if (s < 0 || s % ld != 0) return -1;
  s /= ld;
  return s < n ? s : -1;
}

// Per-thread cache of prepared input rows (row r of image n, in padded coordinates). Each
// row has 2L values of slack at its end: the last vectors may read past the last pixel (into
// lanes that are never stored).
template <typename T>
class Rows {
 public:
  Rows(const T* x, const Geo& g) : x_(x), g_(g) {
    slots_ = (g.kh - 1) * g.dh + 1;
    stride_ = g.wp * g.px + 2 * Simd<T>::kLanes;
    buf_.assign(static_cast<size_t>(slots_ * stride_), T(0));
    key_.assign(slots_, -1);
    if (g.mode == kExpand)
      for (int64_t c = 0; c < g.cg; ++c)
        for (int64_t co = 0; co < g.cout; ++co) idx_.push_back((co / g.og) * g.cg + c);
  }

  // Prepared row r of image n; nullptr if the row is all zeros.
  const T* get(int64_t n, int64_t r) {
    int64_t src = source(r, g_.lo_h, g_.ld_h, g_.h);
    if (src < 0) return nullptr;
    int64_t slot = r % slots_, key = n * (g_.h + 1) + src;
    T* out = buf_.data() + slot * stride_;
    if (key_[slot] != key) {
      prepare(x_ + (n * g_.h + src) * g_.w * g_.cin, out);
      key_[slot] = key;
    }
    return out;
  }

 private:
  void prepare(const T* row, T* out) {
    const Geo& g = g_;
    for (int64_t q = 0; q < g.wp; ++q) {
      T* o = out + q * g.px;
      int64_t s = source(q, g.lo_w, g.ld_w, g.w);
      if (s < 0) {
        std::fill(o, o + g.px, T(0));
      } else if (g.mode != kExpand) {
        std::memcpy(o, row + s * g.cin, g.cin * sizeof(T));
      } else {
        const T* xs = row + s * g.cin;
        for (int64_t c = 0; c < g.cg; ++c)
          for (int64_t co = 0; co < g.cout; ++co)
            o[c * g.coutp + co] = xs[idx_[c * g.cout + co]];
      }
    }
  }

  const T* x_;
  const Geo& g_;
  int64_t slots_, stride_;
  std::vector<T> buf_;
  std::vector<int64_t> key_, idx_;
};

// What a tile needs besides the rows: the per-c permutations of kShuffle.
template <typename T>
struct Perm {
  I<T> idx[64];
  explicit Perm(const Geo& g) {
    constexpr int L = Simd<T>::kLanes;
    if (g.mode != kShuffle) return;
    for (int64_t c = 0; c < g.cg; ++c)
      for (int l = 0; l < L; ++l) idx[c][l] = (l / g.og) * g.cg + c;
  }
};

// The input vector multiplying w[., ., c, co0 : co0 + L] at prepared pixel `px`.
template <typename T, Mode M>
inline V<T> input(const Geo& g, const Perm<T>& perm, const T* px, int64_t c, int64_t co0) {
  constexpr int L = Simd<T>::kLanes;
  if constexpr (M == kDirect) {
    return load(px + co0);
  } else if constexpr (M == kBcast) {
    return splat<T>(px[(co0 / g.og) * g.cg + c]);
  } else if constexpr (M == kShuffle) {
    const T* span = px + (co0 / g.og) * g.cg;
    return __builtin_shuffle(load(span), load(span + L), perm.idx[c]);
  } else {
    return load(px + c * g.coutp + co0);
  }
}

// Forward: P output pixels x NV vectors of output channels starting at (ow0, co0); `w` is
// (KH, KW, cg, coutp), `y` a row of coutp-wide pixels.
template <typename T, int P, int NV, Mode M>
inline void fwd_tile(const Geo& g, const Perm<T>& perm, const T* const* rows, const T* w,
                     T* y, int64_t ow0, int64_t co0) {
  constexpr int L = Simd<T>::kLanes;
  V<T> acc[P][NV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = V<T>{};
  for (int64_t i = 0; i < g.kh; ++i) {
    const T* row = rows[i];
    if (!row) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const T* wij = w + (i * g.kw + j) * g.cg * g.coutp + co0;
      const T* base = row + (ow0 * g.sw + j * g.dw) * g.px;
      for (int64_t c = 0; c < g.cg; ++c) {
        V<T> wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = load(wij + c * g.coutp + v * L);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p)
          for (int v = 0; v < NV; ++v)
            acc[p][v] += input<T, M>(g, perm, base + p * g.sw * g.px, c, co0 + v * L) * wv[v];
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) store(y + (ow0 + p) * g.coutp + co0 + v * L, acc[p][v]);
}

// Depthwise, unit stride and dilation, KW <= 3: the P + KW - 1 input vectors of a tile's
// row are loaded once and shared by the KW taps (one load per output vector and row, not KW).
template <typename T, int P>
inline void dw_tile(const Geo& g, const T* const* rows, const T* w, T* y, int64_t ow0,
                    int64_t co0) {
  constexpr int L = Simd<T>::kLanes;
  V<T> acc[P];
  for (int p = 0; p < P; ++p) acc[p] = V<T>{};
  for (int64_t i = 0; i < g.kh; ++i) {
    const T* row = rows[i];
    if (!row) continue;
    V<T> xv[P + 2];
    for (int q = 0; q < P + g.kw - 1; ++q) xv[q] = load(row + (ow0 + q) * g.px + co0);
    for (int64_t j = 0; j < g.kw; ++j) {
      V<T> wv = load(w + (i * g.kw + j) * g.coutp + co0);
      for (int p = 0; p < P; ++p) acc[p] += xv[p + j] * wv;
    }
  }
  for (int p = 0; p < P; ++p) store(y + (ow0 + p) * g.coutp + co0, acc[p]);
}

template <typename T, Mode M>
void fwd_row(const Geo& g, const Perm<T>& perm, const T* const* rows, const T* w, T* y) {
  constexpr int L = Simd<T>::kLanes;
  constexpr int P = 6;
  int64_t co = 0;
  if constexpr (M == kDirect) {
    if (g.sw == 1 && g.dw == 1 && g.kw <= 3) {
      for (; co < g.coutp; co += L) {
        int64_t ow = 0;
        for (; ow + 8 <= g.wo; ow += 8) dw_tile<T, 8>(g, rows, w, y, ow, co);
        for (; ow < g.wo; ++ow) fwd_tile<T, 1, 1, M>(g, perm, rows, w, y, ow, co);
      }
      return;
    }
  }
  for (; co + 2 * L <= g.coutp; co += 2 * L) {
    int64_t ow = 0;
    for (; ow + P <= g.wo; ow += P) fwd_tile<T, P, 2, M>(g, perm, rows, w, y, ow, co);
    for (; ow < g.wo; ++ow) fwd_tile<T, 1, 2, M>(g, perm, rows, w, y, ow, co);
  }
  for (; co < g.coutp; co += L) {
    int64_t ow = 0;
    for (; ow + 2 * P <= g.wo; ow += 2 * P) fwd_tile<T, 2 * P, 1, M>(g, perm, rows, w, y, ow, co);
    for (; ow < g.wo; ++ow) fwd_tile<T, 1, 1, M>(g, perm, rows, w, y, ow, co);
  }
}

// Runs f(begin, end) over [0, n) in chunks on XLA's intra-op pool and the calling thread.
// The caller claims chunks too, so it finishes even if no pool thread ever picks one up.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t chunks, F& f) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  chunks = std::max<int64_t>(1, std::min(chunks, n));
  if (threads == 1 || chunks == 1) {
    for (int64_t k = 0; k < chunks; ++k) f(k, n * k / chunks, n * (k + 1) / chunks);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, chunks, fp = &f] {
    for (int64_t k; (k = st->next.fetch_add(1)) < chunks;) {
      (*fp)(k, n * k / chunks, n * (k + 1) / chunks);
      st->done.fetch_add(1);
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([work] { work(); });
  work();
  while (st->done.load() < chunks) std::this_thread::yield();
}

// `out` = a copy of `a` (rows of `width` values) with each row zero-padded to `padded` values
// (reusing out's storage: called once per output row of the weight gradient).
template <typename T>
void pad_rows(const T* a, int64_t rows, int64_t width, int64_t padded, std::vector<T>& out) {
  out.assign(rows * padded, T(0));
  for (int64_t r = 0; r < rows; ++r) std::memcpy(&out[r * padded], a + r * width, width * sizeof(T));
}

template <typename T>
void forward(ffi::ThreadPool& pool, const Geo& g, const T* x, const T* w, T* y) {
  const bool tail = g.coutp != g.cout;  // then compute in coutp-wide rows and copy out
  std::vector<T> wpad;
  if (tail) pad_rows(w, g.kh * g.kw * g.cg, g.cout, g.coutp, wpad);
  const T* wk = tail ? wpad.data() : w;
  const Perm<T> perm(g);
  auto body = [&](int64_t, int64_t begin, int64_t end) {
    Rows<T> cache(x, g);
    std::vector<const T*> rows(g.kh);
    std::vector<T> ypad(tail ? g.wo * g.coutp : 0);
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / g.ho, oh = r % g.ho;
      for (int64_t i = 0; i < g.kh; ++i) rows[i] = cache.get(n, oh * g.sh + i * g.dh);
      T* yr = tail ? ypad.data() : y + r * g.wo * g.cout;
      switch (g.mode) {
        case kDirect: fwd_row<T, kDirect>(g, perm, rows.data(), wk, yr); break;
        case kBcast: fwd_row<T, kBcast>(g, perm, rows.data(), wk, yr); break;
        case kShuffle: fwd_row<T, kShuffle>(g, perm, rows.data(), wk, yr); break;
        case kExpand: fwd_row<T, kExpand>(g, perm, rows.data(), wk, yr); break;
      }
      if (tail)
        for (int64_t ow = 0; ow < g.wo; ++ow)
          std::memcpy(y + (r * g.wo + ow) * g.cout, yr + ow * g.coutp, g.cout * sizeof(T));
    }
  };
  parallel_for(pool, g.n * g.ho, 4 * std::max<int64_t>(1, pool.num_threads()), body);
}

// Weight gradient: NC input channels x NV vectors of output channels of tap (i, j), summed
// over one output row (gy: coutp-wide pixels) into dw (cg x coutp).
template <typename T, int NC, int NV, Mode M>
inline void wgrad_tile(const Geo& g, const Perm<T>& perm, const T* row, const T* gy, T* dw,
                       int64_t j, int64_t c0, int64_t co0) {
  constexpr int L = Simd<T>::kLanes;
  V<T> acc[NC][NV];
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < NV; ++v) acc[c][v] = V<T>{};
  for (int64_t ow = 0; ow < g.wo; ++ow) {
    const T* px = row + (ow * g.sw + j * g.dw) * g.px;
    for (int v = 0; v < NV; ++v) {
      V<T> gv = load(gy + ow * g.coutp + co0 + v * L);
      for (int c = 0; c < NC; ++c) acc[c][v] += input<T, M>(g, perm, px, c0 + c, co0 + v * L) * gv;
    }
  }
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < NV; ++v) {
      T* d = dw + (c0 + c) * g.coutp + co0 + v * L;
      store(d, load(d) + acc[c][v]);
    }
}

template <typename T, int NC, Mode M>
void wgrad_row_nc(const Geo& g, const Perm<T>& perm, const T* row, const T* gy, T* dwij,
                  int64_t j) {
  constexpr int L = Simd<T>::kLanes;
  for (int64_t c = 0; c < g.cg; c += NC) {
    int64_t co = 0;
    for (; co + 2 * L <= g.coutp; co += 2 * L)
      wgrad_tile<T, NC, 2, M>(g, perm, row, gy, dwij, j, c, co);
    for (; co < g.coutp; co += L) wgrad_tile<T, NC, 1, M>(g, perm, row, gy, dwij, j, c, co);
  }
}

template <typename T, Mode M>
void wgrad_row(const Geo& g, const Perm<T>& perm, const T* row, const T* gy, T* dwij,
               int64_t j) {
  if (g.cg % 4 == 0) wgrad_row_nc<T, 4, M>(g, perm, row, gy, dwij, j);
  else if (g.cg % 2 == 0) wgrad_row_nc<T, 2, M>(g, perm, row, gy, dwij, j);
  else wgrad_row_nc<T, 1, M>(g, perm, row, gy, dwij, j);
}

template <typename T>
void wgrad(ffi::ThreadPool& pool, const Geo& g, const T* x, const T* gy, T* dw) {
  const bool tail = g.coutp != g.cout;
  const int64_t size = g.kh * g.kw * g.cg * g.coutp;
  const int64_t chunks = std::max<int64_t>(1, std::min(2 * pool.num_threads(), g.n * g.ho));
  const Perm<T> perm(g);
  std::vector<std::vector<T>> partial(chunks);
  auto body = [&](int64_t k, int64_t begin, int64_t end) {
    Rows<T> cache(x, g);
    partial[k].assign(size, T(0));
    T* acc = partial[k].data();
    std::vector<T> gpad;
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / g.ho, oh = r % g.ho;
      const T* gyr = gy + r * g.wo * g.cout;
      if (tail) pad_rows(gyr, g.wo, g.cout, g.coutp, gpad), gyr = gpad.data();
      for (int64_t i = 0; i < g.kh; ++i) {
        const T* row = cache.get(n, oh * g.sh + i * g.dh);
        if (!row) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          T* dwij = acc + (i * g.kw + j) * g.cg * g.coutp;
          switch (g.mode) {
            case kDirect: wgrad_row<T, kDirect>(g, perm, row, gyr, dwij, j); break;
            case kBcast: wgrad_row<T, kBcast>(g, perm, row, gyr, dwij, j); break;
            case kShuffle: wgrad_row<T, kShuffle>(g, perm, row, gyr, dwij, j); break;
            case kExpand: wgrad_row<T, kExpand>(g, perm, row, gyr, dwij, j); break;
          }
        }
      }
    }
  };
  parallel_for(pool, g.n * g.ho, chunks, body);
  for (int64_t e = 0; e < g.kh * g.kw * g.cg; ++e)
    for (int64_t co = 0; co < g.cout; ++co) {
      T s = 0;
      for (auto& p : partial)
        if (!p.empty()) s += p[e * g.coutp + co];
      dw[e * g.cout + co] = s;
    }
}

ffi::Error check(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out) {
  if (x.dimensions().size() != 4 || w.dimensions().size() != 4 ||
      out->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("jaxconv grouped conv: expected 4-D operands");
  if (x.element_type() != w.element_type() || x.element_type() != out->element_type())
    return ffi::Error::InvalidArgument("jaxconv grouped conv: operands differ in dtype");
  auto t = x.element_type();
  if (t != ffi::DataType::F32 && t != ffi::DataType::F64)
    return ffi::Error::InvalidArgument("jaxconv grouped conv: float32 or float64 only");
  return ffi::Error::Success();
}

template <typename T, bool kWgrad>
void run(ffi::ThreadPool& pool, const Geo& g, ffi::AnyBuffer a, ffi::AnyBuffer b,
         ffi::Result<ffi::AnyBuffer> out) {
  if constexpr (kWgrad)
    wgrad<T>(pool, g, a.typed_data<T>(), b.typed_data<T>(), out->typed_data<T>());
  else
    forward<T>(pool, g, a.typed_data<T>(), b.typed_data<T>(), out->typed_data<T>());
}

// Forward: out = conv(a = x, b = w). Weight gradient (kWgrad): out (w's shape) = the gradient of
// conv(x, w) w.r.t. w contracted with b = gy. Attributes: stride, kernel dilation, low padding,
// input dilation.
template <bool kWgrad>
ffi::Error Impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                ffi::Result<ffi::AnyBuffer> out, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                int64_t lo_h, int64_t lo_w, int64_t ld_h, int64_t ld_w) {
  if (auto e = check(a, b, out); e.failure()) return e;
  ffi::AnyBuffer w = kWgrad ? *out : b;
  auto yd = kWgrad ? b.dimensions() : out->dimensions();
  if (a.element_type() == ffi::DataType::F32) {
    Geo g = make_geo<float>(a, w, yd[1], yd[2], sh, sw, dh, dw, lo_h, lo_w, ld_h, ld_w);
    run<float, kWgrad>(pool, g, a, b, out);
  } else {
    Geo g = make_geo<double>(a, w, yd[1], yd[2], sh, sw, dh, dw, lo_h, lo_w, ld_h, ld_w);
    run<double, kWgrad>(pool, g, a, b, out);
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------ max pooling
// Forward: y = the maximum of each window of x (NHWC), won = the window tap (i * KW + j) it
// came from: the first maximum in row-major order, a NaN replacing what came before (torch's
// CPU rule); taps outside the input (padding) never take part, and a window of -inf only keeps
// its first tap inside the input. Backward: dx = each dy added at its window's winning tap.
// Both vectorise over channels and split rows (of the output, of the input) over XLA's threads.
// Values are float, double or bfloat16 (as its 16 bits: compared and summed in float, rounded
// to nearest even once).
struct Window {
  int64_t n, h, w, c, ho, wo, kh, kw, sh, sw, dh, dw, pt, pl;
  // the in-input tap range [lo, hi) of output row/column o along one axis
  static void range(int64_t o, int64_t s, int64_t d, int64_t p, int64_t k, int64_t size,
                    int64_t& lo, int64_t& hi) {
    int64_t start = o * s - p;
    lo = start >= 0 ? 0 : (-start + d - 1) / d;
    hi = std::min<int64_t>(k, size - start > 0 ? (size - start + d - 1) / d : 0);
  }
};

struct Bf16 {
  uint16_t bits;
};

// The arithmetic type of a stored value type, and the conversions between them.
template <typename T> struct Math { using type = T; };
template <> struct Math<Bf16> { using type = float; };
inline float widen(Bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <typename T> inline T widen(T v) { return v; }
template <typename T> inline T narrow(typename Math<T>::type v) {
  if constexpr (std::is_same_v<T, Bf16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    if (v != v) return Bf16{static_cast<uint16_t>((u >> 16) | 0x40)};   // a quiet NaN
    u += 0x7fff + ((u >> 16) & 1);                                       // nearest even
    return Bf16{static_cast<uint16_t>(u >> 16)};
  } else {
    return v;
  }
}

template <typename T>
void pool_forward(ffi::ThreadPool& pool, const Window& g, const T* x, T* y, int32_t* won) {
  using M = typename Math<T>::type;
  auto body = [&](int64_t, int64_t begin, int64_t end) {
    std::vector<M> best(g.c);
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / g.ho, oh = r % g.ho, i0, i1;
      Window::range(oh, g.sh, g.dh, g.pt, g.kh, g.h, i0, i1);
      for (int64_t ow = 0; ow < g.wo; ++ow) {
        int64_t j0, j1;
        Window::range(ow, g.sw, g.dw, g.pl, g.kw, g.w, j0, j1);
        int32_t* wp = won + (r * g.wo + ow) * g.c;
        const int32_t first = static_cast<int32_t>(i0 * g.kw + j0);
        std::fill(best.begin(), best.end(), -std::numeric_limits<M>::infinity());
        std::fill(wp, wp + g.c, first);
        for (int64_t i = i0; i < i1; ++i) {
          int64_t ih = oh * g.sh - g.pt + i * g.dh;
          for (int64_t j = j0; j < j1; ++j) {
            int64_t iw = ow * g.sw - g.pl + j * g.dw;
            const T* xp = x + ((n * g.h + ih) * g.w + iw) * g.c;
            const int32_t tap = static_cast<int32_t>(i * g.kw + j);
            M* bp = best.data();
            for (int64_t c = 0; c < g.c; ++c) {
              M v = widen(xp[c]);
              bool take = v > bp[c] || v != v;
              bp[c] = take ? v : bp[c];
              wp[c] = take ? tap : wp[c];
            }
          }
        }
        T* yp = y + (r * g.wo + ow) * g.c;
        for (int64_t c = 0; c < g.c; ++c) yp[c] = narrow<T>(best[c]);
      }
    }
  };
  parallel_for(pool, g.n * g.ho, 8 * std::max<int64_t>(1, pool.num_threads()), body);
}

// Along one axis of `size` inputs: for input i, the (tap, output) pairs of the windows that
// read it, as hits[first[i] .. first[i + 1]), outputs ascending: sums then run in torch's
// order (its backward adds each output's gradient in turn), so the results are torch's bits.
struct Hits {
  std::vector<int64_t> first;
  std::vector<std::pair<int64_t, int64_t>> hits;
  Hits(int64_t size, int64_t out, int64_t k, int64_t s, int64_t d, int64_t p) : first{0} {
    for (int64_t i = 0; i < size; ++i) {
      for (int64_t t = k - 1; t >= 0; --t) {
        int64_t o = i + p - t * d;   // o * s for the window whose tap t reads input i
        if (o >= 0 && o % s == 0 && o / s < out) hits.emplace_back(t, o / s);
      }
      first.push_back(static_cast<int64_t>(hits.size()));
    }
  }
};

template <typename T>
void pool_backward(ffi::ThreadPool& pool, const Window& g, const T* dy, const int32_t* won,
                   T* dx) {
  // each input element sums, over the windows that read it, dy where it won: written once
  using M = typename Math<T>::type;
  const Hits rows(g.h, g.ho, g.kh, g.sh, g.dh, g.pt), cols(g.w, g.wo, g.kw, g.sw, g.dw, g.pl);
  auto body = [&](int64_t, int64_t begin, int64_t end) {
    std::vector<M> sum(g.c);
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / g.h, ih = r % g.h;
      for (int64_t iw = 0; iw < g.w; ++iw) {
        std::fill(sum.begin(), sum.end(), M(0));
        M* sp = sum.data();
        for (int64_t a = rows.first[ih]; a < rows.first[ih + 1]; ++a) {
          auto [i, oh] = rows.hits[a];
          for (int64_t b = cols.first[iw]; b < cols.first[iw + 1]; ++b) {
            auto [j, ow] = cols.hits[b];
            int64_t o = ((n * g.ho + oh) * g.wo + ow) * g.c;
            const T* dyp = dy + o;
            const int32_t* wp = won + o;
            const int32_t tap = static_cast<int32_t>(i * g.kw + j);
            for (int64_t c = 0; c < g.c; ++c) sp[c] += wp[c] == tap ? widen(dyp[c]) : M(0);
          }
        }
        T* dxp = dx + (r * g.w + iw) * g.c;
        for (int64_t c = 0; c < g.c; ++c) dxp[c] = narrow<T>(sp[c]);
      }
    }
  };
  parallel_for(pool, g.n * g.h, 8 * std::max<int64_t>(1, pool.num_threads()), body);
}

ffi::Error check_pool(ffi::AnyBuffer x, ffi::AnyBuffer y) {
  if (x.dimensions().size() != 4 || y.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("jaxconv max pool: expected 4-D NHWC operands");
  auto t = x.element_type();
  if ((t != ffi::DataType::F32 && t != ffi::DataType::F64 && t != ffi::DataType::BF16) ||
      y.element_type() != t)
    return ffi::Error::InvalidArgument("jaxconv max pool: float32, float64 or bfloat16 only");
  return ffi::Error::Success();
}

Window window(ffi::AnyBuffer x, ffi::AnyBuffer y, int64_t kh, int64_t kw, int64_t sh,
              int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl) {
  auto a = x.dimensions(), b = y.dimensions();
  return {a[0], a[1], a[2], a[3], b[1], b[2], kh, kw, sh, sw, dh, dw, pt, pl};
}

// f(T()) with T the stored value type of `type` (checked by check_pool)
template <typename F>
void by_type(ffi::DataType type, F f) {
  if (type == ffi::DataType::F32) f(float());
  else if (type == ffi::DataType::F64) f(double());
  else f(Bf16());
}

ffi::Error PoolForward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> won, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl) {
  if (auto e = check_pool(x, *y); e.failure()) return e;
  Window g = window(x, *y, kh, kw, sh, sw, dh, dw, pt, pl);
  int32_t* wp = static_cast<int32_t*>(won->untyped_data());
  by_type(x.element_type(), [&](auto t) {
    using T = decltype(t);
    pool_forward<T>(pool, g, static_cast<const T*>(x.untyped_data()),
                    static_cast<T*>(y->untyped_data()), wp);
  });
  return ffi::Error::Success();
}

ffi::Error PoolBackward(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer won,
                        ffi::Result<ffi::AnyBuffer> dx, int64_t kh, int64_t kw, int64_t sh,
                        int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pl) {
  if (auto e = check_pool(*dx, dy); e.failure()) return e;
  Window g = window(*dx, dy, kh, kw, sh, sw, dh, dw, pt, pl);
  const int32_t* wp = static_cast<const int32_t*>(won.untyped_data());
  by_type(dy.element_type(), [&](auto t) {
    using T = decltype(t);
    pool_backward<T>(pool, g, static_cast<const T*>(dy.untyped_data()), wp,
                     static_cast<T*>(dx->untyped_data()));
  });
  return ffi::Error::Success();
}

template <class Binding>
auto pool_attrs(Binding b) {
  return std::move(b).template Attr<int64_t>("kh")
      .template Attr<int64_t>("kw")
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("dh")
      .template Attr<int64_t>("dw")
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pl");
}

auto binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<int64_t>("sh")
      .Attr<int64_t>("sw")
      .Attr<int64_t>("dh")
      .Attr<int64_t>("dw")
      .Attr<int64_t>("lo_h")
      .Attr<int64_t>("lo_w")
      .Attr<int64_t>("ld_h")
      .Attr<int64_t>("ld_w");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvGroupedConv, Impl<false>, binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvGroupedConvWgrad, Impl<true>, binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvMaxPool, PoolForward,
                              pool_attrs(ffi::Ffi::Bind()
                                             .Ctx<ffi::ThreadPool>()
                                             .Arg<ffi::AnyBuffer>()
                                             .Ret<ffi::AnyBuffer>()
                                             .Ret<ffi::AnyBuffer>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvMaxPoolBackward, PoolBackward,
                              pool_attrs(ffi::Ffi::Bind()
                                             .Ctx<ffi::ThreadPool>()
                                             .Arg<ffi::AnyBuffer>()
                                             .Arg<ffi::AnyBuffer>()
                                             .Ret<ffi::AnyBuffer>()));
