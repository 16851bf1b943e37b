// oneDNN kernels as typed XLA FFI handlers: the CPU fast path of cnnjax/kernels.py.
//
// Convolution (forward with bias and an optional fused ReLU, input gradient, kernel
// and bias gradients), max pooling and cross-channel LRN (forward with a workspace,
// backward from it), all float32 on XLA's own buffers (NHWC activations, HWIO
// kernels): no copies in or out. Primitives are built once per shape and cached;
// each call wraps XLA's pointers in oneDNN memory objects and runs on the calling
// thread (oneDNN's own OpenMP threads do the work).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using Dims = memory::dims;
constexpr auto kF32 = memory::data_type::f32;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// A per-thread, 64-byte aligned, grow-only buffer: scratchpads and reordered weights.
class Scratch {
 public:
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, size_);
    }
    return data_;
  }
  ~Scratch() { std::free(data_); }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Slot 0: primitives' scratchpads; slot 1: a kernel in oneDNN's layout.
Scratch& ScratchSlot(int slot) {
  thread_local Scratch slots[2];
  return slots[slot];
}

// Shape-keyed cache of built primitives, shared by XLA's threads.
template <typename T>
class Cache {
 public:
  template <typename Make>
  const T& Get(const std::string& key, Make make) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) return *it->second;
    }
    auto value = std::make_unique<T>(make());
    std::lock_guard<std::mutex> lock(mu_);
    return *map_.emplace(key, std::move(value)).first->second;
  }

 private:
  std::mutex mu_;
  std::unordered_map<std::string, std::unique_ptr<T>> map_;
};

std::string Key(std::initializer_list<int64_t> values) {
  std::string key;
  for (int64_t v : values) key += std::to_string(v) + ",";
  return key;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

memory Wrap(const memory::desc& desc, void* data) { return memory(desc, Engine(), data); }

memory ScratchpadFor(const dnnl::primitive_desc& pd) {
  auto desc = pd.scratchpad_desc();
  return Wrap(desc, ScratchSlot(0).Get(desc.get_size()));
}

// --- Convolution geometry: x (N,H,W,C) * w (KH,KW,C,O) -> y (N,OH,OW,O) --------------

struct ConvShape {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pl, pb, pr;
  memory::desc Src(Tag tag = Tag::nhwc) const { return {{n, c, h, w}, kF32, tag}; }
  memory::desc Dst(Tag tag = Tag::nhwc) const { return {{n, o, oh, ow}, kF32, tag}; }
  memory::desc Weights(Tag tag) const { return {{o, c, kh, kw}, kF32, tag}; }
  memory::desc Bias() const { return {{o}, kF32, Tag::x}; }
  Dims Strides() const { return {sh, sw}; }
  Dims PadL() const { return {pt, pl}; }
  Dims PadR() const { return {pb, pr}; }
  std::string Key() const {
    return ::Key({n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pl, pb, pr});
  }
  dnnl::convolution_forward::primitive_desc ForwardPd(bool relu = false) const {
    dnnl::primitive_attr attr = UserScratchpad();
    if (relu) {
      dnnl::post_ops ops;
      ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
      attr.set_post_ops(ops);
    }
    return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            Src(), Weights(Tag::any), Bias(), Dst(), Strides(), PadL(), PadR(), attr};
  }
};

ConvShape MakeConvShape(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                        ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pl, int64_t pb, int64_t pr) {
  return {x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2], sh, sw, pt, pl, pb, pr};
}

// The kernel in oneDNN's preferred layout: reordered from/to XLA's HWIO.
struct WeightsReorder {
  memory::desc preferred;
  dnnl::reorder reorder;
};

struct ConvForward {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward prim;
  WeightsReorder to_preferred;
};

struct ConvBackwardData {
  dnnl::convolution_backward_data::primitive_desc pd;
  dnnl::convolution_backward_data prim;
  WeightsReorder to_preferred;
};

struct ConvBackwardWeights {
  dnnl::convolution_backward_weights::primitive_desc pd;
  dnnl::convolution_backward_weights prim;
  WeightsReorder to_hwio;
};

WeightsReorder MakeReorder(const memory::desc& from, const memory::desc& to) {
  return {to, dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to))};
}

// Runs `reorder` from src into a scratch slot (or returns src when no reorder is needed).
memory Reordered(const WeightsReorder& r, const memory& src, int slot) {
  if (r.preferred == src.get_desc()) return src;
  memory dst = Wrap(r.preferred, ScratchSlot(slot).Get(r.preferred.get_size()));
  r.reorder.execute(Stream(), {{DNNL_ARG_FROM, src}, {DNNL_ARG_TO, dst}});
  return dst;
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb,
                           int64_t pr, int64_t relu) {
  const ConvShape s = MakeConvShape(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw,
                                    pt, pl, pb, pr);
  static Cache<ConvForward> cache;
  const ConvForward& op = cache.Get(s.Key() + std::to_string(relu), [&] {
    auto pd = s.ForwardPd(relu != 0);
    return ConvForward{pd, dnnl::convolution_forward(pd),
                       MakeReorder(s.Weights(Tag::hwio), pd.weights_desc())};
  });
  memory weights = Reordered(op.to_preferred, Wrap(s.Weights(Tag::hwio), w.typed_data()), 1);
  op.prim.execute(Stream(), {{DNNL_ARG_SRC, Wrap(s.Src(), x.typed_data())},
                             {DNNL_ARG_WEIGHTS, weights},
                             {DNNL_ARG_BIAS, Wrap(s.Bias(), b.typed_data())},
                             {DNNL_ARG_DST, Wrap(s.Dst(), y->typed_data())},
                             {DNNL_ARG_SCRATCHPAD, ScratchpadFor(op.pd)}});
  return ffi::Error::Success();
}

ffi::Error ConvBackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                                int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  const ConvShape s = MakeConvShape(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw,
                                    pt, pl, pb, pr);
  static Cache<ConvBackwardData> cache;
  const ConvBackwardData& op = cache.Get(s.Key(), [&] {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, s.Src(), s.Weights(Tag::any), s.Dst(),
        s.Strides(), s.PadL(), s.PadR(), s.ForwardPd(), UserScratchpad());
    return ConvBackwardData{pd, dnnl::convolution_backward_data(pd),
                            MakeReorder(s.Weights(Tag::hwio), pd.weights_desc())};
  });
  memory weights = Reordered(op.to_preferred, Wrap(s.Weights(Tag::hwio), w.typed_data()), 1);
  op.prim.execute(Stream(), {{DNNL_ARG_DIFF_DST, Wrap(s.Dst(), dy.typed_data())},
                             {DNNL_ARG_WEIGHTS, weights},
                             {DNNL_ARG_DIFF_SRC, Wrap(s.Src(), dx->typed_data())},
                             {DNNL_ARG_SCRATCHPAD, ScratchpadFor(op.pd)}});
  return ffi::Error::Success();
}

ffi::Error ConvBackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                   ffi::ResultBuffer<ffi::F32> dw,
                                   ffi::ResultBuffer<ffi::F32> db, int64_t sh, int64_t sw,
                                   int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  const ConvShape s = MakeConvShape(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw,
                                    pt, pl, pb, pr);
  static Cache<ConvBackwardWeights> cache;
  const ConvBackwardWeights& op = cache.Get(s.Key(), [&] {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, s.Src(), s.Weights(Tag::any), s.Bias(),
        s.Dst(), s.Strides(), s.PadL(), s.PadR(), s.ForwardPd(), UserScratchpad());
    return ConvBackwardWeights{pd, dnnl::convolution_backward_weights(pd),
                               MakeReorder(pd.diff_weights_desc(), s.Weights(Tag::hwio))};
  });
  memory hwio = Wrap(s.Weights(Tag::hwio), dw->typed_data());
  const bool direct = op.pd.diff_weights_desc() == s.Weights(Tag::hwio);
  memory diff_weights =
      direct ? hwio
             : Wrap(op.pd.diff_weights_desc(),
                    ScratchSlot(1).Get(op.pd.diff_weights_desc().get_size()));
  op.prim.execute(Stream(), {{DNNL_ARG_SRC, Wrap(s.Src(), x.typed_data())},
                             {DNNL_ARG_DIFF_DST, Wrap(s.Dst(), dy.typed_data())},
                             {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                             {DNNL_ARG_DIFF_BIAS, Wrap(s.Bias(), db->typed_data())},
                             {DNNL_ARG_SCRATCHPAD, ScratchpadFor(op.pd)}});
  if (!direct) {
    op.to_hwio.reorder.execute(Stream(), {{DNNL_ARG_FROM, diff_weights}, {DNNL_ARG_TO, hwio}});
  }
  return ffi::Error::Success();
}

// --- Max pooling: x (N,H,W,C) -> y (N,OH,OW,C), with oneDNN's argmax workspace -------

struct PoolShape {
  int64_t n, h, w, c, oh, ow, k, s, pt, pl, pb, pr;
  memory::desc Src() const { return {{n, c, h, w}, kF32, Tag::nhwc}; }
  memory::desc Dst() const { return {{n, c, oh, ow}, kF32, Tag::nhwc}; }
  std::string Key() const { return ::Key({n, h, w, c, oh, ow, k, s, pt, pl, pb, pr}); }
  dnnl::pooling_forward::primitive_desc ForwardPd() const {
    return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, Src(),
            Dst(), {s, s}, {k, k}, {0, 0}, {pt, pl}, {pb, pr}, UserScratchpad()};
  }
};

struct PoolForward {
  dnnl::pooling_forward::primitive_desc pd;
  dnnl::pooling_forward prim;
};

struct PoolBackward {
  dnnl::pooling_backward::primitive_desc pd;
  dnnl::pooling_backward prim;
  memory::desc workspace;
};

ffi::Error PoolForwardImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                           ffi::ResultBuffer<ffi::U8> ws, int64_t k, int64_t s, int64_t pt,
                           int64_t pl, int64_t pb, int64_t pr) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  const PoolShape p{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], k, s, pt, pl, pb, pr};
  static Cache<PoolForward> cache;
  const PoolForward& op = cache.Get(p.Key(), [&] {
    auto pd = p.ForwardPd();
    return PoolForward{pd, dnnl::pooling_forward(pd)};
  });
  if (ws->size_bytes() < op.pd.workspace_desc().get_size()) {
    return ffi::Error::InvalidArgument("max pool workspace buffer too small");
  }
  op.prim.execute(Stream(), {{DNNL_ARG_SRC, Wrap(p.Src(), x.typed_data())},
                             {DNNL_ARG_DST, Wrap(p.Dst(), y->typed_data())},
                             {DNNL_ARG_WORKSPACE, Wrap(op.pd.workspace_desc(), ws->untyped_data())},
                             {DNNL_ARG_SCRATCHPAD, ScratchpadFor(op.pd)}});
  return ffi::Error::Success();
}

ffi::Error PoolBackwardImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::U8> ws,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t k, int64_t s, int64_t pt,
                            int64_t pl, int64_t pb, int64_t pr) {
  auto xd = dx->dimensions();
  auto yd = dy.dimensions();
  const PoolShape p{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], k, s, pt, pl, pb, pr};
  static Cache<PoolBackward> cache;
  const PoolBackward& op = cache.Get(p.Key(), [&] {
    auto fwd = p.ForwardPd();
    dnnl::pooling_backward::primitive_desc pd(Engine(), dnnl::algorithm::pooling_max, p.Src(),
                                              p.Dst(), {s, s}, {k, k}, {0, 0}, {pt, pl},
                                              {pb, pr}, fwd, UserScratchpad());
    return PoolBackward{pd, dnnl::pooling_backward(pd), fwd.workspace_desc()};
  });
  if (ws.size_bytes() < op.workspace.get_size()) {
    return ffi::Error::InvalidArgument("max pool workspace buffer too small");
  }
  op.prim.execute(Stream(), {{DNNL_ARG_DIFF_DST, Wrap(p.Dst(), dy.typed_data())},
                             {DNNL_ARG_WORKSPACE, Wrap(op.workspace, ws.untyped_data())},
                             {DNNL_ARG_DIFF_SRC, Wrap(p.Src(), dx->typed_data())},
                             {DNNL_ARG_SCRATCHPAD, ScratchpadFor(op.pd)}});
  return ffi::Error::Success();
}

// --- LRN across channels ----------------------------------------------------------------
// oneDNN: x / (k + alpha / n * sum x^2) ** beta over n = local_size channels;
// the caller passes alpha = tf_alpha * n, so this is tf.nn.lrn.

struct LrnShape {
  int64_t n, h, w, c, size;
  float alpha, beta, k;
  memory::desc Data() const { return {{n, c, h, w}, kF32, Tag::nhwc}; }
  // The floats' bits, not their decimal rounding: close values never share a primitive.
  std::string Key() const { return ::Key({n, h, w, c, size, Bits(alpha), Bits(beta), Bits(k)}); }
  static int64_t Bits(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    return bits;
  }
  dnnl::lrn_forward::primitive_desc ForwardPd() const {
    return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::lrn_across_channels,
            Data(), Data(), size, alpha, beta, k, UserScratchpad()};
  }
};

struct LrnForward {
  dnnl::lrn_forward::primitive_desc pd;
  dnnl::lrn_forward prim;
};

struct LrnBackward {
  dnnl::lrn_backward::primitive_desc pd;
  dnnl::lrn_backward prim;
  memory::desc workspace;
};

LrnShape MakeLrnShape(ffi::Span<const int64_t> d, int64_t size, float alpha, float beta,
                      float k) {
  return {d[0], d[1], d[2], d[3], size, alpha, beta, k};
}

ffi::Error LrnForwardImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                          ffi::ResultBuffer<ffi::U8> ws, int64_t size, float alpha,
                          float beta, float k) {
  const LrnShape s = MakeLrnShape(x.dimensions(), size, alpha, beta, k);
  static Cache<LrnForward> cache;
  const LrnForward& op = cache.Get(s.Key(), [&] {
    auto pd = s.ForwardPd();
    return LrnForward{pd, dnnl::lrn_forward(pd)};
  });
  if (ws->size_bytes() < op.pd.workspace_desc().get_size()) {
    return ffi::Error::InvalidArgument("LRN workspace buffer too small");
  }
  op.prim.execute(Stream(), {{DNNL_ARG_SRC, Wrap(s.Data(), x.typed_data())},
                             {DNNL_ARG_DST, Wrap(s.Data(), y->typed_data())},
                             {DNNL_ARG_WORKSPACE, Wrap(op.pd.workspace_desc(), ws->untyped_data())},
                             {DNNL_ARG_SCRATCHPAD, ScratchpadFor(op.pd)}});
  return ffi::Error::Success();
}

ffi::Error LrnBackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::Buffer<ffi::U8> ws, ffi::ResultBuffer<ffi::F32> dx,
                           int64_t size, float alpha, float beta, float k) {
  const LrnShape s = MakeLrnShape(x.dimensions(), size, alpha, beta, k);
  static Cache<LrnBackward> cache;
  const LrnBackward& op = cache.Get(s.Key(), [&] {
    auto fwd = s.ForwardPd();
    dnnl::lrn_backward::primitive_desc pd(Engine(), dnnl::algorithm::lrn_across_channels,
                                          s.Data(), s.Data(), s.Data(), size, alpha, beta, k,
                                          fwd, UserScratchpad());
    return LrnBackward{pd, dnnl::lrn_backward(pd), fwd.workspace_desc()};
  });
  if (ws.size_bytes() < op.workspace.get_size()) {
    return ffi::Error::InvalidArgument("LRN workspace buffer too small");
  }
  op.prim.execute(Stream(), {{DNNL_ARG_SRC, Wrap(s.Data(), x.typed_data())},
                             {DNNL_ARG_DIFF_DST, Wrap(s.Data(), dy.typed_data())},
                             {DNNL_ARG_WORKSPACE, Wrap(op.workspace, ws.untyped_data())},
                             {DNNL_ARG_DIFF_SRC, Wrap(s.Data(), dx->typed_data())},
                             {DNNL_ARG_SCRATCHPAD, ScratchpadFor(op.pd)}});
  return ffi::Error::Success();
}

// One oneDNN call at a time. Each already uses every core through its OpenMP team;
// XLA runs independent thunks concurrently (a convolution's input and kernel
// gradients, say), and two teams on the same cores oversubscribe them. The second
// caller sleeps on the lock instead.
std::mutex& CallLock() {
  static std::mutex* lock = new std::mutex;
  return *lock;
}

// oneDNN reports failures as dnnl::error: turn them into an XLA error, never a crash.
template <typename F>
ffi::Error Guarded(F f) {
  try {
    std::lock_guard<std::mutex> lock(CallLock());
    return f();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
}

#define CNNJAX_GUARD(impl)                                   \
  [](auto... args) { return Guarded([&] { return impl(args...); }); }

}  // namespace

// Everything below is the library's interface (built with -fvisibility=hidden).
#pragma GCC visibility push(default)

#define CONV_ATTRS                                                              \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pl") \
      .Attr<int64_t>("pb").Attr<int64_t>("pr")
#define POOL_ATTRS                                                             \
  .Attr<int64_t>("k").Attr<int64_t>("s").Attr<int64_t>("pt").Attr<int64_t>("pl") \
      .Attr<int64_t>("pb").Attr<int64_t>("pr")
#define LRN_ATTRS .Attr<int64_t>("size").Attr<float>("alpha").Attr<float>("beta").Attr<float>("k")

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxConvForward, CNNJAX_GUARD(ConvForwardImpl),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS.Attr<int64_t>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxConvBackwardData, CNNJAX_GUARD(ConvBackwardDataImpl),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxConvBackwardWeights, CNNJAX_GUARD(ConvBackwardWeightsImpl),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxMaxPoolForward, CNNJAX_GUARD(PoolForwardImpl),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>() POOL_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxMaxPoolBackward, CNNJAX_GUARD(PoolBackwardImpl),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() POOL_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxLrnForward, CNNJAX_GUARD(LrnForwardImpl),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>() LRN_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxLrnBackward, CNNJAX_GUARD(LrnBackwardImpl),
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() LRN_ATTRS);

// Workspace sizes, asked by Python at trace time to shape the workspace outputs.
extern "C" int64_t cnnjax_max_pool_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                                   int64_t oh, int64_t ow, int64_t k, int64_t s,
                                                   int64_t pt, int64_t pl, int64_t pb,
                                                   int64_t pr) {
  try {
    return PoolShape{n, h, w, c, oh, ow, k, s, pt, pl, pb, pr}.ForwardPd().workspace_desc().get_size();
  } catch (const std::exception&) {
    return -1;
  }
}

extern "C" int64_t cnnjax_lrn_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                              int64_t size, float alpha, float beta, float k) {
  try {
    return LrnShape{n, h, w, c, size, alpha, beta, k}.ForwardPd().workspace_desc().get_size();
  } catch (const std::exception&) {
    return -1;
  }
}

// The implementations oneDNN picks for an op's primitives, "forward;backward..." (a name
// starting with "ref" is oneDNN's reference C++ loop: cnnjax/kernels.py then keeps XLA's
// formulation of the op). Returns 0, or -1 where oneDNN cannot build the primitives.
namespace {
int WriteNames(std::initializer_list<std::string> names, char* out, int64_t out_size) {
  std::string joined;
  for (const auto& name : names) joined += (joined.empty() ? "" : ";") + name;
  snprintf(out, out_size, "%s", joined.c_str());
  return 0;
}
}  // namespace

extern "C" int cnnjax_conv_impls(int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh,
                                 int64_t kw, int64_t o, int64_t oh, int64_t ow, int64_t sh,
                                 int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr,
                                 int64_t relu, char* out, int64_t out_size) {
  try {
    const ConvShape s{n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pl, pb, pr};
    auto fwd = s.ForwardPd(relu != 0);
    dnnl::convolution_backward_data::primitive_desc data(
        Engine(), dnnl::algorithm::convolution_direct, s.Src(), s.Weights(Tag::any), s.Dst(),
        s.Strides(), s.PadL(), s.PadR(), s.ForwardPd(), UserScratchpad());
    dnnl::convolution_backward_weights::primitive_desc weights(
        Engine(), dnnl::algorithm::convolution_direct, s.Src(), s.Weights(Tag::any), s.Bias(),
        s.Dst(), s.Strides(), s.PadL(), s.PadR(), s.ForwardPd(), UserScratchpad());
    return WriteNames({fwd.impl_info_str(), data.impl_info_str(), weights.impl_info_str()}, out,
                      out_size);
  } catch (const std::exception&) {
    return -1;
  }
}

extern "C" int cnnjax_max_pool_impls(int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh,
                                     int64_t ow, int64_t k, int64_t s, int64_t pt, int64_t pl,
                                     int64_t pb, int64_t pr, char* out, int64_t out_size) {
  try {
    const PoolShape p{n, h, w, c, oh, ow, k, s, pt, pl, pb, pr};
    auto fwd = p.ForwardPd();
    dnnl::pooling_backward::primitive_desc bwd(Engine(), dnnl::algorithm::pooling_max, p.Src(),
                                               p.Dst(), {s, s}, {k, k}, {0, 0}, {pt, pl},
                                               {pb, pr}, fwd, UserScratchpad());
    return WriteNames({fwd.impl_info_str(), bwd.impl_info_str()}, out, out_size);
  } catch (const std::exception&) {
    return -1;
  }
}

extern "C" int cnnjax_lrn_impls(int64_t n, int64_t h, int64_t w, int64_t c, int64_t size,
                                float alpha, float beta, float k, char* out, int64_t out_size) {
  try {
    const LrnShape s{n, h, w, c, size, alpha, beta, k};
    auto fwd = s.ForwardPd();
    dnnl::lrn_backward::primitive_desc bwd(Engine(), dnnl::algorithm::lrn_across_channels,
                                           s.Data(), s.Data(), s.Data(), size, alpha, beta, k,
                                           fwd, UserScratchpad());
    return WriteNames({fwd.impl_info_str(), bwd.impl_info_str()}, out, out_size);
  } catch (const std::exception&) {
    return -1;
  }
}

#pragma GCC visibility pop
