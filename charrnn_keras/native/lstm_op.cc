// A whole-sequence LSTM for training on a CPU: oneDNN's fused LSTM primitive (forward training
// and backward) as two TensorFlow ops. Python side: charrnn_keras/native_lstm.py.
//
// Weights, bias and the cell state are float32 in Keras's layout (kernel [in, 4u], recurrent
// kernel [u, 4u], bias [4u], gates i, f, c, o: oneDNN's ldigo/ldgo with one layer and one
// direction, and oneDNN's gate order). The layer data (inputs, outputs, hidden states and their
// gradients) are T: float32, or bfloat16 for oneDNN's bf16 kernels, which accumulate in float32.
// Weight gradients are float32.

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace charrnn {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
using memory = dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

// The engine and the primitives' cache are never destroyed: at exit, static destructors would
// free the engine before the cached primitives that refer to it, possibly while one of
// TensorFlow's threads (never joined) still runs an op.
dnnl::engine& Engine() {
  static auto* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// A reorder and its descriptor, which says how much scratch memory an execution needs.
struct Reorder {
  dnnl::reorder::primitive_desc pd;
  dnnl::reorder prim;
};

// Primitives are costly to create (milliseconds) and free to reuse, so each shape's are made
// once. The backward descriptor needs the forward one as its hint, so both live together.
struct Primitives {
  dnnl::lstm_forward::primitive_desc fwd_pd;
  dnnl::lstm_forward fwd;
  dnnl::lstm_backward::primitive_desc bwd_pd;
  dnnl::lstm_backward bwd;
  Reorder fwd_w, fwd_u, bwd_w, bwd_u;  // user float32 weights -> each primitive's own
  bool dw_direct, du_direct;           // diff weights already in the user's layout
  Reorder bwd_dw, bwd_du;              // otherwise: primitive's layout -> user's
};

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool>;  // time, batch, in, units, bf16

struct Descs {
  memory::desc layer_in, iter, iter_c, w_user, u_user, bias, layer_out;
  memory::desc diff_in, diff_iter, diff_out;  // oneDNN's backward takes all gradients in f32
};

Descs MakeDescs(const Key& key) {
  auto [t, n, in, u, bf16] = key;
  dt data = bf16 ? dt::bf16 : dt::f32;
  return Descs{
      memory::desc({t, n, in}, data, tag::ntc),
      memory::desc({1, 1, n, u}, data, tag::ldnc),
      memory::desc({1, 1, n, u}, dt::f32, tag::ldnc),
      memory::desc({1, 1, in, 4, u}, dt::f32, tag::ldigo),
      memory::desc({1, 1, u, 4, u}, dt::f32, tag::ldigo),
      memory::desc({1, 1, 4, u}, dt::f32, tag::ldgo),
      memory::desc({t, n, u}, data, tag::ntc),
      memory::desc({t, n, in}, dt::f32, tag::ntc),
      memory::desc({1, 1, n, u}, dt::f32, tag::ldnc),
      memory::desc({t, n, u}, dt::f32, tag::ntc),
  };
}

std::shared_ptr<Primitives> Create(const Key& key) {
  auto [t, n, in, u, bf16] = key;
  dt data = bf16 ? dt::bf16 : dt::f32;
  Descs d = MakeDescs(key);
  auto& eng = Engine();
  auto owned = std::make_shared<Primitives>();
  Primitives& p = *owned;
  memory::desc w_any({1, 1, in, 4, u}, data, tag::any);
  memory::desc u_any({1, 1, u, 4, u}, data, tag::any);
  // Scratch memory comes from TensorFlow with each call, for the reorders too: oneDNN's own
  // global scratchpad is not safe when TensorFlow runs primitives from several threads, and a
  // layer's chains (native_lstm.op_chains) run the same primitives side by side.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  p.fwd_pd = dnnl::lstm_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::rnn_direction::unidirectional_left2right,
      d.layer_in, d.iter, d.iter_c, w_any, u_any, d.bias, d.layer_out, d.iter, d.iter_c, attr);
  p.fwd = dnnl::lstm_forward(p.fwd_pd);
  memory::desc dw_any({1, 1, in, 4, u}, dt::f32, tag::any);
  memory::desc du_any({1, 1, u, 4, u}, dt::f32, tag::any);
  p.bwd_pd = dnnl::lstm_backward::primitive_desc(
      eng, dnnl::prop_kind::backward, dnnl::rnn_direction::unidirectional_left2right,
      d.layer_in, d.iter, d.iter_c, w_any, u_any, d.bias, d.layer_out, d.iter, d.iter_c,
      d.diff_in, d.diff_iter, d.iter_c, dw_any, du_any, d.bias, d.diff_out, d.diff_iter, d.iter_c,
      p.fwd_pd, attr);
  p.bwd = dnnl::lstm_backward(p.bwd_pd);
  auto reorder = [&](const memory::desc& from, const memory::desc& to) {
    dnnl::reorder::primitive_desc pd(eng, from, eng, to, attr);
    return Reorder{pd, dnnl::reorder(pd)};
  };
  p.fwd_w = reorder(d.w_user, p.fwd_pd.weights_layer_desc());
  p.fwd_u = reorder(d.u_user, p.fwd_pd.weights_iter_desc());
  p.bwd_w = reorder(d.w_user, p.bwd_pd.weights_layer_desc());
  p.bwd_u = reorder(d.u_user, p.bwd_pd.weights_iter_desc());
  p.dw_direct = p.bwd_pd.diff_weights_layer_desc() == d.w_user;
  p.du_direct = p.bwd_pd.diff_weights_iter_desc() == d.u_user;
  if (!p.dw_direct) p.bwd_dw = reorder(p.bwd_pd.diff_weights_layer_desc(), d.w_user);
  if (!p.du_direct) p.bwd_du = reorder(p.bwd_pd.diff_weights_iter_desc(), d.u_user);
  return owned;
}

std::shared_ptr<Primitives> Get(const Key& key) {
  static auto* mu = new std::mutex;
  static auto* cache = new std::map<Key, std::shared_ptr<Primitives>>;
  std::lock_guard<std::mutex> lock(*mu);
  auto& slot = (*cache)[key];
  if (!slot) slot = Create(key);
  return slot;
}

// oneDNN runs on OpenMP threads; as many as TensorFlow gives one op (train.intra_op_threads).
void UseIntraOpThreads(OpKernelContext* ctx) {
  omp_set_num_threads(ctx->device()->tensorflow_cpu_worker_threads()->num_threads);
}

void* Data(const Tensor& t) { return const_cast<char*>(t.tensor_data().data()); }

// A scratch buffer for a memory descriptor, owned by TensorFlow's allocator.
memory Scratch(OpKernelContext* ctx, const memory::desc& desc, Tensor* holder) {
  int64_t bytes = static_cast<int64_t>(desc.get_size());
  auto status = ctx->allocate_temp(tensorflow::DT_UINT8, TensorShape({bytes}), holder);
  if (!status.ok()) {
    ctx->SetStatus(status);
    return memory();
  }
  return memory(desc, Engine(), Data(*holder));
}

// Runs a reorder with scratch memory of its own from TensorFlow's allocator.
void Execute(OpKernelContext* ctx, const Reorder& r, dnnl::stream& s, const memory& from,
             const memory& to) {
  std::unordered_map<int, memory> args{{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
  Tensor pad_buf;
  if (r.pd.scratchpad_desc().get_size() > 0) {
    args[DNNL_ARG_SCRATCHPAD] = Scratch(ctx, r.pd.scratchpad_desc(), &pad_buf);
    if (!ctx->status().ok()) return;
  }
  r.prim.execute(s, args);
  s.wait();  // before pad_buf goes back to TensorFlow
}

// Validates the shapes shared by both ops and returns the primitives' key.
bool ReadKey(OpKernelContext* ctx, bool bf16, Key* key) {
  const Tensor& x = ctx->input(0);
  const Tensor& h0 = ctx->input(1);
  const Tensor& c0 = ctx->input(2);
  const Tensor& w = ctx->input(3);
  const Tensor& u = ctx->input(4);
  const Tensor& b = ctx->input(5);
  auto fail = [&](const char* what) {
    ctx->CtxFailure(tensorflow::errors::InvalidArgument(what));
    return false;
  };
  if (x.dims() != 3) return fail("x must be [batch, time, in]");
  int64_t n = x.dim_size(0), t = x.dim_size(1), in = x.dim_size(2);
  if (u.dims() != 2 || u.dim_size(1) != 4 * u.dim_size(0))
    return fail("recurrent_kernel must be [units, 4 * units]");
  int64_t units = u.dim_size(0);
  if (w.dims() != 2 || w.dim_size(0) != in || w.dim_size(1) != 4 * units)
    return fail("kernel must be [in, 4 * units]");
  if (b.dims() != 1 || b.dim_size(0) != 4 * units) return fail("bias must be [4 * units]");
  TensorShape state({n, units});
  if (h0.shape() != state || c0.shape() != state) return fail("h0 and c0 must be [batch, units]");
  if (t < 1 || n < 1) return fail("batch and time must be at least 1");
  *key = Key(t, n, in, units, bf16);
  return true;
}

// What both ops share: the layer data type, the shapes' checks, the primitives, the threads,
// and oneDNN's exceptions turned into a TensorFlow error.
class LstmKernel : public OpKernel {
 public:
  explicit LstmKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    DataType type;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &type));
    bf16_ = type == tensorflow::DT_BFLOAT16;
  }

  void Compute(OpKernelContext* ctx) override {
    Key key;
    if (!ReadKey(ctx, bf16_, &key)) return;
    UseIntraOpThreads(ctx);
    try {
      Run(ctx, key, *Get(key), MakeDescs(key));
    } catch (const dnnl::error& e) {
      ctx->CtxFailure(tensorflow::errors::Internal("oneDNN LSTM: ", e.what()));
    }
  }

 protected:
  virtual void Run(OpKernelContext* ctx, const Key& key, Primitives& p, const Descs& d) = 0;

 private:
  bool bf16_;
};

class LstmOp : public LstmKernel {
 public:
  using LstmKernel::LstmKernel;

 protected:
  void Run(OpKernelContext* ctx, const Key& key, Primitives& p, const Descs& d) override {
    auto [t, n, in, units, bf16] = key;
    Tensor *y, *h, *c, *ws;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, t, units}), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n, units}), &h));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({n, units}), &c));
    int64_t ws_bytes = static_cast<int64_t>(p.fwd_pd.workspace_desc().get_size());
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({ws_bytes}), &ws));
    auto& eng = Engine();
    dnnl::stream s(eng);
    Tensor w_buf, u_buf, pad_buf;
    memory w = Scratch(ctx, p.fwd_pd.weights_layer_desc(), &w_buf);
    memory u = Scratch(ctx, p.fwd_pd.weights_iter_desc(), &u_buf);
    memory pad = Scratch(ctx, p.fwd_pd.scratchpad_desc(), &pad_buf);
    if (!ctx->status().ok()) return;
    memory w_user(d.w_user, eng, Data(ctx->input(3)));
    memory u_user(d.u_user, eng, Data(ctx->input(4)));
    Execute(ctx, p.fwd_w, s, w_user, w);
    Execute(ctx, p.fwd_u, s, u_user, u);
    if (!ctx->status().ok()) return;
    p.fwd.execute(s, {{DNNL_ARG_SRC_LAYER, memory(d.layer_in, eng, Data(ctx->input(0)))},
                       {DNNL_ARG_SRC_ITER, memory(d.iter, eng, Data(ctx->input(1)))},
                       {DNNL_ARG_SRC_ITER_C, memory(d.iter_c, eng, Data(ctx->input(2)))},
                       {DNNL_ARG_WEIGHTS_LAYER, w},
                       {DNNL_ARG_WEIGHTS_ITER, u},
                       {DNNL_ARG_BIAS, memory(d.bias, eng, Data(ctx->input(5)))},
                       {DNNL_ARG_DST_LAYER, memory(d.layer_out, eng, Data(*y))},
                       {DNNL_ARG_DST_ITER, memory(d.iter, eng, Data(*h))},
                       {DNNL_ARG_DST_ITER_C, memory(d.iter_c, eng, Data(*c))},
                       {DNNL_ARG_WORKSPACE, memory(p.fwd_pd.workspace_desc(), eng, Data(*ws))},
                       {DNNL_ARG_SCRATCHPAD, pad}});
    s.wait();
  }
};

class LstmGradOp : public LstmKernel {
 public:
  using LstmKernel::LstmKernel;

 protected:
  void Run(OpKernelContext* ctx, const Key& key, Primitives& p, const Descs& d) override {
    auto [t, n, in, units, bf16] = key;
    const Tensor& ws = ctx->input(9);
    OP_REQUIRES(ctx, ws.NumElements() == int64_t(p.fwd_pd.workspace_desc().get_size()),
                tensorflow::errors::InvalidArgument("workspace does not match the shapes"));
    Tensor *dx, *dh0, *dc0, *dw, *du, *db;
    TensorShape seq({n, t, units}), state({n, units});
    for (int i : {6, 7, 8, 10, 11, 12})  // y, h, c and their gradients
      OP_REQUIRES(ctx, ctx->input(i).shape() == (i % 4 == 2 ? seq : state),
                  tensorflow::errors::InvalidArgument("y, h, c or their gradients: wrong shape"));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &dh0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(2).shape(), &dc0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, ctx->input(3).shape(), &dw));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, ctx->input(4).shape(), &du));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, ctx->input(5).shape(), &db));
    auto& eng = Engine();
    dnnl::stream s(eng);
    Tensor w_buf, u_buf, dw_buf, du_buf, pad_buf;
    memory pad = Scratch(ctx, p.bwd_pd.scratchpad_desc(), &pad_buf);
    memory w = Scratch(ctx, p.bwd_pd.weights_layer_desc(), &w_buf);
    memory u = Scratch(ctx, p.bwd_pd.weights_iter_desc(), &u_buf);
    memory dw_user(d.w_user, eng, Data(*dw));
    memory du_user(d.u_user, eng, Data(*du));
    memory dw_mem = p.dw_direct ? dw_user
                                 : Scratch(ctx, p.bwd_pd.diff_weights_layer_desc(), &dw_buf);
    memory du_mem = p.du_direct ? du_user
                                 : Scratch(ctx, p.bwd_pd.diff_weights_iter_desc(), &du_buf);
    if (!ctx->status().ok()) return;
    memory w_user(d.w_user, eng, Data(ctx->input(3)));
    memory u_user(d.u_user, eng, Data(ctx->input(4)));
    Execute(ctx, p.bwd_w, s, w_user, w);
    Execute(ctx, p.bwd_u, s, u_user, u);
    if (!ctx->status().ok()) return;
    // oneDNN adds the weight gradients into these buffers.
    std::memset(dw_mem.get_data_handle(), 0, dw_mem.get_desc().get_size());
    std::memset(du_mem.get_data_handle(), 0, du_mem.get_desc().get_size());
    std::memset(Data(*db), 0, db->TotalBytes());
    p.bwd.execute(s, {{DNNL_ARG_SRC_LAYER, memory(d.layer_in, eng, Data(ctx->input(0)))},
                       {DNNL_ARG_SRC_ITER, memory(d.iter, eng, Data(ctx->input(1)))},
                       {DNNL_ARG_SRC_ITER_C, memory(d.iter_c, eng, Data(ctx->input(2)))},
                       {DNNL_ARG_WEIGHTS_LAYER, w},
                       {DNNL_ARG_WEIGHTS_ITER, u},
                       {DNNL_ARG_BIAS, memory(d.bias, eng, Data(ctx->input(5)))},
                       {DNNL_ARG_DST_LAYER, memory(d.layer_out, eng, Data(ctx->input(6)))},
                       {DNNL_ARG_DST_ITER, memory(d.iter, eng, Data(ctx->input(7)))},
                       {DNNL_ARG_DST_ITER_C, memory(d.iter_c, eng, Data(ctx->input(8)))},
                       {DNNL_ARG_WORKSPACE, memory(p.fwd_pd.workspace_desc(), eng, Data(ws))},
                       {DNNL_ARG_DIFF_DST_LAYER, memory(d.diff_out, eng, Data(ctx->input(10)))},
                       {DNNL_ARG_DIFF_DST_ITER, memory(d.diff_iter, eng, Data(ctx->input(11)))},
                       {DNNL_ARG_DIFF_DST_ITER_C, memory(d.iter_c, eng, Data(ctx->input(12)))},
                       {DNNL_ARG_DIFF_SRC_LAYER, memory(d.diff_in, eng, Data(*dx))},
                       {DNNL_ARG_DIFF_SRC_ITER, memory(d.diff_iter, eng, Data(*dh0))},
                       {DNNL_ARG_DIFF_SRC_ITER_C, memory(d.iter_c, eng, Data(*dc0))},
                       {DNNL_ARG_DIFF_WEIGHTS_LAYER, dw_mem},
                       {DNNL_ARG_DIFF_WEIGHTS_ITER, du_mem},
                       {DNNL_ARG_DIFF_BIAS, memory(d.bias, eng, Data(*db))},
                       {DNNL_ARG_SCRATCHPAD, pad}});
    if (!p.dw_direct) Execute(ctx, p.bwd_dw, s, dw_mem, dw_user);
    if (!p.du_direct) Execute(ctx, p.bwd_du, s, du_mem, du_user);
    s.wait();
  }
};

tensorflow::Status LstmShape(InferenceContext* c) {
  ShapeHandle x, u;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 2, &u));
  auto batch = c->Dim(x, 0), units = c->Dim(u, 0);
  c->set_output(0, c->MakeShape({batch, c->Dim(x, 1), units}));
  c->set_output(1, c->MakeShape({batch, units}));
  c->set_output(2, c->MakeShape({batch, units}));
  c->set_output(3, c->Vector(c->UnknownDim()));
  return tensorflow::OkStatus();
}

tensorflow::Status LstmGradShape(InferenceContext* c) {
  for (int i = 0; i < 6; ++i) c->set_output(i, c->input(i));
  return tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("CharrnnLstm")
    .Input("x: T")
    .Input("h0: T")
    .Input("c0: float")
    .Input("kernel: float")
    .Input("recurrent_kernel: float")
    .Input("bias: float")
    .Output("y: T")
    .Output("h: T")
    .Output("c: float")
    .Output("workspace: uint8")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn(LstmShape);

REGISTER_OP("CharrnnLstmGrad")
    .Input("x: T")
    .Input("h0: T")
    .Input("c0: float")
    .Input("kernel: float")
    .Input("recurrent_kernel: float")
    .Input("bias: float")
    .Input("y: T")
    .Input("h: T")
    .Input("c: float")
    .Input("workspace: uint8")
    .Input("dy: float")
    .Input("dh: float")
    .Input("dc: float")
    .Output("dx: float")
    .Output("dh0: float")
    .Output("dc0: float")
    .Output("dkernel: float")
    .Output("drecurrent_kernel: float")
    .Output("dbias: float")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn(LstmGradShape);

REGISTER_KERNEL_BUILDER(Name("CharrnnLstm").Device(::tensorflow::DEVICE_CPU), LstmOp);
REGISTER_KERNEL_BUILDER(Name("CharrnnLstmGrad").Device(::tensorflow::DEVICE_CPU), LstmGradOp);

}  // namespace charrnn
