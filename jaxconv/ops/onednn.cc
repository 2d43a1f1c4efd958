// oneDNN's convolution and batch-normalisation primitives for XLA:CPU, called through the XLA
// FFI (engine "onednn"; jaxconv.ops.native builds this file against the oneDNN wheels,
// jaxconv.ops.cpu_conv and jaxconv.ops.norm call it).
//
// Convolution: one handler computes one pass of a 2-D convolution on the buffers as XLA lays them out:
//   op 0  forward           a = x (N, H, W, C_in), b = w (KH, KW, C_in/G, C_out) -> y (N, Ho, Wo, C_out)
//   op 1  backward data     a = gy,                b = w                       -> gx (N, H, W, C_in)
//   op 2  backward weights  a = x,                 b = gy                      -> gw (KH, KW, C_in/G, C_out)
// Activations are oneDNN's nhwc and the kernel its hwio (G = 1) / hwigo (G > 1) format, so no
// activation is ever copied; oneDNN picks its own weights layout (format any) and the kernel (or
// its gradient) is reordered to and from it per call (a few hundred KB).
//
// Where oneDNN has only its gemm (or reference) forward for a shape, e.g. grouped convs with 4
// channels a group on AVX2, a stride-1 forward is computed as the backward-data pass of the
// transposed problem (flipped kernel, channels swapped per group), which has a direct kernel.
//
// Batch normalisation in training, backward: (x, mean, variance, scale, dy) -> (dx, dscale,
// dshift) over the N, H, W axes of nhwc x, multi-threaded where XLA:CPU runs its fusions on one
// thread; forward (x, scale, shift) -> (y, mean, variance) for bfloat16 x only (float32's
// stays XLA's: see jaxconv/ops/norm.py).
//
// Primitives are created once per shape and cached (a mutex guards the cache; executing a
// primitive is thread-safe); scratchpads are per calling thread. One call runs at a time, on
// as many OpenMP threads as XLA has intra-op threads. float32, or bfloat16 activations and
// kernels on CPUs with AVX512-BF16 (oneDNN computes in float32; the caller computes bf16 in
// float32 on other CPUs); float64 goes elsewhere.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

extern "C" void omp_set_num_threads(int);

namespace {

struct Shape {
  int64_t op, n, h, w, cin, ho, wo, cout, kh, kw, g, sh, sw, dh, dw, pt, pb, pl, pr;
  int64_t bf16;   // operands in bfloat16 (CPUs with AVX512-BF16), else float32
  memory::data_type dt() const {
    return bf16 ? memory::data_type::bf16 : memory::data_type::f32;
  }
  std::string key() const {
    std::string s(sizeof(*this), '\0');
    std::memcpy(s.data(), this, sizeof(*this));
    return s;
  }
};

struct Entry {
  dnnl::primitive prim;
  memory::desc weights;          // the primitive's (diff) weights layout
  memory::desc user_weights;     // hwio / hwigo
  bool reorder;                  // weights layouts differ
  bool flipped;                  // forward as the transposed problem's backward data
  size_t scratch;                // bytes of the primitive's scratchpad
  std::string impl;              // oneDNN's implementation name
};

bool slow(const char* impl) {
  std::string s(impl);
  return s.rfind("x64:gemm", 0) == 0 || s.rfind("ref", 0) == 0;
}

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

Entry make(const Shape& s, bool flip = false) {
  auto f32 = s.dt();
  // the transposed problem of a stride-1 forward: src = y (C_out), dst = x (C_in), the kernel
  // flipped with in/out swapped per group, padding extent - 1 - p on each side
  int64_t cin = flip ? s.cout : s.cin, cout = flip ? s.cin : s.cout;
  int64_t h = flip ? s.ho : s.h, w = flip ? s.wo : s.w, ho = flip ? s.h : s.ho, wo = flip ? s.w : s.wo;
  int64_t eh = (s.kh - 1) * s.dh, ew = (s.kw - 1) * s.dw;
  memory::dims pad_l = flip ? memory::dims{eh - s.pt, ew - s.pl} : memory::dims{s.pt, s.pl};
  memory::dims pad_r = flip ? memory::dims{eh - s.pb, ew - s.pr} : memory::dims{s.pb, s.pr};
  memory::desc src({s.n, cin, h, w}, f32, tag::nhwc);
  memory::desc dst({s.n, cout, ho, wo}, f32, tag::nhwc);
  memory::dims wdims = s.g == 1 ? memory::dims{cout, cin, s.kh, s.kw}
                                : memory::dims{s.g, cout / s.g, cin / s.g, s.kh, s.kw};
  memory::desc user_w(wdims, f32, s.g == 1 ? tag::hwio : tag::hwigo);
  memory::desc any_w(wdims, f32, tag::any);
  memory::dims strides{s.sh, s.sw}, dilates{s.dh - 1, s.dw - 1};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto algo = dnnl::algorithm::convolution_direct;
  Entry e;
  e.user_weights = user_w;
  e.flipped = flip;
  dnnl::convolution_forward::primitive_desc fwd(
      engine(), dnnl::prop_kind::forward_training, algo, src, any_w, dst, strides, dilates,
      pad_l, pad_r, attr);
  if (s.op == 0 && !flip) {
    if (slow(fwd.impl_info_str()) && s.sh == 1 && s.sw == 1 && s.pt <= eh && s.pb <= eh &&
        s.pl <= ew && s.pr <= ew) {
      Entry t = make(s, true);
      if (!slow(t.impl.c_str())) return t;
    }
    e.prim = dnnl::convolution_forward(fwd);
    e.weights = fwd.weights_desc();
    e.scratch = fwd.scratchpad_desc().get_size();
    e.impl = fwd.impl_info_str();
  } else if (s.op == 1 || flip) {
    dnnl::convolution_backward_data::primitive_desc pd(
        engine(), algo, src, any_w, dst, strides, dilates, pad_l, pad_r, fwd, attr);
    e.prim = dnnl::convolution_backward_data(pd);
    e.weights = pd.weights_desc();
    e.scratch = pd.scratchpad_desc().get_size();
    e.impl = pd.impl_info_str();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        engine(), algo, src, any_w, dst, strides, dilates, pad_l, pad_r, fwd, attr);
    e.prim = dnnl::convolution_backward_weights(pd);
    e.weights = pd.diff_weights_desc();
    e.scratch = pd.scratchpad_desc().get_size();
    e.impl = pd.impl_info_str();
  }
  e.reorder = !(e.weights == user_w);
  return e;
}

// w (KH, KW, C_in/G, G*og) -> the transposed problem's hwigo kernel (KH, KW, og, G, C_in/G),
// flipped: t[kh][kw][co][g][ci] = w[KH-1-kh][KW-1-kw][ci][g*og + co] (T: float or bf16 bits)
template <typename T>
void flip_kernel(const Shape& s, const T* w, T* t) {
  int64_t cg = s.cin / s.g, og = s.cout / s.g;
  for (int64_t i = 0; i < s.kh; ++i)
    for (int64_t j = 0; j < s.kw; ++j) {
      const T* src = w + ((s.kh - 1 - i) * s.kw + (s.kw - 1 - j)) * cg * s.cout;
      T* dst = t + (i * s.kw + j) * og * s.g * cg;
      for (int64_t co = 0; co < og; ++co)
        for (int64_t g = 0; g < s.g; ++g)
          for (int64_t ci = 0; ci < cg; ++ci)
            dst[(co * s.g + g) * cg + ci] = src[ci * s.cout + g * og + co];
    }
}

// The primitive (or whatever `make` builds) for `key`, built once: one cache per call site.
template <class Make>
const auto& cached(const std::string& key, Make make) {
  using T = decltype(make());
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<T>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<T>(make());
  return *slot;
}

// Held for each oneDNN call: XLA:CPU runs independent thunks concurrently (an Inception
// module's branches), and two calls at once would each run a team of all the cores' threads.
std::mutex one_call_at_a_time;

// Per-thread growable buffer (64-byte aligned) for scratchpads and reordered weights.
float* buffer(std::vector<float>& v, size_t bytes) {
  size_t n = bytes / sizeof(float) + 16;
  if (v.size() < n) v.resize(n);
  auto p = reinterpret_cast<uintptr_t>(v.data());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                ffi::Result<ffi::AnyBuffer> out, int64_t op, int64_t sh, int64_t sw, int64_t dh,
                int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t groups) {
  auto type = a.element_type();
  if ((type != ffi::DataType::F32 && type != ffi::DataType::BF16) || b.element_type() != type ||
      out->element_type() != type)
    return ffi::Error::InvalidArgument("jaxconv oneDNN conv: float32 or bfloat16 operands");
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || out->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("jaxconv oneDNN conv: expected 4-D operands");
  auto x = op == 1 ? out->dimensions() : a.dimensions();
  auto y = op == 0 ? out->dimensions() : op == 1 ? a.dimensions() : b.dimensions();
  auto w = op == 2 ? out->dimensions() : b.dimensions();
  if (groups < 1 || y[0] != x[0] || w[2] * groups != x[3] || w[3] != y[3] || y[3] % groups)
    return ffi::Error::InvalidArgument(
        "jaxconv oneDNN conv: x (N, H, W, C_in), w (KH, KW, C_in/G, C_out), y (N, Ho, Wo, "
        "C_out) disagree");
  Shape s{op, x[0], x[1], x[2], x[3], y[1], y[2], y[3], w[0], w[1], groups,
          sh, sw, dh, dw, pt, pb, pl, pr, type == ffi::DataType::BF16};
  // oneDNN wants (H + pt + pb - extent) / stride + 1 == Ho exactly: drop the bottom / right
  // rows and columns that no output reads (torch's floor division ignores them too)
  s.pb = (s.ho - 1) * sh + (s.kh - 1) * dh + 1 - s.h - pt;
  s.pr = (s.wo - 1) * sw + (s.kw - 1) * dw + 1 - s.w - pl;
  try {
    const Entry& e = cached(s.key(), [&] { return make(s); });
    std::lock_guard<std::mutex> alone(one_call_at_a_time);
    omp_set_num_threads(static_cast<int>(std::max<int64_t>(1, pool.num_threads())));
    thread_local std::vector<float> scratch_buf, weights_buf, flip_buf;
    dnnl::stream stream(engine());
    void* user_w = op == 2 ? out->untyped_data() : b.untyped_data();
    if (e.flipped) {
      float* t = buffer(flip_buf, e.user_weights.get_size());
      if (s.bf16)
        flip_kernel(s, static_cast<const uint16_t*>(user_w), reinterpret_cast<uint16_t*>(t));
      else
        flip_kernel(s, static_cast<const float*>(user_w), t);
      user_w = t;
    }
    memory user_wm(e.user_weights, engine(), user_w);
    memory wm = e.reorder ? memory(e.weights, engine(), buffer(weights_buf, e.weights.get_size()))
                          : user_wm;
    if (e.reorder && op != 2) dnnl::reorder(user_wm, wm).execute(stream, user_wm, wm);
    memory scratch(dnnl::memory::desc({static_cast<memory::dim>(e.scratch)},
                                      memory::data_type::u8, tag::x),
                   engine(), buffer(scratch_buf, e.scratch));
    auto f32 = s.dt();
    memory xm({{s.n, s.cin, s.h, s.w}, f32, tag::nhwc}, engine(),
              op == 1 ? out->untyped_data() : a.untyped_data());
    memory ym({{s.n, s.cout, s.ho, s.wo}, f32, tag::nhwc}, engine(),
              op == 0 ? out->untyped_data() : op == 1 ? a.untyped_data() : b.untyped_data());
    if (e.flipped)   // y = the transposed problem's diff_src, x its diff_dst
      e.prim.execute(stream, {{DNNL_ARG_DIFF_DST, xm}, {DNNL_ARG_WEIGHTS, wm},
                              {DNNL_ARG_DIFF_SRC, ym}, {DNNL_ARG_SCRATCHPAD, scratch}});
    else if (op == 0)
      e.prim.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym},
                              {DNNL_ARG_SCRATCHPAD, scratch}});
    else if (op == 1)
      e.prim.execute(stream, {{DNNL_ARG_DIFF_DST, ym}, {DNNL_ARG_WEIGHTS, wm},
                              {DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    else
      e.prim.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, ym},
                              {DNNL_ARG_DIFF_WEIGHTS, wm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (e.reorder && op == 2) dnnl::reorder(wm, user_wm).execute(stream, wm, user_wm);
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("jaxconv oneDNN conv: ") + err.what());
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------ batch normalisation

struct Norm {
  dnnl::primitive prim;
  size_t scratch;
};

// Training-mode batch norm over (N, H, W) of nhwc (n, h, w, c) activations of type `dt` with
// float32 scale and shift: the forward (y, mean, biased variance), or the backward (dx, dscale,
// dshift) (the forward's descriptor is its required hint).
Norm make_norm(int64_t n, int64_t h, int64_t w, int64_t c, float eps, memory::data_type dt,
               bool forward) {
  memory::desc x({n, c, h, w}, dt, tag::nhwc);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  dnnl::batch_normalization_forward::primitive_desc fwd(
      engine(), dnnl::prop_kind::forward_training, x, x, eps, flags, attr);
  if (forward)
    return {dnnl::batch_normalization_forward(fwd), fwd.scratchpad_desc().get_size()};
  dnnl::batch_normalization_backward::primitive_desc bwd(
      engine(), dnnl::prop_kind::backward, x, x, x, eps, flags, fwd, attr);
  return {dnnl::batch_normalization_backward(bwd), bwd.scratchpad_desc().get_size()};
}

bool is_activation(int arg) {
  return arg == DNNL_ARG_SRC || arg == DNNL_ARG_DST || arg == DNNL_ARG_DIFF_DST ||
         arg == DNNL_ARG_DIFF_SRC;
}

// args: (oneDNN argument, buffer) pairs, x first; activations nhwc, float32 or bfloat16 (all
// alike), the rest C float32s
ffi::Error Normalise(ffi::ThreadPool pool, float eps, bool forward,
                     std::initializer_list<std::pair<int, ffi::AnyBuffer*>> args) {
  auto type = args.begin()->second->element_type();
  for (auto& [arg, buf] : args)
    if (buf->element_type() != (is_activation(arg) ? type : ffi::DataType::F32) ||
        (type != ffi::DataType::F32 && type != ffi::DataType::BF16))
      return ffi::Error::InvalidArgument(
          "jaxconv oneDNN batch norm: float32 or bfloat16 activations, float32 statistics");
  auto dt = type == ffi::DataType::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
  auto d = args.begin()->second->dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("jaxconv oneDNN batch norm: 4-D x");
  int64_t n = d[0], h = d[1], w = d[2], c = d[3];
  for (auto& [arg, buf] : args)   // oneDNN would read and write past a smaller buffer
    if (static_cast<int64_t>(buf->element_count()) != (is_activation(arg) ? n * h * w * c : c))
      return ffi::Error::InvalidArgument(
          "jaxconv oneDNN batch norm: activations of x's shape, per-channel buffers of C values");
  std::string key(sizeof(int64_t) * 6 + sizeof(float), '\0');
  int64_t dims[6] = {n, h, w, c, type == ffi::DataType::BF16, forward};
  std::memcpy(key.data(), dims, sizeof(dims));
  std::memcpy(key.data() + sizeof(dims), &eps, sizeof(eps));
  try {
    const Norm& e = cached(key, [&] { return make_norm(n, h, w, c, eps, dt, forward); });
    std::lock_guard<std::mutex> alone(one_call_at_a_time);
    omp_set_num_threads(static_cast<int>(std::max<int64_t>(1, pool.num_threads())));
    thread_local std::vector<float> scratch_buf;
    memory::desc act({n, c, h, w}, dt, tag::nhwc);
    memory::desc vec({c}, memory::data_type::f32, tag::x);
    std::unordered_map<int, memory> mems;
    for (auto& [arg, buf] : args)
      mems.emplace(arg, memory(is_activation(arg) ? act : vec, engine(), buf->untyped_data()));
    mems.emplace(DNNL_ARG_SCRATCHPAD,
                 memory(memory::desc({static_cast<memory::dim>(e.scratch)},
                                     memory::data_type::u8, tag::x),
                        engine(), buffer(scratch_buf, e.scratch)));
    dnnl::stream stream(engine());
    e.prim.execute(stream, mems);
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("jaxconv oneDNN batch norm: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error NormBackward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer mean,
                        ffi::AnyBuffer var, ffi::AnyBuffer scale, ffi::AnyBuffer dy,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dscale,
                        ffi::Result<ffi::AnyBuffer> dshift, float eps) {
  return Normalise(pool, eps, false, {{DNNL_ARG_SRC, &x}, {DNNL_ARG_MEAN, &mean},
                                  {DNNL_ARG_VARIANCE, &var}, {DNNL_ARG_SCALE, &scale},
                                  {DNNL_ARG_DIFF_DST, &dy}, {DNNL_ARG_DIFF_SRC, &*dx},
                                  {DNNL_ARG_DIFF_SCALE, &*dscale},
                                  {DNNL_ARG_DIFF_SHIFT, &*dshift}});
}

ffi::Error NormForward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                       ffi::AnyBuffer shift, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> mean, ffi::Result<ffi::AnyBuffer> var,
                       float eps) {
  return Normalise(pool, eps, true, {{DNNL_ARG_SRC, &x}, {DNNL_ARG_SCALE, &scale},
                                     {DNNL_ARG_SHIFT, &shift}, {DNNL_ARG_DST, &*y},
                                     {DNNL_ARG_MEAN, &*mean}, {DNNL_ARG_VARIANCE, &*var}});
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvOnednnConv, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("op")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr")
                                  .Attr<int64_t>("groups"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvOnednnNormBackward, NormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxconvOnednnNormForward, NormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("eps"));
