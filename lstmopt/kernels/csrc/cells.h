// The cell updates after a block's gates: the LSTM's (i, f, g, o), the GRU's (r, z, n) and the RNN's (one).
#pragma once

#include <cstdint>

#include "simd.h"

namespace {

// The cell update of one block's 16 units for one row: gates in, c updated, h written to the state buffer
// and to the output (units < 16 only in the last block of a hidden size that is not a multiple of 16: the
// rest are padding, updated in copies).
inline void cell(const float* __restrict g, float* __restrict c, float* __restrict h, float* __restrict out,
                 int64_t units) {
  if (units < UNITS) {
    alignas(64) float c_pad[UNITS] = {}, h_pad[UNITS], out_pad[UNITS];
    std::memcpy(c_pad, c, sizeof(float) * units);
    cell(g, c_pad, h_pad, out_pad, UNITS);
    std::memcpy(c, c_pad, sizeof(float) * units);
    std::memcpy(h, h_pad, sizeof(float) * units);
    std::memcpy(out, h_pad, sizeof(float) * units);
    return;
  }
  for (int64_t u = 0; u < UNITS; u += LANES) {
    const vec i = vsigmoid(load(g + u)), f = vsigmoid(load(g + UNITS + u));
    const vec z = vtanh(load(g + 2 * UNITS + u)), o = vsigmoid(load(g + 3 * UNITS + u));
    const vec cn = f * load(c + u) + i * z;
    const vec hn = o * vtanh(cn);
    store(c + u, cn);
    store(h + u, hn);
    store(out + u, hn);
  }
}

// The GRU's update of one block's 16 units for one row. Its gates come in four slots, [r, z, n_x, n_h]:
// n_x = W_in x + b_in and n_h = W_hn h + b_hn apart, because n = tanh(n_x + r * n_h) scales only the
// recurrent part by r (the input rows of slot n_h and the recurrent rows of slot n_x are zeros). Then
// h' = (1 - z) * n + z * h, written to the state buffer and the output.
inline void gru_cell(const float* __restrict g, const float* __restrict h_prev, float* __restrict h,
                     float* __restrict out, int64_t units) {
  if (units < UNITS) {
    alignas(64) float prev_pad[UNITS] = {}, h_pad[UNITS], out_pad[UNITS];
    std::memcpy(prev_pad, h_prev, sizeof(float) * units);
    gru_cell(g, prev_pad, h_pad, out_pad, UNITS);
    std::memcpy(h, h_pad, sizeof(float) * units);
    std::memcpy(out, h_pad, sizeof(float) * units);
    return;
  }
  for (int64_t u = 0; u < UNITS; u += LANES) {
    const vec r = vsigmoid(load(g + u)), z = vsigmoid(load(g + UNITS + u));
    const vec n = vtanh(load(g + 2 * UNITS + u) + r * load(g + 3 * UNITS + u));
    const vec hn = n + z * (load(h_prev + u) - n);
    store(h + u, hn);
    store(out + u, hn);
  }
}

// nn.RNN's update of one block's 64 units for one row (one gate per unit, so a block holds WIDTH units, as
// pack_rnn lays them out): h' = tanh(g) or relu(g), written to the state buffer and the output.
inline void rnn_cell(const float* __restrict g, float* __restrict h, float* __restrict out, int64_t units, bool relu) {
  if (units < WIDTH) {
    alignas(64) float h_pad[WIDTH], out_pad[WIDTH];
    rnn_cell(g, h_pad, out_pad, WIDTH, relu);
    std::memcpy(h, h_pad, sizeof(float) * units);
    std::memcpy(out, h_pad, sizeof(float) * units);
    return;
  }
  for (int64_t u = 0; u < WIDTH; u += LANES) {
    const vec x = load(g + u);
    const vec hn = relu ? (x > splat(0.0f) ? x : splat(0.0f)) : vtanh(x);
    store(h + u, hn);
    store(out + u, hn);
  }
}

}  // namespace
