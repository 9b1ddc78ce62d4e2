// One direction of one layer over a call's packed rows: its steps, what each thread owns, the gates of a
// block (fp32, bf16 or int8 weights), the LSTMP projection, and the pass itself (run_pass), which lstm.cpp's
// run() calls for every layer and direction, on one thread or on each thread of a parallel region.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cells.h"
#include "kernel.h"
#include "simd.h"
#include "tiles_fp32.h"
#include "tiles_int8.h"

namespace {

// Splitting a call between threads pays when its steps have this many multiply-adds, and the call as a
// whole this many: below, waking the second thread and the barriers cost more than they save (measured on
// a 2-core virtual machine, where a sleeping thread can take long to wake). A one-step call of an
// 80->256 layer (2^18 multiply-adds) measured 0.75-0.83x its one-thread time on two threads, so one step
// suffices: 2^21, eight such steps, left the one-step shapes of streaming on one thread.
constexpr int64_t PARALLEL_STEP = 1 << 17;
constexpr int64_t PARALLEL_CALL = 1 << 18;

// The steps of a call: sizes[t] rows at step t (a tensor's steps all hold the whole batch), starting at
// row offsets[t] of the packed rows.
struct Steps {
  std::vector<int64_t> sizes, offsets;
  int64_t rows = 0;  // all steps' rows
  int64_t count() const { return static_cast<int64_t>(sizes.size()); }
  int64_t batch() const { return sizes[0]; }
};

// One direction of one layer, with every buffer it needs allocated before any thread starts.
struct Pass {
  const float* x;           // input rows (N, I)
  int64_t I;
  const float* w;           // (blocks, SLABS, I + H, SLAB)
  const float* bias;        // (blocks, WIDTH)
  bool reverse;
  float* xp;                // the inputs' projections (blocks, SLABS, N, SLAB), bias included; null for one step
  bool projected;           // xp already filled (by a GEMM, before the threads started)
  const float* h0;          // (B, R) initial states; null: zeros
  const float* h_start;     // what the first step reads: h0, or (B, R) zeros
  const float* c0;          // (B, H)
  float* h;                 // (B, R) final states
  float* c;                 // (B, H) the cell state, updated in place
  float* hs;                // (2, B, R): the hidden state of step s is read from hs[s % 2], written to the other
  float* out;               // (N, out_stride), this direction's columns start at col
  int64_t out_stride, col;
  // An LSTM with proj_size > 0 (LSTMP) projects each step's o * tanh(c) (H wide, into m) to its hidden
  // state of R = proj_size units through wp: (pblocks, SLABS, H, SLAB), 64 hidden-state units per block.
  // Without a projection, wp and m are null and R = H.
  int64_t R;
  const float* wp;
  float* m;                 // (B, H)
  Cell cell;                // the update after the gates; a GRU and an RNN have no cell state
  // int8 packs (pack_int8): the weights, with w null; bias then points at (blocks, 3, WIDTH).
  const int8_t* wq = nullptr;
  int64_t bias_stride() const { return wq ? 3 * WIDTH : WIDTH; }
  // bf16 packs (pack with weights="bfloat16"): the weights, with w null (the projection stays fp32).
  const bf16_bits* wh = nullptr;
  // Hidden units per block: an RNN's one gate per unit fills a block's WIDTH columns with 64 units.
  int64_t units() const { return one_gate(cell) ? WIDTH : UNITS; }
};

// The blocks [b0, b1) one thread runs in every pass, the projection's blocks [p0, p1) (LSTMP), and whether
// it has teammates: then a barrier ends every step, because the next step reads the hidden state of every
// unit (and one more before the projection, which reads every unit's o * tanh(c)).
struct Share {
  int64_t b0, b1, p0, p1;
  bool team;  // more than one thread: barriers needed
  // The share of `threads` that thread `id` runs, of `blocks` blocks and `pblocks` projection blocks.
  static Share of(int64_t id, int64_t team, int64_t blocks, int64_t pblocks) {
    return Share{blocks * id / team, blocks * (id + 1) / team, pblocks * id / team, pblocks * (id + 1) / team,
                 team > 1};
  }
};

// gates() on int8 packs: the input's part (projected, or here for a single step), then the hidden state's.
inline void gates_int8(float* acc, const Pass& p, const Steps& steps, int64_t blk, int64_t row, int64_t r0, int64_t n,
                       const Quantized& q) {
  const int64_t Iq = even(p.I), Rq = even(p.R), stride = (Iq + Rq) * SLAB, N = steps.rows;
  const int8_t* wb = p.wq + blk * SLABS * stride;
  const float* bias = p.bias + blk * p.bias_stride();
  const int16_t* rows[TILE_ROWS];
  if (p.xp) {
    for (int64_t r = 0; r < n; ++r)
      for (int64_t s = 0; s < SLABS; ++s)
        std::memcpy(acc + r * WIDTH + s * SLAB, p.xp + ((blk * SLABS + s) * N + row + r) * SLAB, sizeof(float) * SLAB);
  } else {
    for (int64_t r = 0; r < n; ++r) {
      std::memcpy(acc + r * WIDTH, bias, sizeof(float) * WIDTH);
      rows[r] = q.x.data() + (row + r) * Iq;
    }
    qmultiply(acc, rows, q.x_scale.data() + row, n, wb, stride, Iq / 2, bias + WIDTH);
  }
  for (int64_t r = 0; r < n; ++r) rows[r] = q.h.data() + (r0 + r) * Rq;
  qmultiply(acc, rows, q.h_scale.data() + r0, n, wb + Iq * SLAB, stride, Rq / 2, bias + 2 * WIDTH);
}

// gates() on the block's weights m (fp32 or bf16).
template <typename W>
inline void gates_of(float* acc, const Pass& p, const Rows<W>& m, const Steps& steps, int64_t blk, int64_t row,
                     int64_t r0, int64_t n, const float* h_in) {
  const int64_t R = p.R, K = p.I + R, N = steps.rows;
  const W* wb = m.w;
  const float *x[TILE_ROWS], *h[TILE_ROWS];
  for (int64_t r = 0; r < n; ++r) h[r] = h_in + (r0 + r) * R;
  if (p.xp) {  // the input's part is projected: the hidden state's is added
    for (int64_t r = 0; r < n; ++r)
      for (int64_t s = 0; s < SLABS; ++s)
        std::memcpy(acc + r * WIDTH + s * SLAB, p.xp + ((blk * SLABS + s) * N + row + r) * SLAB, sizeof(float) * SLAB);
    multiply(acc, Inputs{nullptr, 0, h, nullptr}, n, Rows<W>{wb + p.I * SLAB, K * SLAB, R});
  } else {  // a single step: input and hidden state in one pass
    for (int64_t r = 0; r < n; ++r) x[r] = p.x + (row + r) * p.I;
    multiply(acc, Inputs{x, p.I, h, p.bias + blk * WIDTH}, n, Rows<W>{wb, K * SLAB, K});
  }
}

// acc (n rows, stride WIDTH) = the gates of rows [r0, r0 + n) at step t, for one block, before the cell.
inline void gates(float* acc, const Pass& p, const Steps& steps, int64_t blk, int64_t t, int64_t r0, int64_t n,
                  const float* h_in, const Quantized& q) {
  const int64_t K = p.I + p.R, row = steps.offsets[t] + r0;
  if (p.wq) return gates_int8(acc, p, steps, blk, row, r0, n, q);
  if (p.wh) return gates_of(acc, p, Rows<bf16_bits>{p.wh + blk * SLABS * K * SLAB, K * SLAB, K}, steps, blk, row, r0, n, h_in);
  gates_of(acc, p, Rows<float>{p.w + blk * SLABS * K * SLAB, K * SLAB, K}, steps, blk, row, r0, n, h_in);
}

// LSTMP: the hidden state of step t's rows, h = W_hr (o * tanh(c)), for the projection blocks
// [share.p0, share.p1), into h_out and the output. The same multiply as the gates' (blocks of 64 columns,
// sums in blocks of CHUNK rows), on the H rows of m.
void project(const Pass& p, const Steps& steps, int64_t H, int64_t t, const Share& share, float* h_out) {
  alignas(64) static const float zeros[WIDTH] = {};
  alignas(64) float acc[TILE_ROWS * WIDTH];
  const int64_t rows = steps.sizes[t];
  const float* m[TILE_ROWS];
  for (int64_t pb = share.p0; pb < share.p1; ++pb) {
    const int64_t first = pb * WIDTH, units = std::min(WIDTH, p.R - first);
    for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
      const int64_t n = std::min(TILE_ROWS, rows - r0);
      for (int64_t r = 0; r < n; ++r) m[r] = p.m + (r0 + r) * H;
      multiply(acc, Inputs{m, H, nullptr, zeros}, n, Rows<float>{p.wp + pb * SLABS * H * SLAB, H * SLAB, H});
      for (int64_t r = 0; r < n; ++r) {
        std::memcpy(h_out + (r0 + r) * p.R + first, acc + r * WIDTH, sizeof(float) * units);
        std::memcpy(p.out + (steps.offsets[t] + r0 + r) * p.out_stride + p.col + first, acc + r * WIDTH,
                    sizeof(float) * units);
      }
    }
  }
}

// The inputs' part of every step's gates, into p.xp (where the pass has more than one step and no GEMM
// projected them before the threads started), for the blocks [b0, b1); and int8 packs' quantized input rows.
void project_inputs(const Pass& p, const Steps& steps, int64_t b0, int64_t b1, Quantized& q) {
  const int64_t N = steps.rows, K = p.I + p.R;
  alignas(64) float acc[TILE_ROWS * WIDTH];
  if (p.wq) q.rows(q.x, q.x_scale, p.x, N, p.I, even(p.I));
  if (!p.xp || p.projected) return;  // (a GEMM projects only fp32 packs' inputs)
  const int64_t Iq = even(p.I), stride = (Iq + even(p.R)) * SLAB;
  for (int64_t blk = b0; blk < b1; ++blk)
    for (int64_t r0 = 0; r0 < N; r0 += TILE_ROWS) {
      const int64_t n = std::min(TILE_ROWS, N - r0);
      if (p.wq) {  // int8: as gates_int8 computes it for a single step
        const float* bias = p.bias + blk * p.bias_stride();
        const int16_t* rows[TILE_ROWS];
        for (int64_t r = 0; r < n; ++r) {
          std::memcpy(acc + r * WIDTH, bias, sizeof(float) * WIDTH);
          rows[r] = q.x.data() + (r0 + r) * Iq;
        }
        qmultiply(acc, rows, q.x_scale.data() + r0, n, p.wq + blk * SLABS * stride, stride, Iq / 2, bias + WIDTH);
      } else {
        const float* in[TILE_ROWS];
        for (int64_t r = 0; r < n; ++r) in[r] = p.x + (r0 + r) * p.I;
        const Inputs inputs{in, p.I, nullptr, p.bias + blk * WIDTH};
        if (p.wh)
          multiply(acc, inputs, n, Rows<bf16_bits>{p.wh + blk * SLABS * K * SLAB, K * SLAB, p.I});
        else
          multiply(acc, inputs, n, Rows<float>{p.w + blk * SLABS * K * SLAB, K * SLAB, p.I});
      }
      for (int64_t r = 0; r < n; ++r)
        for (int64_t s = 0; s < SLABS; ++s)
          std::memcpy(p.xp + ((blk * SLABS + s) * N + r0 + r) * SLAB, acc + r * WIDTH + s * SLAB,
                      sizeof(float) * SLAB);
    }
}

// The units of the hidden state (and the cell state) one thread owns: the cell units of its blocks, and the
// hidden units it writes: the same, or with a projection, those of its projection blocks.
struct Owned {
  int64_t first_unit, units, first_h, units_h;
  static Owned of(const Pass& p, const Share& share, int64_t H) {
    const int64_t first = share.b0 * p.units(), units = std::min(share.b1 * p.units(), H) - first;
    const int64_t first_h = p.wp ? std::min(share.p0 * WIDTH, p.R) : first;
    const int64_t units_h = p.wp ? std::min(share.p1 * WIDTH, p.R) - first_h : units;
    return Owned{first, units, first_h, units_h};
  }
};

// Own units of the initial states: the hidden state into both buffers (rows that have not started, in a
// reverse pass over sequences of different lengths, find it in either), the cell state into its output.
// No barrier after these writes: the first step reads h_start, and each thread's own units of the buffers
// are read only after that step's barrier.
void start_states(const Pass& p, int64_t B, int64_t H, const Owned& own) {
  auto initial = [&](float* to, const float* from, int64_t n) {
    if (from)
      std::memcpy(to, from, sizeof(float) * n);
    else
      std::memset(to, 0, sizeof(float) * n);
  };
  for (int64_t r = 0; r < B; ++r) {
    const int64_t at = r * p.R + own.first_h;
    initial(p.hs + at, p.h0 ? p.h0 + at : nullptr, own.units_h);
    initial(p.hs + B * p.R + at, p.h0 ? p.h0 + at : nullptr, own.units_h);
    initial(p.c + r * H + own.first_unit, p.c0 ? p.c0 + r * H + own.first_unit : nullptr, own.units);
  }
}

// Step t (the pass's s-th) for the blocks [share.b0, share.b1): each block's gates, six rows at a time for
// batches, one for streaming, with the cell update of its units right after, while the gates are in cache.
void step_blocks(const Pass& p, const Steps& steps, int64_t H, const Share& share, int64_t s, int64_t t,
                 const float* h_in, float* h_out, const Quantized& q) {
  alignas(64) float acc[TILE_ROWS * WIDTH];
  const int64_t rows = steps.sizes[t], R = p.R, b0 = share.b0, b1 = share.b1;
  // Steps alternate the order in which they visit the blocks: the weights last read are read first,
  // while still in cache, where a call's working set is a little larger than the cache.
  for (int64_t i = b0; i < b1; ++i) {
    const int64_t blk = s % 2 == 0 ? i : b1 - 1 - (i - b0);
    const int64_t first = blk * p.units(), units = std::min(p.units(), H - first);
    for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
      const int64_t n = std::min(TILE_ROWS, rows - r0);
      gates(acc, p, steps, blk, t, r0, n, h_in, q);
      for (int64_t r = 0; r < n; ++r) {
        float* c_row = p.c + (r0 + r) * H + first;
        float* out = p.out + (steps.offsets[t] + r0 + r) * p.out_stride + p.col + first;
        if (p.cell == Cell::gru) {
          gru_cell(acc + r * WIDTH, h_in + (r0 + r) * R + first, h_out + (r0 + r) * R + first, out, units);
        } else if (one_gate(p.cell)) {
          rnn_cell(acc + r * WIDTH, h_out + (r0 + r) * R + first, out, units, p.cell == Cell::rnn_relu);
        } else if (p.wp) {  // o * tanh(c) into m (twice: cell() writes a state and an output), projected later
          float* m_row = p.m + (r0 + r) * H + first;
          cell(acc + r * WIDTH, c_row, m_row, m_row, units);
        } else {
          cell(acc + r * WIDTH, c_row, h_out + (r0 + r) * R + first, out, units);
        }
      }
    }
  }
}

// One direction of one layer over packed rows, the blocks [share.b0, share.b1) of it: the inputs of all
// steps projected first (here for up to GEMM_ROWS rows, else by a GEMM before the threads start), then each
// step as one pass over each block's weights.
//
// closing: the parallel region ends after this pass, and its end is the barrier the last step needs.
void run_pass(const Pass& p, const Steps& steps, int64_t H, const Share& share, bool closing) {
  const int64_t T = steps.count(), B = steps.batch(), R = p.R;
  thread_local Quantized q;  // this thread's: every thread quantizes all rows it reads
  project_inputs(p, steps, share.b0, share.b1, q);
  const Owned own = Owned::of(p, share, H);
  start_states(p, B, H, own);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? T - 1 - s : s;
    const float* h_in = s == 0 ? p.h_start : p.hs + (s % 2) * B * R;
    float* h_out = p.hs + ((s + 1) % 2) * B * R;
    if (p.wq) q.rows(q.h, q.h_scale, h_in, steps.sizes[t], R, even(R));
    step_blocks(p, steps, H, share, s, t, h_in, h_out, q);
    if (p.wp) {
      if (share.team) {
#pragma omp barrier
      }
      project(p, steps, H, t, share, h_out);
    }
    if (share.team && !(closing && s == T - 1)) {
#pragma omp barrier
    }
  }
  // Each row's final hidden state is in the buffer its last step wrote: a forward pass ends a row after
  // its own length, a reverse pass ends every row at the last step.
  for (int64_t r = 0; r < B; ++r) {
    int64_t last = T;
    if (!p.reverse)
      while (last > 0 && steps.sizes[last - 1] <= r) --last;
    std::memcpy(p.h + r * R + own.first_h, p.hs + ((last % 2) * B + r) * R + own.first_h,
                sizeof(float) * own.units_h);
  }
}

}  // namespace
