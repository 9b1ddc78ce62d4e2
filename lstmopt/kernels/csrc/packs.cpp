// lstmopt's Python module for the native kernel: the way in for the latency of one step.
//
// It holds no kernel: it calls the ops of whichever variant of lstm.cpp the loader chose for this CPU
// (loader.cpp), through the dispatcher but below autograd, so this file is built once for every CPU and
// the ops library itself has no Python in it (a C++ process can load that alone).

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Tensor = at::Tensor;
using MaybeTensor = std::optional<at::Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;

// The cell of the layers a Packs holds, as Python names it (NativePacks.cell): "lstm", "gru", "rnn_tanh" or
// "rnn_relu". The last three have one state (no cx).
enum class Cell { lstm, gru, rnn_tanh, rnn_relu };

Cell cell_named(const std::string& name) {
  if (name == "lstm") return Cell::lstm;
  if (name == "gru") return Cell::gru;
  if (name == "rnn_tanh") return Cell::rnn_tanh;
  TORCH_CHECK(name == "rnn_relu", "lstmopt: unknown cell ", name);
  return Cell::rnn_relu;
}

// lstmopt::lstmp (which with proj_size 0 is lstmopt::lstm), lstmopt::gru and lstmopt::rnn, looked up once.
Triple recurrent(const Tensor& input, const MaybeTensor& batch_sizes, const MaybeTensor& hx, const MaybeTensor& cx,
                 at::TensorList weights, at::TensorList biases, int64_t hidden_size, bool bidirectional,
                 bool batch_first, at::TensorList projections, int64_t proj_size, Cell cell) {
  // Callers come here only with tensors that need no grad (Python routes grad mode to the stock path):
  // skipping the autograd keys skips the boxed "not implemented" fallback, a microsecond per call.
  c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
  if (cell == Cell::gru) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lstmopt::gru", "").typed<
        std::tuple<Tensor, Tensor>(const Tensor&, const MaybeTensor&, const MaybeTensor&, at::TensorList,
                                   at::TensorList, int64_t, bool, bool)>();
    auto [out, h_n] = op.call(input, batch_sizes, hx, weights, biases, hidden_size, bidirectional, batch_first);
    return {out, h_n, Tensor()};
  }
  if (cell != Cell::lstm) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lstmopt::rnn", "").typed<
        std::tuple<Tensor, Tensor>(const Tensor&, const MaybeTensor&, const MaybeTensor&, at::TensorList,
                                   at::TensorList, int64_t, bool, bool, c10::string_view)>();
    auto [out, h_n] = op.call(input, batch_sizes, hx, weights, biases, hidden_size, bidirectional, batch_first,
                              cell == Cell::rnn_relu ? "relu" : "tanh");
    return {out, h_n, Tensor()};
  }
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lstmopt::lstmp", "").typed<
      Triple(const Tensor&, const MaybeTensor&, const MaybeTensor&, const MaybeTensor&, at::TensorList,
             at::TensorList, int64_t, bool, bool, at::TensorList, int64_t)>();
  return op.call(input, batch_sizes, hx, cx, weights, biases, hidden_size, bidirectional, batch_first, projections,
                 proj_size);
}

// Python's direct way in, for the latency of one step: no dispatcher, the packed weights converted once
// (when this object is made), and every check of a tensor call made here in nanoseconds instead of in
// Python in microseconds. try_forward returns None for any call it cannot serve as nn.LSTM would (other
// dtypes, shapes or layouts, tensor subclasses, weights changed since packing): the caller then takes its
// slower path, which repacks or lets nn.LSTM raise its own error.
class Packs {
 public:
  Packs(std::vector<at::Tensor> weights, std::vector<at::Tensor> biases, std::vector<at::Tensor> projections,
        int64_t hidden_size, int64_t proj_size, bool bidirectional, const std::string& cell,
        std::vector<std::string> names,
        std::vector<at::Tensor> sources)
      : weights_(std::move(weights)), biases_(std::move(biases)), projections_(std::move(projections)),
        hidden_size_(hidden_size), proj_size_(proj_size), bidirectional_(bidirectional), cell_(cell_named(cell)) {
    TORCH_CHECK(!weights_.empty() && names.size() == sources.size(), "lstmopt: bad Packs arguments");
    state_size_ = proj_size_ > 0 ? proj_size_ : hidden_size_;
    // (blocks, SLABS, I + R, SLAB); int8 packs pad I and R to even row counts: the first dense weight says I.
    input_size_ = weights_[0].scalar_type() == at::kChar && !sources.empty() ? sources[0].size(1)
                                                                              : weights_[0].size(2) - state_size_;
    for (size_t i = 0; i < names.size(); ++i) {
      const at::Tensor& t = sources[i];
      // An inference tensor has no version counter: it can only change under inference_mode, where
      // nothing sees it, and Python repacks it on request (repack()).
      sources_.push_back(Source{pybind11::str(names[i]), t.unsafeGetTensorImpl(),
                                t.is_inference() ? -1 : static_cast<int64_t>(t._version()), t.data_ptr()});
    }
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& input,
                                                         const std::optional<at::Tensor>& batch_sizes,
                                                         const std::optional<at::Tensor>& hx,
                                                         const std::optional<at::Tensor>& cx, bool batch_first) const {
    pybind11::gil_scoped_release no_gil;
    return recurrent(input, batch_sizes, hx, cx, weights_, biases_, hidden_size_, bidirectional_, batch_first,
                     projections_, proj_size_, cell_);
  }

  // nn.GRU's or nn.RNN's call (packs from pack_gru, pack_rnn), as try_forward with hx None or one tensor;
  // returns (output, h_n).
  pybind11::object try_one_state(pybind11::handle input, pybind11::handle hx, bool batch_first,
                                 pybind11::handle params) const {
    if (cell_ == Cell::lstm) return pybind11::none();
    std::optional<at::Tensor> h;
    const std::optional<std::tuple<bool, int64_t>> call = tensor_call(input, batch_first);
    if (!call.has_value()) return pybind11::none();
    const auto [batched, batch] = *call;
    if (!hx.is_none()) {
      h = state_of(hx, batched, batch, hidden_size_);
      if (!h.has_value()) return pybind11::none();
    }
    if (!current(params)) return pybind11::none();
    auto [out, h_n, scratch] = forward(THPVariable_Unpack(input.ptr()), std::nullopt, h, std::nullopt, batch_first);
    return pybind11::make_tuple(out, h_n);
  }

  // input and hx as nn.LSTM.forward got them; params: the module's _parameters.
  pybind11::object try_forward(pybind11::handle input, pybind11::handle hx, bool batch_first,
                               pybind11::handle params) const {
    if (cell_ != Cell::lstm) return pybind11::none();
    const std::optional<std::tuple<bool, int64_t>> call = tensor_call(input, batch_first);
    if (!call.has_value()) return pybind11::none();
    const auto [batched, batch] = *call;
    std::optional<at::Tensor> h, c;
    if (!hx.is_none()) {
      if (!(PyTuple_Check(hx.ptr()) || PyList_Check(hx.ptr())) || PySequence_Size(hx.ptr()) != 2)
        return pybind11::none();
      const pybind11::sequence pair = pybind11::reinterpret_borrow<pybind11::sequence>(hx);
      h = state_of(pair[0], batched, batch, state_size_);  // proj_size wide in an LSTMP
      c = state_of(pair[1], batched, batch, hidden_size_);
      if (!h.has_value() || !c.has_value()) return pybind11::none();
    }
    if (!current(params)) return pybind11::none();
    auto [out, h_n, c_n] = forward(THPVariable_Unpack(input.ptr()), std::nullopt, h, c, batch_first);
    return pybind11::make_tuple(out, pybind11::make_tuple(h_n, c_n));
  }

  // nn.LSTMCell's or nn.GRUCell's call (these packs then hold one layer): input (B, I) or unbatched (I,),
  // hx None or, for an LSTMCell, (h, c), for a GRUCell h, each (B, H) or (H,). Returns what the cell
  // returns ((h', c'), or h'), or None as try_forward.
  pybind11::object try_cell(pybind11::handle input, pybind11::handle hx, pybind11::handle params) const {
    if (!THPVariable_CheckExact(input.ptr()) || biases_.size() != 1 || proj_size_ > 0 ||
        (cell_ != Cell::lstm && cell_ != Cell::gru))
      return pybind11::none();
    const at::Tensor& x = THPVariable_Unpack(input.ptr());
    if (!plain(x) || (x.dim() != 1 && x.dim() != 2) || x.size(-1) != input_size_) return pybind11::none();
    const bool batched = x.dim() == 2;
    const int64_t batch = batched ? x.size(0) : 1;
    if (batch == 0) return pybind11::none();
    auto cell_state = [&](pybind11::handle item) -> std::optional<at::Tensor> {
      if (!THPVariable_CheckExact(item.ptr())) return std::nullopt;
      const at::Tensor& state = THPVariable_Unpack(item.ptr());
      const bool shaped = batched ? state.dim() == 2 && state.size(0) == batch && state.size(1) == hidden_size_
                                  : state.dim() == 1 && state.size(0) == hidden_size_;
      if (!plain(state) || !shaped) return std::nullopt;
      return state.reshape({1, batch, hidden_size_});
    };
    std::optional<at::Tensor> h, c;
    if (!hx.is_none()) {
      if (cell_ == Cell::gru) {
        h = cell_state(hx);
        if (!h.has_value()) return pybind11::none();
      } else {
        if (!(PyTuple_Check(hx.ptr()) || PyList_Check(hx.ptr())) || PySequence_Size(hx.ptr()) != 2)
          return pybind11::none();
        const pybind11::sequence pair = pybind11::reinterpret_borrow<pybind11::sequence>(hx);
        h = cell_state(pair[0]);
        c = cell_state(pair[1]);
        if (!h.has_value() || !c.has_value()) return pybind11::none();
      }
    }
    if (!current(params)) return pybind11::none();
    at::Tensor h_n, c_n;
    {
      pybind11::gil_scoped_release no_gil;
      std::tie(std::ignore, h_n, c_n) =
          recurrent(x.reshape({1, batch, input_size_}), std::nullopt, h, c, weights_, biases_, hidden_size_, false,
                    false, {}, 0, cell_);
    }
    const std::vector<int64_t> shape = batched ? std::vector<int64_t>{batch, hidden_size_}
                                               : std::vector<int64_t>{hidden_size_};
    if (cell_ == Cell::gru) return pybind11::cast(h_n.view(shape));
    return pybind11::make_tuple(h_n.view(shape), c_n.view(shape));
  }

 private:
  struct Source {
    pybind11::str name;
    const c10::TensorImpl* impl;
    int64_t version;
    const void* data;
  };

  static bool plain(const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_cpu() && t.layout() == at::kStrided && !t.is_neg();
  }

  // Whether input is a tensor call these packs serve (batched: (T, B, I) or batch first; or (T, I)), and
  // then whether it is batched and its batch size.
  std::optional<std::tuple<bool, int64_t>> tensor_call(pybind11::handle input, bool batch_first) const {
    if (!THPVariable_CheckExact(input.ptr())) return std::nullopt;
    const at::Tensor& x = THPVariable_Unpack(input.ptr());
    if (!plain(x) || (x.dim() != 2 && x.dim() != 3)) return std::nullopt;
    const bool batched = x.dim() == 3;
    const int64_t steps = batched ? x.size(batch_first ? 1 : 0) : x.size(0);
    const int64_t batch = batched ? x.size(batch_first ? 0 : 1) : 1;
    if (steps == 0 || batch == 0 || x.size(-1) != input_size_) return std::nullopt;
    return std::make_tuple(batched, batch);
  }

  // item as one initial state of these packs, (layers * directions, batch, units) or unbatched
  // (layers * directions, units), else nullopt.
  std::optional<at::Tensor> state_of(pybind11::handle item, bool batched, int64_t batch, int64_t units) const {
    if (!THPVariable_CheckExact(item.ptr())) return std::nullopt;
    const at::Tensor& state = THPVariable_Unpack(item.ptr());
    const int64_t states = static_cast<int64_t>(biases_.size());
    const bool shaped = batched ? state.dim() == 3 && state.size(0) == states && state.size(1) == batch &&
                                      state.size(2) == units
                                : state.dim() == 2 && state.size(0) == states && state.size(1) == units;
    if (!plain(state) || !shaped) return std::nullopt;
    return state;
  }

  // Whether the module's parameters are still the tensors these packs were made from, unchanged.
  bool current(pybind11::handle params) const {
    if (!PyDict_Check(params.ptr())) return false;
    for (const Source& source : sources_) {
      PyObject* found = PyDict_GetItem(params.ptr(), source.name.ptr());  // borrowed
      if (found == nullptr || !THPVariable_CheckExact(found)) return false;
      const at::Tensor& t = THPVariable_Unpack(found);
      if (t.unsafeGetTensorImpl() != source.impl || t.data_ptr() != source.data) return false;
      if (source.version >= 0 && static_cast<int64_t>(t._version()) != source.version) return false;
    }
    return true;
  }

  std::vector<at::Tensor> weights_, biases_, projections_;
  int64_t hidden_size_, proj_size_, state_size_, input_size_;
  bool bidirectional_;
  Cell cell_;
  std::vector<Source> sources_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // module_local: two builds loaded in one process (a stale cache, tests) must not clash
  pybind11::class_<Packs>(m, "Packs", pybind11::module_local())
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t,
                          int64_t, bool, const std::string&, std::vector<std::string>, std::vector<at::Tensor>>())
      .def("forward", &Packs::forward)
      .def("try_forward", &Packs::try_forward)
      .def("try_cell", &Packs::try_cell)
      .def("try_one_state", &Packs::try_one_state);
}
