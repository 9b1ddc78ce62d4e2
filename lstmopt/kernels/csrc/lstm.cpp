// lstmopt's native LSTM kernel: a whole multi-layer, bidirectional LSTM call in one native call.
//
// Streaming models call an LSTM one step or one short chunk at a time, where the cost per call, not the
// arithmetic, is the latency: oneDNN's op builds its primitive on every call, and each PyTorch op called
// from Python costs microseconds. Here a call projects the inputs of all steps at once, then runs each
// step as one pass over the recurrent weights with the gate nonlinearities fused in (a call of one step
// makes one pass over input and recurrent weights together), for tensors and PackedSequences alike (a
// tensor is a packed sequence whose steps all hold the whole batch). Batches run in register tiles of up
// to six rows; a call big enough runs on all of torch's intra-op threads in one
// parallel region, each thread owning a range of hidden units in every layer.
//
// Weights are packed by the pack ops of pack.cpp (lstmopt/kernels/native.py calls them): per layer and
// direction, (blocks, I + H, 64): a block holds 16 hidden units' four gates side by side ([i x16, f x16, g x16, o x16]) over the input rows, then the
// recurrent rows, so that one block's pass streams contiguous memory and its cell update is one
// vectorizable loop; biases (blocks, 64), b_ih + b_hh. An LSTM with proj_size > 0 (LSTMP) has a third
// pass per step, its projection W_hr (o * tanh(c)) to the hidden state, fused after the cell updates in
// the same parallel region. Results are within ~1e-6 of nn.LSTM (the sums run
// in another order and exp is a polynomial), not bit-identical. They do not depend on the vector width or
// the thread count (each sum runs in one order everywhere), except where a GEMM projects many rows.
//
// The Python side checks every argument before calling (lstmopt/modules/guards.py); the checks here only
// make sure nothing can read or write out of bounds.
//
// The files of the ops library, each built once per instruction-set variant (lstmopt/kernels/compile.py):
//   simd.h        vectors, their exp/sigmoid/tanh, the block layout's sizes
//   tiles_fp32.h  register tiles on fp32 and bf16 weights
//   tiles_int8.h  int16 x int8 tiles (the "int8 weights" section)
//   cells.h       the LSTM's and the GRU's cell updates
//   pass.h        one direction of one layer over a call's steps
//   lstm.cpp      a whole call (every layer and direction, on the threads), and the ops' registration
//   pack.cpp      the pack ops: flat weights into the layout the passes read
//   dense.cpp     ops on dense weights for torch.export programs (kernel.h: what they call here)

// The narrowest headers that serve: torch/extension.h would triple the one-time build (~60 s).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernel.h"
#include "pass.h"

namespace {

// Working memory for a call's hidden-state buffers: the calling thread's, kept between calls up to a size
// (a stream's calls then allocate and fault in nothing), or beyond it the call's own, in `own`.
float* scratch(size_t n, std::unique_ptr<float[]>& own) {
  constexpr size_t KEEP = size_t{1} << 18;  // floats
  thread_local std::unique_ptr<float[]> kept;
  thread_local size_t kept_size = 0;
  if (n > KEEP) {
    own.reset(new float[n]);
    return own.get();
  }
  if (kept_size < n) {
    kept.reset(new float[n]);
    kept_size = n;
  }
  return kept.get();
}

// A call's shape: S layers x directions (D), from I0 input features to R hidden-state units (P = proj_size
// with a projection, else H), in `blocks` blocks of 16 units (an RNN's: 64) and `pblocks` projection blocks of 64.
struct Shape {
  int64_t S, D, I0, H, R, blocks, pblocks;
  bool projected;
  Cell cell;
  bool int8, bf16;
  int64_t input_size(int64_t s) const { return s < D ? I0 : D * R; }
};

// What the packs must be for this call, checked before any is read (the Python side checked the rest).
void check_packs(const Shape& c, at::TensorList weights, at::TensorList biases, at::TensorList projections,
                 int64_t proj_size) {
  TORCH_CHECK(c.S > 0 && c.S % c.D == 0 && static_cast<int64_t>(weights.size()) == c.S,
              "lstmopt::lstm: one weight tensor and one bias per layer and direction");
  TORCH_CHECK(c.projected ? static_cast<int64_t>(projections.size()) == c.S && proj_size > 0 && proj_size < c.H &&
                                c.cell == Cell::lstm
                          : proj_size == 0,
              "lstmopt::lstm: one projection per layer and direction, to 0 < proj_size < hidden_size units");
  TORCH_CHECK(!c.int8 || (c.cell == Cell::lstm && !c.projected),
              "lstmopt::lstm: int8 packs serve LSTMs without a projection");
  const auto weights_type = c.int8 ? at::kChar : c.bf16 ? at::kBFloat16 : at::kFloat;
  const std::vector<int64_t> packed_bias =
      c.int8 ? std::vector<int64_t>{c.blocks, 3, WIDTH} : std::vector<int64_t>{c.blocks, WIDTH};
  for (int64_t s = 0; s < c.S; ++s) {
    const int64_t I = c.input_size(s), rows = c.int8 ? even(I) + even(c.R) : I + c.R;
    TORCH_CHECK(weights[s].scalar_type() == weights_type && weights[s].is_contiguous() && weights[s].is_cpu() &&
                    weights[s].sizes() == at::IntArrayRef({c.blocks, SLABS, rows, SLAB}),
                "lstmopt::lstm: weights of layer ", s / c.D, " are not packed for this input");
    TORCH_CHECK(biases[s].scalar_type() == at::kFloat && biases[s].is_contiguous() && biases[s].is_cpu() &&
                    biases[s].sizes() == at::IntArrayRef(packed_bias),
                "lstmopt::lstm: biases of layer ", s / c.D, " are not packed");
    TORCH_CHECK(!c.projected || (projections[s].scalar_type() == at::kFloat && projections[s].is_contiguous() &&
                                 projections[s].is_cpu() &&
                                 projections[s].sizes() == at::IntArrayRef({c.pblocks, SLABS, c.H, SLAB})),
                "lstmopt::lstm: projection of layer ", s / c.D, " is not packed");
  }
}

// A given initial state, (S, B, units) float32, or an undefined tensor: it is read where the threads start
// (each its own units), not copied here first.
at::Tensor given_state(const std::optional<at::Tensor>& given, const Shape& c, int64_t B, int64_t units) {
  if (!given.has_value()) return at::Tensor();
  TORCH_CHECK(given->sizes() == at::IntArrayRef({c.S, B, units}) && given->scalar_type() == at::kFloat &&
                  given->is_cpu(),
              "lstmopt::lstm: states must be (layers * directions, batch, ", units == c.H ? "hidden" : "proj",
              ") float32");
  return given->contiguous();
}

// A call's passes with every buffer they need: each layer's output rows (N, D * R), each pass's projected
// inputs (where it has more than one step), and its hidden-state buffers in `hs` (two, and with a projection
// o * tanh(c) before it).
struct Passes {
  std::vector<Pass> passes;
  std::vector<at::Tensor> outs, xps;

  Passes(const Shape& c, const at::Tensor& rows_in, const Steps& steps, at::TensorList weights,
         at::TensorList biases, at::TensorList projections, const at::Tensor& h0, const at::Tensor& c0,
         const float* zero_state, at::Tensor& h_n, at::Tensor& c_n, float* hs) {
    const int64_t N = steps.rows, B = steps.batch(), R = c.R, H = c.H, D = c.D;
    const int64_t per_pass = 2 * B * R + (c.projected ? B * H : 0);
    for (int64_t s = 0; s < c.S; ++s) {
      const int64_t layer = s / D, d = s % D;
      if (d == 0) outs.push_back(at::empty({N, D * R}, rows_in.options()));
      const at::Tensor& x = layer == 0 ? rows_in : outs[layer - 1];
      xps.push_back(steps.count() > 1 ? at::empty({c.blocks, SLABS, N, SLAB}, rows_in.options()) : at::Tensor());
      float* const buffers = hs + s * per_pass;
      const float* h0_s = h0.defined() ? h0.const_data_ptr<float>() + s * B * R : nullptr;
      Pass p{x.data_ptr<float>(), c.input_size(s), c.int8 || c.bf16 ? nullptr : weights[s].data_ptr<float>(),
             biases[s].data_ptr<float>(), d == 1, xps.back().defined() ? xps.back().data_ptr<float>() : nullptr,
             false, h0_s, h0_s ? h0_s : zero_state, c0.defined() ? c0.const_data_ptr<float>() + s * B * H : nullptr,
             h_n.data_ptr<float>() + s * B * R, c_n.data_ptr<float>() + s * B * H, buffers,
             outs[layer].data_ptr<float>(), D * R, d * R, R,
             c.projected ? projections[s].data_ptr<float>() : nullptr, c.projected ? buffers + 2 * B * R : nullptr,
             c.cell};
      if (c.int8) p.wq = weights[s].const_data_ptr<int8_t>();
      if (c.bf16) p.wh = reinterpret_cast<const bf16_bits*>(weights[s].const_data_ptr<at::BFloat16>());
      passes.push_back(p);
    }
  }

  // Pass s's input projections by a GEMM, which runs on torch's threads itself: before the threads of its layer
  // start, when its input is complete.
  void project_by_gemm(int64_t s, const Shape& c, const at::Tensor& rows_in, at::TensorList weights,
                       at::TensorList biases) {
    const int64_t layer = s / c.D;
    at::matmul_out(xps[s], layer == 0 ? rows_in : outs[layer - 1], weights[s].narrow(2, 0, passes[s].I));
    xps[s].add_(biases[s].view({c.blocks, SLABS, 1, SLAB}));
    passes[s].projected = true;
  }
};

// The whole call, every layer and direction. rows_in: (N, I) packed rows; projections: none, or (LSTMP)
// one per layer and direction, to P = proj_size units. Returns the output rows (N, D * R) and h_n (S, B, R),
// c_n (S, B, H), where R is P or, without projections, H.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& rows_in, const Steps& steps,
                                                   const std::optional<at::Tensor>& hx,
                                                   const std::optional<at::Tensor>& cx, at::TensorList weights,
                                                   at::TensorList biases, int64_t H, bool bidirectional,
                                                   at::TensorList projections, int64_t proj_size, Cell cell) {
  const bool projected = !projections.empty();
  const int64_t units = one_gate(cell) ? WIDTH : UNITS;  // per block (Pass::units)
  const int64_t D = bidirectional ? 2 : 1, R = projected ? proj_size : H, blocks = (H + units - 1) / units;
  const Shape c{static_cast<int64_t>(biases.size()), D, rows_in.size(1), H, R, blocks,
                projected ? (R + WIDTH - 1) / WIDTH : 0, projected, cell,
                weights.size() > 0 && weights[0].scalar_type() == at::kChar,        // packs of pack_int8
                weights.size() > 0 && weights[0].scalar_type() == at::kBFloat16};  // weights="bfloat16"
  check_packs(c, weights, biases, projections, proj_size);
  const int64_t B = steps.batch(), T = steps.count(), S = c.S;
  const at::Tensor h0 = given_state(hx, c, B, R), c0 = given_state(cx, c, B, H);
  const std::vector<float> zero_state(h0.defined() ? 0 : B * R);  // the first step's, without hx
  at::Tensor h_n = at::empty({S, B, R}, rows_in.options()), c_n = at::empty({S, B, H}, rows_in.options());
  std::unique_ptr<float[]> own_scratch;
  float* const hs = scratch(static_cast<size_t>(S * (2 * B * R + (projected ? B * H : 0))), own_scratch);
  Passes all(c, rows_in, steps, weights, biases, projections, h0, c0, zero_state.data(), h_n, c_n, hs);

  // The work per step (multiply-adds) decides whether to split the call between threads.
  const int64_t step_work = B * ((T == 1 ? c.I0 + R : R) * blocks * WIDTH + H * c.pblocks * WIDTH);
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), blocks));
  const bool parallel = threads > 1 && step_work >= PARALLEL_STEP && step_work * T * S >= PARALLEL_CALL &&
                        !at::in_parallel_region();
  // The inputs' projections by a GEMM (int8 and bf16 packs: always the kernel's own).
  const bool gemm = T > 1 && steps.rows > GEMM_ROWS && !c.int8 && !c.bf16;
  if (!parallel) {
    for (int64_t s = 0; s < S; ++s) {
      if (gemm) all.project_by_gemm(s, c, rows_in, weights, biases);
      run_pass(all.passes[s], steps, H, Share::of(0, 1, blocks, c.pblocks), true);
    }
    return {all.outs.back(), h_n, c_n};
  }
  // One parallel region for the whole call (or, with GEMMs, per layer): each thread owns a range of blocks
  // (hidden units) in every layer, and barriers hand the hidden states around, instead of waking threads per
  // layer or step.
  const int64_t span = gemm ? D : S;
  for (int64_t first = 0; first < S; first += span) {
    if (gemm)
      for (int64_t s = first; s < first + span; ++s) all.project_by_gemm(s, c, rows_in, weights, biases);
#pragma omp parallel num_threads(threads)
    {
      const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();  // the team may be smaller
      const Share share = Share::of(id, team, blocks, c.pblocks);
      for (int64_t s = first; s < first + span; ++s) run_pass(all.passes[s], steps, H, share, s == first + span - 1);
    }
  }
  return {all.outs.back(), h_n, c_n};
}

}  // namespace

// nn.LSTM's (or nn.GRU's, nn.RNN's) call on the native kernel. input: a tensor as nn.LSTM takes it ((T, B, I),
// (B, T, I) when batch_first, or unbatched (T, I)), or a PackedSequence's data (N, I) with its batch_sizes
// (sequences sorted longest first); hx, cx: as nn.LSTM takes them (permuted to sorted order for packed
// data), or None (cx always for a GRU). Returns nn.LSTM's output, h_n and c_n (for packed data: the output
// rows, and h_n, c_n in sorted order; a GRU's c_n is scratch). projections: empty, or for proj_size > 0
// what pack_projections made.
std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrent(const at::Tensor& input,
                                                         const std::optional<at::Tensor>& batch_sizes,
                                                         const std::optional<at::Tensor>& hx,
                                                         const std::optional<at::Tensor>& cx, at::TensorList weights,
                                                         at::TensorList biases, int64_t hidden_size,
                                                         bool bidirectional, bool batch_first,
                                                         at::TensorList projections, int64_t proj_size, Cell cell) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.is_cpu() && input.layout() == at::kStrided,
              "lstmopt::lstm: input must be float32 on CPU");
  Steps steps;
  if (batch_sizes.has_value()) {
    TORCH_CHECK(input.dim() == 2, "lstmopt::lstm: packed data must be (N, I)");
    TORCH_CHECK(batch_sizes->dim() == 1 && batch_sizes->scalar_type() == at::kLong && batch_sizes->is_cpu() &&
                    batch_sizes->numel() > 0, "lstmopt::lstm: batch_sizes must be a non-empty int64 vector");
    const at::Tensor bs = batch_sizes->contiguous();
    steps.sizes.assign(bs.data_ptr<int64_t>(), bs.data_ptr<int64_t>() + bs.numel());
    for (const int64_t size : steps.sizes) {
      TORCH_CHECK(size > 0 && size <= steps.sizes[0], "lstmopt::lstm: bad batch_sizes");
      steps.offsets.push_back(steps.rows);
      steps.rows += size;
    }
    for (size_t t = 1; t < steps.sizes.size(); ++t)
      TORCH_CHECK(steps.sizes[t] <= steps.sizes[t - 1], "lstmopt::lstm: batch_sizes must not increase");
    TORCH_CHECK(steps.rows == input.size(0), "lstmopt::lstm: batch_sizes do not add up to the input's rows");
    return run(input.contiguous(), steps, hx, cx, weights, biases, hidden_size, bidirectional, projections,
               proj_size, cell);
  }
  TORCH_CHECK(input.dim() == 2 || input.dim() == 3, "lstmopt::lstm: input must be 2-D or 3-D");
  const bool unbatched = input.dim() == 2;
  const at::Tensor time_major = unbatched ? input.unsqueeze(1) : (batch_first ? input.transpose(0, 1) : input);
  const int64_t T = time_major.size(0), B = time_major.size(1), I = time_major.size(2);
  TORCH_CHECK(T > 0 && B > 0, "lstmopt::lstm: empty input");
  for (int64_t t = 0; t < T; ++t) {
    steps.sizes.push_back(B);
    steps.offsets.push_back(t * B);
  }
  steps.rows = T * B;
  auto batched_state = [&](const std::optional<at::Tensor>& state) -> std::optional<at::Tensor> {
    if (!state.has_value()) return std::nullopt;
    return unbatched ? state->unsqueeze(1) : *state;
  };
  auto [out, h_n, c_n] = run(time_major.contiguous().view({T * B, I}), steps, batched_state(hx),
                             batched_state(cx), weights, biases, hidden_size, bidirectional, projections, proj_size,
                             cell);
  at::Tensor output = out.view({T, B, out.size(1)});
  if (unbatched) return {output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)};
  return {batch_first ? output.transpose(0, 1) : output, h_n, c_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_plain(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& batch_sizes,
                                                          const std::optional<at::Tensor>& hx,
                                                          const std::optional<at::Tensor>& cx, at::TensorList weights,
                                                          at::TensorList biases, int64_t hidden_size,
                                                          bool bidirectional, bool batch_first) {
  return recurrent(input, batch_sizes, hx, cx, weights, biases, hidden_size, bidirectional, batch_first, {}, 0,
                   Cell::lstm);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstmp(const at::Tensor& input,
                                                     const std::optional<at::Tensor>& batch_sizes,
                                                     const std::optional<at::Tensor>& hx,
                                                     const std::optional<at::Tensor>& cx, at::TensorList weights,
                                                     at::TensorList biases, int64_t hidden_size, bool bidirectional,
                                                     bool batch_first, at::TensorList projections, int64_t proj_size) {
  return recurrent(input, batch_sizes, hx, cx, weights, biases, hidden_size, bidirectional, batch_first,
                   projections, proj_size, Cell::lstm);
}

// nn.GRU's call: input and hx as nn.GRU takes them (hx permuted to sorted order for packed data); returns
// the output and h_n.
std::tuple<at::Tensor, at::Tensor> gru(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                                       const std::optional<at::Tensor>& hx, at::TensorList weights,
                                       at::TensorList biases, int64_t hidden_size, bool bidirectional,
                                       bool batch_first) {
  auto [out, h_n, scratch] = recurrent(input, batch_sizes, hx, std::nullopt, weights, biases, hidden_size,
                                       bidirectional, batch_first, {}, 0, Cell::gru);
  return {out, h_n};
}

// nn.RNN's call, as gru's; nonlinearity: "tanh" or "relu", as nn.RNN names it.
std::tuple<at::Tensor, at::Tensor> rnn(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                                       const std::optional<at::Tensor>& hx, at::TensorList weights,
                                       at::TensorList biases, int64_t hidden_size, bool bidirectional,
                                       bool batch_first, c10::string_view nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu",
              "lstmopt::rnn: nonlinearity must be \"tanh\" or \"relu\", got ", nonlinearity);
  auto [out, h_n, scratch] = recurrent(input, batch_sizes, hx, std::nullopt, weights, biases, hidden_size,
                                       bidirectional, batch_first, {}, 0,
                                       nonlinearity == "relu" ? Cell::rnn_relu : Cell::rnn_tanh);
  return {out, h_n};
}

#ifndef LSTMOPT_VARIANT
#define LSTMOPT_VARIANT "native"
#endif

// Which build of this file runs (the loader picks one per CPU): benchmarks and reports say it.
std::string variant() { return LSTMOPT_VARIANT; }

TORCH_LIBRARY(lstmopt, m) {
  m.def("variant() -> str", &variant);
  m.def("lstm(Tensor input, Tensor? batch_sizes, Tensor? hx, Tensor? cx, Tensor[] weights, Tensor[] biases, "
        "int hidden_size, bool bidirectional, bool batch_first) -> (Tensor, Tensor, Tensor)");
  // LSTMs with proj_size > 0: one op more, not arguments more, so archives scripted before keep their calls.
  m.def("lstmp(Tensor input, Tensor? batch_sizes, Tensor? hx, Tensor? cx, Tensor[] weights, Tensor[] biases, "
        "int hidden_size, bool bidirectional, bool batch_first, Tensor[] projections, int proj_size) "
        "-> (Tensor, Tensor, Tensor)");
  // weights: "float32", "bfloat16" or "int8" (pack_int8), which lstm reads from the packs' dtype.
  m.def("pack(Tensor[] dense, int hidden_size, bool has_biases, int proj_size=0, str weights=\"float32\") "
        "-> (Tensor[], Tensor[])");
  m.def("pack_projections(Tensor[] dense, int hidden_size, bool has_biases, int proj_size) -> Tensor[]");
  m.def("gru(Tensor input, Tensor? batch_sizes, Tensor? hx, Tensor[] weights, Tensor[] biases, int hidden_size, "
        "bool bidirectional, bool batch_first) -> (Tensor, Tensor)");
  m.def("pack_gru(Tensor[] dense, int hidden_size, bool has_biases) -> (Tensor[], Tensor[])");
  m.def("rnn(Tensor input, Tensor? batch_sizes, Tensor? hx, Tensor[] weights, Tensor[] biases, int hidden_size, "
        "bool bidirectional, bool batch_first, str nonlinearity) -> (Tensor, Tensor)");
  m.def("pack_rnn(Tensor[] dense, int hidden_size, bool has_biases) -> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(lstmopt, CPU, m) {
  m.impl("lstm", &lstm_plain);
  m.impl("lstmp", &lstmp);
  m.impl("gru", &gru);
  m.impl("pack_gru", &pack_gru);
  m.impl("rnn", &rnn);
  m.impl("pack_rnn", &pack_rnn);
  m.impl("pack", &pack);
  m.impl("pack_projections", &pack_projections);
}
