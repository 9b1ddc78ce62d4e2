// The pack ops: nn.LSTM's, nn.GRU's and nn.RNN's flat weights in the native kernel's layout (fp32, bf16 or int8), and
// LSTMP's projections. The layout depends on the vector width the variant was built for (simd.h), so each
// variant's library makes its own packs, wherever it runs.

// The narrowest headers that serve, as in lstm.cpp.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernel.h"
#include "simd.h"

namespace {

// The block layout of every pack: gate rows (4, blocks * UNITS, K), four gate slots of each unit's rows, as
// (blocks, SLABS, K, SLAB), whose column c of slab s is gate (s * SLAB + c) / 16 of unit 16 * block +
// (s * SLAB + c) % 16 (a view: the caller makes it contiguous, in its element type).
at::Tensor by_slab(const at::Tensor& rows, int64_t blocks) {
  const int64_t K = rows.size(2);
  return rows.view({4, blocks, UNITS, K}).permute({1, 3, 0, 2}).reshape({blocks, K, SLABS, SLAB}).permute({0, 2, 1, 3});
}

// One value per gate row, (4, blocks * UNITS), in the same order: (blocks, WIDTH).
at::Tensor by_block(const at::Tensor& per_gate_row, int64_t blocks) {
  return per_gate_row.view({4, blocks, UNITS}).permute({1, 0, 2}).reshape({blocks, WIDTH}).contiguous();
}

// nn.LSTM's flat weights (no projection) as int8 packs (see "int8 weights" above): per layer and
// direction, weights (blocks, SLABS, Iq + Rq, SLAB) int8, rows paired within each slab, and (blocks, 3,
// WIDTH) fp32: b_ih + b_hh, then the scales of each gate row's input part and recurrent part.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pack_int8(at::TensorList dense, int64_t hidden_size,
                                                                       bool has_biases) {
  const int64_t H = hidden_size, per_layer = has_biases ? 4 : 2;
  const int64_t blocks = (H + UNITS - 1) / UNITS, padded = blocks * UNITS;
  TORCH_CHECK(H > 0 && !dense.empty() && static_cast<int64_t>(dense.size()) % per_layer == 0,
              "lstmopt::pack: expected nn.LSTM's flat weights");
  // Rows as (4, padded, n) int8 and their scales (4, padded): w ~ q * scale, per row.
  auto quantize = [&](const at::Tensor& w, int64_t n) {
    const at::Tensor rows = w.reshape({4, H, n});
    const at::Tensor scale = rows.abs().amax(2, true).div(127.0f);
    const at::Tensor safe = scale.clamp_min(std::numeric_limits<float>::min());
    at::Tensor q = at::zeros({4, padded, even(n)}, w.options().dtype(at::kChar));
    q.narrow(1, 0, H).narrow(2, 0, n).copy_(rows.div(safe).round().clamp(-127, 127));
    at::Tensor s = at::zeros({4, padded}, w.options());
    s.narrow(1, 0, H).copy_(scale.squeeze(2));
    return std::make_pair(q, s);
  };
  std::vector<at::Tensor> weights, biases;
  for (size_t i = 0; i < dense.size(); i += per_layer) {
    const at::Tensor &w_ih = dense[i], &w_hh = dense[i + 1];
    TORCH_CHECK(w_ih.scalar_type() == at::kFloat && w_hh.scalar_type() == at::kFloat && w_ih.dim() == 2 &&
                    w_ih.size(0) == 4 * H && w_hh.sizes() == at::IntArrayRef({4 * H, H}),
                "lstmopt::pack: weights must be float32 (4 * hidden, input) and (4 * hidden, hidden)");
    const auto [q_ih, s_ih] = quantize(w_ih, w_ih.size(1));
    const auto [q_hh, s_hh] = quantize(w_hh, H);
    const at::Tensor full = at::cat({q_ih, q_hh}, 2);  // (4, padded, Kq)
    const int64_t Kq = full.size(2);
    weights.push_back(by_slab(full, blocks).reshape({blocks, SLABS, Kq / 2, 2, SLAB}).transpose(3, 4)
                          .contiguous().view({blocks, SLABS, Kq, SLAB}));
    at::Tensor bias = at::zeros({4, padded}, w_ih.options());
    if (has_biases) {
      TORCH_CHECK(dense[i + 2].numel() == 4 * H && dense[i + 3].numel() == 4 * H, "lstmopt::pack: bias sizes");
      bias.narrow(1, 0, H).copy_(dense[i + 2].add(dense[i + 3]).reshape({4, H}));
    }
    biases.push_back(at::stack({by_block(bias, blocks), by_block(s_ih, blocks), by_block(s_hh, blocks)}, 1));
  }
  return {weights, biases};
}

}  // namespace

// nn.LSTM's flat weights (w_ih, w_hh[, b_ih, b_hh][, w_hr] per layer and direction) in this kernel's layout:
// per layer and direction, weights (blocks, SLABS, I + R, SLAB) (by_slab) and biases (blocks, WIDTH), b_ih + b_hh;
// R is proj_size, or hidden_size without a projection. The layout depends on the vector width the kernel
// was built for, so the kernel makes it, wherever it runs.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pack(at::TensorList dense, int64_t hidden_size,
                                                                  bool has_biases, int64_t proj_size,
                                                                  std::string weights_format) {
  TORCH_CHECK(weights_format == "float32" || weights_format == "bfloat16" || (weights_format == "int8" && proj_size == 0),
              "lstmopt::pack: weights must be \"float32\", \"bfloat16\" or (without a projection) \"int8\", got ",
              weights_format);
  if (weights_format == "int8") return pack_int8(dense, hidden_size, has_biases);
  const int64_t H = hidden_size, R = proj_size > 0 ? proj_size : H;
  const int64_t per_layer = (has_biases ? 4 : 2) + (proj_size > 0 ? 1 : 0);
  const int64_t blocks = (H + UNITS - 1) / UNITS, padded = blocks * UNITS;
  TORCH_CHECK(H > 0 && proj_size >= 0 && proj_size < H && !dense.empty() &&
                  static_cast<int64_t>(dense.size()) % per_layer == 0,
              "lstmopt::pack: expected nn.LSTM's flat weights");
  std::vector<at::Tensor> weights, biases;
  for (size_t i = 0; i < dense.size(); i += per_layer) {
    const at::Tensor &w_ih = dense[i], &w_hh = dense[i + 1];
    TORCH_CHECK(w_ih.scalar_type() == at::kFloat && w_hh.scalar_type() == at::kFloat && w_ih.dim() == 2 &&
                    w_ih.size(0) == 4 * H && w_hh.sizes() == at::IntArrayRef({4 * H, R}),
                "lstmopt::pack: weights must be float32 (4 * hidden, input) and (4 * hidden, hidden or proj)");
    const int64_t K = w_ih.size(1) + R;
    at::Tensor full = at::zeros({4, padded, K}, w_ih.options());
    full.narrow(1, 0, H).copy_(at::cat({w_ih, w_hh}, 1).reshape({4, H, K}));
    weights.push_back(by_slab(full, blocks).contiguous());
    at::Tensor bias = at::zeros({4, padded}, w_ih.options());
    if (has_biases) {
      TORCH_CHECK(dense[i + 2].numel() == 4 * H && dense[i + 3].numel() == 4 * H, "lstmopt::pack: bias sizes");
      bias.narrow(1, 0, H).copy_(dense[i + 2].add(dense[i + 3]).reshape({4, H}));
    }
    biases.push_back(by_block(bias, blocks));
  }
  if (weights_format == "bfloat16")  // rounded to nearest even; biases (and projections) stay fp32
    for (at::Tensor& w : weights) w = w.to(at::kBFloat16);
  return {weights, biases};
}

// The projections of an LSTM with proj_size > 0 (w_hr, (P, H), last of each layer and direction's flat
// weights), per layer and direction (pblocks, SLABS, H, SLAB): block b's column c of slab s is hidden-state
// unit 64 * b + s * SLAB + c, over the H rows of o * tanh(c).
std::vector<at::Tensor> pack_projections(at::TensorList dense, int64_t hidden_size, bool has_biases,
                                         int64_t proj_size) {
  const int64_t H = hidden_size, P = proj_size, per_layer = has_biases ? 5 : 3;
  const int64_t pblocks = (P + WIDTH - 1) / WIDTH;
  TORCH_CHECK(P > 0 && P < H && static_cast<int64_t>(dense.size()) % per_layer == 0,
              "lstmopt::pack_projections: expected the flat weights of an LSTM with 0 < proj_size < hidden_size");
  std::vector<at::Tensor> projections;
  for (size_t i = per_layer - 1; i < dense.size(); i += per_layer) {
    const at::Tensor& w_hr = dense[i];
    TORCH_CHECK(w_hr.scalar_type() == at::kFloat && w_hr.sizes() == at::IntArrayRef({P, H}),
                "lstmopt::pack_projections: weight_hr must be float32 (proj, hidden)");
    at::Tensor full = at::zeros({pblocks * WIDTH, H}, w_hr.options());
    full.narrow(0, 0, P).copy_(w_hr);
    projections.push_back(full.view({pblocks, SLABS, SLAB, H}).permute({0, 1, 3, 2}).contiguous());
  }
  return projections;
}

// nn.GRU's flat weights (w_ih, w_hh[, b_ih, b_hh] per layer and direction, gates [r, z, n]) in the same
// layout as pack's, with four gate slots per block, [r, z, n_x, n_h] (see gru_cell): the input rows hold
// W_ir, W_iz, W_in, 0 and the recurrent rows W_hr, W_hz, 0, W_hn; biases b_ir + b_hr, b_iz + b_hz, b_in, b_hn.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pack_gru(at::TensorList dense, int64_t hidden_size,
                                                                      bool has_biases) {
  const int64_t H = hidden_size, per_layer = has_biases ? 4 : 2;
  const int64_t blocks = (H + UNITS - 1) / UNITS, padded = blocks * UNITS;
  TORCH_CHECK(H > 0 && !dense.empty() && static_cast<int64_t>(dense.size()) % per_layer == 0,
              "lstmopt::pack_gru: expected nn.GRU's flat weights");
  std::vector<at::Tensor> weights, biases;
  for (size_t i = 0; i < dense.size(); i += per_layer) {
    const at::Tensor &w_ih = dense[i], &w_hh = dense[i + 1];
    TORCH_CHECK(w_ih.scalar_type() == at::kFloat && w_hh.scalar_type() == at::kFloat && w_ih.dim() == 2 &&
                    w_ih.size(0) == 3 * H && w_hh.sizes() == at::IntArrayRef({3 * H, H}),
                "lstmopt::pack_gru: weights must be float32 (3 * hidden, input) and (3 * hidden, hidden)");
    const int64_t I = w_ih.size(1), K = I + H;
    at::Tensor full = at::zeros({4, padded, K}, w_ih.options());
    const at::Tensor gates_ih = w_ih.view({3, H, I}), gates_hh = w_hh.view({3, H, H});
    for (int64_t g = 0; g < 2; ++g) {  // r, z: input and recurrent rows
      full[g].narrow(0, 0, H).narrow(1, 0, I).copy_(gates_ih[g]);
      full[g].narrow(0, 0, H).narrow(1, I, H).copy_(gates_hh[g]);
    }
    full[2].narrow(0, 0, H).narrow(1, 0, I).copy_(gates_ih[2]);  // n_x
    full[3].narrow(0, 0, H).narrow(1, I, H).copy_(gates_hh[2]);  // n_h
    weights.push_back(by_slab(full, blocks).contiguous());
    at::Tensor bias = at::zeros({4, padded}, w_ih.options());
    if (has_biases) {
      TORCH_CHECK(dense[i + 2].numel() == 3 * H && dense[i + 3].numel() == 3 * H, "lstmopt::pack_gru: bias sizes");
      const at::Tensor b_ih = dense[i + 2].view({3, H}), b_hh = dense[i + 3].view({3, H});
      bias.narrow(1, 0, H).narrow(0, 0, 2).copy_(b_ih.narrow(0, 0, 2).add(b_hh.narrow(0, 0, 2)));
      bias[2].narrow(0, 0, H).copy_(b_ih[2]);
      bias[3].narrow(0, 0, H).copy_(b_hh[2]);
    }
    biases.push_back(by_block(bias, blocks));
  }
  return {weights, biases};
}

// nn.RNN's flat weights (w_ih, w_hh[, b_ih, b_hh] per layer and direction, one gate) in blocks of 64 units:
// per layer and direction (blocks, SLABS, I + H, SLAB), whose column c of slab s is unit 64 * block + s * SLAB
// + c (as pack_projections lays out its rows), and biases (blocks, WIDTH), b_ih + b_hh.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pack_rnn(at::TensorList dense, int64_t hidden_size,
                                                                      bool has_biases) {
  const int64_t H = hidden_size, per_layer = has_biases ? 4 : 2;
  const int64_t blocks = (H + WIDTH - 1) / WIDTH, padded = blocks * WIDTH;
  TORCH_CHECK(H > 0 && !dense.empty() && static_cast<int64_t>(dense.size()) % per_layer == 0,
              "lstmopt::pack_rnn: expected nn.RNN's flat weights");
  std::vector<at::Tensor> weights, biases;
  for (size_t i = 0; i < dense.size(); i += per_layer) {
    const at::Tensor &w_ih = dense[i], &w_hh = dense[i + 1];
    TORCH_CHECK(w_ih.scalar_type() == at::kFloat && w_hh.scalar_type() == at::kFloat && w_ih.dim() == 2 &&
                    w_ih.size(0) == H && w_hh.sizes() == at::IntArrayRef({H, H}),
                "lstmopt::pack_rnn: weights must be float32 (hidden, input) and (hidden, hidden)");
    const int64_t K = w_ih.size(1) + H;
    at::Tensor full = at::zeros({padded, K}, w_ih.options());
    full.narrow(0, 0, H).copy_(at::cat({w_ih, w_hh}, 1));
    weights.push_back(full.view({blocks, SLABS, SLAB, K}).permute({0, 1, 3, 2}).contiguous());
    at::Tensor bias = at::zeros({padded}, w_ih.options());
    if (has_biases) {
      TORCH_CHECK(dense[i + 2].numel() == H && dense[i + 3].numel() == H, "lstmopt::pack_rnn: bias sizes");
      bias.narrow(0, 0, H).copy_(dense[i + 2].add(dense[i + 3]));
    }
    biases.push_back(bias.view({blocks, WIDTH}));
  }
  return {weights, biases};
}
