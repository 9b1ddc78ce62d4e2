// Ops on dense weights, for torch.export programs (lstmopt's --format pt2): the program's parameters
// stay the true weights, and each op packs them on its first call, on the CPU that runs it, then reuses
// the packs for as long as the weights are the same tensors, unchanged (an ExportedProgram passes its
// parameters to every call). Two kernels: the oneDNN op on reordered weights (bit-identical to nn.LSTM,
// as PackedLSTM's default) and lstm.cpp's native kernel.
//
// Unlike lstm.cpp's ops, whose callers are lstmopt's own checked code, these take what a saved program
// hands them: every argument the kernels would trust is checked here first (the oneDNN op checks almost
// nothing: a wrong bias size or an empty batch crashes the process).

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/mkldnn_rnn_layer.h>
#include <ATen/ops/zeros.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <functional>
#include <initializer_list>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "kernel.h"

namespace {

using Tensor = at::Tensor;
using MaybeTensor = std::optional<at::Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;

int64_t version_of(const Tensor& t) { return t.is_inference() ? -1 : static_cast<int64_t>(t._version()); }

// Packs per weight set, most recently used first. Entries hold their weights weakly (a program freed is
// not kept alive here) and are dropped when a weight is gone; the few kept bound what stale packs cost.
template <class Packed>
class PackCache {
 public:
  std::shared_ptr<const Packed> get(at::TensorList dense, const std::vector<int64_t>& config,
                                    const std::function<Packed()>& make) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        if (it->expired()) {
          it = entries_.erase(it);
        } else if (it->matches(dense, config)) {
          entries_.splice(entries_.begin(), entries_, it);
          return entries_.front().packed;
        } else {
          ++it;
        }
      }
    }
    auto packed = std::make_shared<const Packed>(make());  // unlocked: packing a large LSTM takes milliseconds
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.push_front(Entry{{}, {}, {}, config, packed});
    for (const Tensor& t : dense) {
      entries_.front().weights.emplace_back(t.getIntrusivePtr());
      entries_.front().data.push_back(t.data_ptr());
      entries_.front().versions.push_back(version_of(t));
    }
    if (entries_.size() > CAPACITY) entries_.pop_back();
    return packed;
  }

 private:
  static constexpr size_t CAPACITY = 32;
  struct Entry {
    std::vector<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> weights;
    std::vector<const void*> data;
    std::vector<int64_t> versions;
    std::vector<int64_t> config;
    std::shared_ptr<const Packed> packed;

    bool expired() const {
      for (const auto& weak : weights)
        if (weak.expired()) return true;
      return false;
    }
    bool matches(at::TensorList dense, const std::vector<int64_t>& wanted) const {
      if (dense.size() != weights.size() || wanted != config) return false;
      for (size_t i = 0; i < dense.size(); ++i) {
        if (weights[i]._unsafe_get_target() != dense[i].unsafeGetTensorImpl() || data[i] != dense[i].data_ptr() ||
            versions[i] != version_of(dense[i]))
          return false;
      }
      return true;
    }
  };
  std::mutex mutex_;
  std::list<Entry> entries_;
};

// nn.LSTM's (or nn.GRU's, gates = 3) flat weights for this input: float32 CPU tensors of nn.LSTM's
// shapes, layer by layer; returns the input size per layer and direction.
void check_dense(at::TensorList dense, const Tensor& input, int64_t hidden_size, int64_t num_layers,
                 bool bidirectional, bool has_biases, int64_t proj_size, int64_t gates, const char* op) {
  const int64_t D = bidirectional ? 2 : 1, H = hidden_size, R = proj_size > 0 ? proj_size : H;
  const int64_t per_layer = (has_biases ? 4 : 2) + (proj_size > 0 ? 1 : 0);
  TORCH_CHECK(H > 0 && num_layers > 0 && proj_size >= 0 && proj_size < H &&
                  static_cast<int64_t>(dense.size()) == num_layers * D * per_layer,
              op, ": expected the flat weights of ", num_layers, " layers");
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.is_cpu() && input.layout() == at::kStrided &&
                  (input.dim() == 2 || input.dim() == 3),
              op, ": input must be a 2-D or 3-D float32 CPU tensor");
  for (int64_t s = 0; s < num_layers * D; ++s) {
    const int64_t I = s < D ? input.size(-1) : D * R;
    for (int64_t k = 0; k < per_layer; ++k) {
      const Tensor& w = dense[s * per_layer + k];
      const std::vector<int64_t> expected =
          k == 0 ? std::vector<int64_t>{gates * H, I}
          : k == 1 ? std::vector<int64_t>{gates * H, R}
          : (has_biases && k < 4) ? std::vector<int64_t>{gates * H}
                                  : std::vector<int64_t>{R, H};
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_cpu() && w.layout() == at::kStrided &&
                      w.sizes() == at::IntArrayRef(expected),
                  op, ": weight ", k, " of layer ", s / D, " must be float32 of size ", at::IntArrayRef(expected),
                  ", got ", w.sizes());
    }
  }
}

// Batched states are (states, B, units), unbatched (states, units); both B and the steps must be > 0
// (the kernels have no empty case).
void check_states(const Tensor& input, bool batch_first, int64_t states,
                  std::initializer_list<std::pair<const MaybeTensor*, int64_t>> given, const char* op) {
  const bool batched = input.dim() == 3;
  const int64_t T = batched ? input.size(batch_first ? 1 : 0) : input.size(0);
  const int64_t B = batched ? input.size(batch_first ? 0 : 1) : 1;
  TORCH_CHECK(T > 0 && B > 0, op, ": the input holds no steps or no batch (", input.sizes(), ")");
  for (const auto& [state, units] : given) {
    if (!state->has_value()) continue;
    const Tensor& s = **state;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_cpu() && s.layout() == at::kStrided, op,
                ": states must be float32 CPU tensors");
    const std::vector<int64_t> expected = batched ? std::vector<int64_t>{states, B, units}
                                                  : std::vector<int64_t>{states, units};
    TORCH_CHECK(s.sizes() == at::IntArrayRef(expected), op, ": expected a state of size ",
                at::IntArrayRef(expected), ", got ", s.sizes());
  }
}

struct NativePacked {
  std::vector<Tensor> weights, biases, projections;
};

PackCache<NativePacked>& native_cache() {
  static PackCache<NativePacked> cache;
  return cache;
}

Triple lstm_dense(const Tensor& input, const MaybeTensor& hx, const MaybeTensor& cx, at::TensorList dense,
                  int64_t hidden_size, int64_t num_layers, bool bidirectional, bool batch_first, bool has_biases,
                  int64_t proj_size) {
  const char* op = "lstmopt::lstm_dense";
  check_dense(dense, input, hidden_size, num_layers, bidirectional, has_biases, proj_size, 4, op);
  check_states(input, batch_first, num_layers * (bidirectional ? 2 : 1),
               {{&hx, proj_size > 0 ? proj_size : hidden_size}, {&cx, hidden_size}}, op);
  TORCH_CHECK(hx.has_value() == cx.has_value(), op, ": give both states or neither");
  const auto packed = native_cache().get(dense, {0, hidden_size, has_biases, proj_size}, [&] {
    auto [weights, biases] = pack(dense, hidden_size, has_biases, proj_size);
    return NativePacked{weights, biases,
                        proj_size > 0 ? pack_projections(dense, hidden_size, has_biases, proj_size)
                                      : std::vector<Tensor>{}};
  });
  return recurrent(input, std::nullopt, hx, cx, packed->weights, packed->biases, hidden_size, bidirectional,
                   batch_first, packed->projections, proj_size, Cell::lstm);
}

std::tuple<Tensor, Tensor> gru_dense(const Tensor& input, const MaybeTensor& hx, at::TensorList dense,
                                     int64_t hidden_size, int64_t num_layers, bool bidirectional, bool batch_first,
                                     bool has_biases) {
  const char* op = "lstmopt::gru_dense";
  check_dense(dense, input, hidden_size, num_layers, bidirectional, has_biases, 0, 3, op);
  check_states(input, batch_first, num_layers * (bidirectional ? 2 : 1), {{&hx, hidden_size}}, op);
  const auto packed = native_cache().get(dense, {1, hidden_size, has_biases}, [&] {
    auto [weights, biases] = pack_gru(dense, hidden_size, has_biases);
    return NativePacked{weights, biases, {}};
  });
  auto [out, h_n, scratch] = recurrent(input, std::nullopt, hx, std::nullopt, packed->weights, packed->biases,
                                       hidden_size, bidirectional, batch_first, {}, 0, Cell::gru);
  return {out, h_n};
}

std::tuple<Tensor, Tensor> rnn_dense(const Tensor& input, const MaybeTensor& hx, at::TensorList dense,
                                     int64_t hidden_size, int64_t num_layers, bool bidirectional, bool batch_first,
                                     bool has_biases, c10::string_view nonlinearity) {
  const char* op = "lstmopt::rnn_dense";
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu", op, ": nonlinearity must be \"tanh\" or \"relu\"");
  check_dense(dense, input, hidden_size, num_layers, bidirectional, has_biases, 0, 1, op);
  check_states(input, batch_first, num_layers * (bidirectional ? 2 : 1), {{&hx, hidden_size}}, op);
  const auto packed = native_cache().get(dense, {2, hidden_size, has_biases}, [&] {
    auto [weights, biases] = pack_rnn(dense, hidden_size, has_biases);
    return NativePacked{weights, biases, {}};
  });
  auto [out, h_n, scratch] = recurrent(input, std::nullopt, hx, std::nullopt, packed->weights, packed->biases,
                                       hidden_size, bidirectional, batch_first, {}, 0,
                                       nonlinearity == "relu" ? Cell::rnn_relu : Cell::rnn_tanh);
  return {out, h_n};
}

// Per layer and direction: the two weight matrices reordered for oneDNN, and the two biases.
struct OnednnPacked {
  std::vector<std::vector<Tensor>> layers;
};

PackCache<OnednnPacked>& onednn_cache() {
  static PackCache<OnednnPacked> cache;
  return cache;
}

// PackedLSTM's default kernel (lstmopt/kernels/aten.py run_onednn): one aten.mkldnn_rnn_layer per layer
// and direction, on weights reordered once by mkldnn._reorder_mkldnn_rnn_layer_weight.
Triple onednn_lstm_dense(const Tensor& input, const MaybeTensor& hx, const MaybeTensor& cx, at::TensorList dense,
                         int64_t hidden_size, int64_t num_layers, bool bidirectional, bool batch_first,
                         bool has_biases) {
  const char* op = "lstmopt::onednn_lstm_dense";
  check_dense(dense, input, hidden_size, num_layers, bidirectional, has_biases, 0, 4, op);
  const int64_t D = bidirectional ? 2 : 1, S = num_layers * D, H = hidden_size;
  check_states(input, batch_first, S, {{&hx, H}, {&cx, H}}, op);
  TORCH_CHECK(hx.has_value() == cx.has_value(), op, ": give both states or neither");
  const int64_t per_layer = has_biases ? 4 : 2;
  const auto packed = onednn_cache().get(dense, {2, H, has_biases, bidirectional}, [&] {
    static const auto reorder =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_reorder_mkldnn_rnn_layer_weight", "");
    OnednnPacked result;
    for (int64_t s = 0; s < S; ++s) {
      const bool reverse = s % D == 1;
      torch::jit::Stack stack{dense[s * per_layer].contiguous(), dense[s * per_layer + 1].contiguous(), H, reverse,
                              has_biases, false, c10::IValue()};
      reorder.callBoxed(&stack);
      std::vector<Tensor> layer = stack[0].toTensorVector();
      const Tensor empty = dense[0].new_empty({0});
      layer.resize(2);
      layer.push_back(has_biases ? dense[s * per_layer + 2].contiguous() : empty);
      layer.push_back(has_biases ? dense[s * per_layer + 3].contiguous() : empty);
      result.layers.push_back(std::move(layer));
    }
    return result;
  });

  // As run_onednn: the op reads dim 0 as time and trusts the memory to be dense; states go in as (1, B, H).
  const bool batched = input.dim() == 3;
  Tensor x = (batched ? (batch_first ? input.transpose(0, 1) : input) : input.unsqueeze(1)).contiguous();
  const int64_t B = x.size(1);
  const Tensor zeros = at::zeros({1, B, H}, x.options());
  auto state = [&](const MaybeTensor& given, int64_t s) {
    if (!given.has_value()) return zeros;
    return (batched ? given->select(0, s) : given->select(0, s).unsqueeze(0)).unsqueeze(0).contiguous();
  };
  std::vector<Tensor> hs, cs;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    std::vector<Tensor> outs;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t s = layer * D + d;
      const std::vector<Tensor>& w = packed->layers[s];
      // mode 2 is ideep::rnn_kind::LSTM; one layer, one direction, time-major, inference.
      auto [y, h, c, workspace] = at::mkldnn_rnn_layer(x, w[0], w[1], w[2], w[3], state(hx, s), state(cx, s),
                                                       d == 1, {}, 2, H, 1, has_biases, false, false, false);
      outs.push_back(y);
      hs.push_back(h);
      cs.push_back(c);
    }
    x = D == 1 ? outs[0] : at::cat(outs, 2);
  }
  Tensor h_n = at::cat(hs, 0), c_n = at::cat(cs, 0);
  if (!batched) return {x.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)};
  return {batch_first ? x.transpose(0, 1) : x, h_n, c_n};
}

// The shapes of a call, for torch.export and torch.compile (fake tensors, symbolic batch and time): here,
// so that a program can be traced again (re-exported, compiled by AOTInductor) where lstmopt is not
// installed, only this library loaded. The feature size is specialized: the weights fix it.
Triple dense_shapes(const Tensor& input, at::TensorList dense, int64_t hidden_size, int64_t num_layers,
                    bool bidirectional, bool batch_first, int64_t proj_size, const char* op) {
  const int64_t D = bidirectional ? 2 : 1, S = num_layers * D, units = proj_size > 0 ? proj_size : hidden_size;
  TORCH_CHECK((input.dim() == 2 || input.dim() == 3) && !dense.empty() && dense[0].dim() == 2, op,
              ": input must be 2-D or 3-D");
  TORCH_CHECK(input.sym_size(-1).guard_int(__FILE__, __LINE__) == dense[0].size(1), op,
              ": the input has another feature size than the weights");
  if (input.dim() == 2) {
    const c10::SymInt T = input.sym_size(0);
    return {input.new_empty_symint({T, D * units}), input.new_empty_symint({S, units}),
            input.new_empty_symint({S, hidden_size})};
  }
  const c10::SymInt T = input.sym_size(batch_first ? 1 : 0), B = input.sym_size(batch_first ? 0 : 1);
  Tensor output = input.new_empty_symint({T, B, D * units});  // computed time-major: batch_first gets a view
  return {batch_first ? output.transpose(0, 1) : output, input.new_empty_symint({S, B, units}),
          input.new_empty_symint({S, B, hidden_size})};
}

Triple lstm_dense_meta(const Tensor& input, const MaybeTensor&, const MaybeTensor&, at::TensorList dense,
                       int64_t hidden_size, int64_t num_layers, bool bidirectional, bool batch_first, bool,
                       int64_t proj_size) {
  return dense_shapes(input, dense, hidden_size, num_layers, bidirectional, batch_first, proj_size,
                      "lstmopt::lstm_dense");
}

Triple onednn_lstm_dense_meta(const Tensor& input, const MaybeTensor&, const MaybeTensor&, at::TensorList dense,
                              int64_t hidden_size, int64_t num_layers, bool bidirectional, bool batch_first, bool) {
  return dense_shapes(input, dense, hidden_size, num_layers, bidirectional, batch_first, 0,
                      "lstmopt::onednn_lstm_dense");
}

std::tuple<Tensor, Tensor> gru_dense_meta(const Tensor& input, const MaybeTensor&, at::TensorList dense,
                                          int64_t hidden_size, int64_t num_layers, bool bidirectional,
                                          bool batch_first, bool) {
  auto [output, h_n, scratch] =
      dense_shapes(input, dense, hidden_size, num_layers, bidirectional, batch_first, 0, "lstmopt::gru_dense");
  return {output, h_n};
}

std::tuple<Tensor, Tensor> rnn_dense_meta(const Tensor& input, const MaybeTensor&, at::TensorList dense,
                                          int64_t hidden_size, int64_t num_layers, bool bidirectional,
                                          bool batch_first, bool, c10::string_view) {
  auto [output, h_n, scratch] =
      dense_shapes(input, dense, hidden_size, num_layers, bidirectional, batch_first, 0, "lstmopt::rnn_dense");
  return {output, h_n};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lstmopt, m) {
  m.def("lstm_dense(Tensor input, Tensor? hx, Tensor? cx, Tensor[] dense, int hidden_size, int num_layers, "
        "bool bidirectional, bool batch_first, bool has_biases, int proj_size=0) -> (Tensor, Tensor, Tensor)");
  m.def("gru_dense(Tensor input, Tensor? hx, Tensor[] dense, int hidden_size, int num_layers, bool bidirectional, "
        "bool batch_first, bool has_biases) -> (Tensor, Tensor)");
  m.def("rnn_dense(Tensor input, Tensor? hx, Tensor[] dense, int hidden_size, int num_layers, bool bidirectional, "
        "bool batch_first, bool has_biases, str nonlinearity) -> (Tensor, Tensor)");
  m.def("onednn_lstm_dense(Tensor input, Tensor? hx, Tensor? cx, Tensor[] dense, int hidden_size, int num_layers, "
        "bool bidirectional, bool batch_first, bool has_biases) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lstmopt, CPU, m) {
  m.impl("lstm_dense", &lstm_dense);
  m.impl("gru_dense", &gru_dense);
  m.impl("rnn_dense", &rnn_dense);
  m.impl("onednn_lstm_dense", &onednn_lstm_dense);
}

TORCH_LIBRARY_IMPL(lstmopt, Meta, m) {
  m.impl("lstm_dense", &lstm_dense_meta);
  m.impl("gru_dense", &gru_dense_meta);
  m.impl("rnn_dense", &rnn_dense_meta);
  m.impl("onednn_lstm_dense", &onednn_lstm_dense_meta);
}
