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
// Weights are packed by the pack ops below (lstmopt/kernels/native.py calls them): per layer and direction, (blocks, I + H, 64): a block holds 16
// hidden units' four gates side by side ([i x16, f x16, g x16, o x16]) over the input rows, then the
// recurrent rows, so that one block's pass streams contiguous memory and its cell update is one
// vectorizable loop; biases (blocks, 64), b_ih + b_hh. An LSTM with proj_size > 0 (LSTMP) has a third
// pass per step, its projection W_hr (o * tanh(c)) to the hidden state, fused after the cell updates in
// the same parallel region. Results are within ~1e-6 of nn.LSTM (the sums run
// in another order and exp is a polynomial), not bit-identical. They do not depend on the vector width or
// the thread count (each sum runs in one order everywhere), except where a GEMM projects many rows.
//
// The Python side checks every argument before calling (lstmopt/checks.py); the checks here only make
// sure nothing can read or write out of bounds.

// The narrowest headers that serve: torch/extension.h would triple the one-time build (~60 s).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include "kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t UNITS = 16;             // hidden units per block
constexpr int64_t WIDTH = 4 * UNITS;      // gate columns per block
// Projecting more input rows than this at once, a GEMM library beats our tiles (and its fixed cost
// no longer shows).
constexpr int64_t GEMM_ROWS = 256;

// GCC vector extensions, as wide as the registers of the instruction set this variant is built for
// (LSTMOPT_VARIANT: baseline SSE2, avx2, avx512, or native for the first-use build, lstmopt/kernels/compile.py);
// LSTMOPT_VECTOR_BYTES=64 on a machine without AVX-512 runs the AVX-512 code's logic in halves, for tests.
#ifndef LSTMOPT_VECTOR_BYTES
#if defined(__AVX512F__)
#define LSTMOPT_VECTOR_BYTES 64
#elif defined(__AVX__)
#define LSTMOPT_VECTOR_BYTES 32
#else
#define LSTMOPT_VECTOR_BYTES 16
#endif
#endif
typedef float vec __attribute__((vector_size(LSTMOPT_VECTOR_BYTES), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(LSTMOPT_VECTOR_BYTES)));
constexpr int64_t LANES = LSTMOPT_VECTOR_BYTES / sizeof(float);
constexpr int64_t VECS = WIDTH / LANES;   // vectors per block row
static_assert(UNITS % LANES == 0, "a gate's units fill whole vectors");

#if LSTMOPT_VECTOR_BYTES == 64 && defined(__AVX512F__)
inline vec splat(float x) { return (vec)_mm512_set1_ps(x); }
#elif LSTMOPT_VECTOR_BYTES == 32 && defined(__AVX__)
inline vec splat(float x) { return (vec)_mm256_set1_ps(x); }
#elif LSTMOPT_VECTOR_BYTES == 16
inline vec splat(float x) { return (vec)_mm_set1_ps(x); }
#else
inline vec splat(float x) { return vec{} + x; }  // wider than the registers: the test build
#endif
inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }

// exp for the gates: Cephes-style range reduction (round to nearest by the 1.5 * 2^23 trick) and a
// degree-6 polynomial; max relative error 8e-8 on [-87, 88].
inline vec vexp(vec x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const vec n = (x * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);
  vec r = x - n * splat(0.693359375f);
  r = r + n * splat(2.12194440e-4f);
  vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline vec vsigmoid(vec x) { return splat(1.0f) / (splat(1.0f) + vexp(-x)); }
inline vec vtanh(vec x) { return splat(2.0f) / (splat(1.0f) + vexp(splat(-2.0f) * x)) - splat(1.0f); }

// Vectors per tile: 6 rows x TV accumulators, TV weight vectors and a broadcast fit the register file
// (16 vector registers with AVX2, 32 with AVX-512).
constexpr int TV = LSTMOPT_VECTOR_BYTES == 64 ? 4 : 2;
constexpr int64_t TILE_ROWS = 6;
// A block's weights are stored in slabs as wide as a tile: slab s, of (I + H, SLAB), holds the gate
// columns [s * SLAB, (s + 1) * SLAB). A tile's pass then streams contiguous memory, which the hardware
// prefetches well (1.3-1.5x faster than rows of all 64 columns, where weights come from L3).
constexpr int64_t SLAB = TV * LANES;
constexpr int64_t SLABS = WIDTH / SLAB;
static_assert(WIDTH % SLAB == 0, "a block's columns split into whole slabs");

// bfloat16 weights (packs made with weights="bfloat16"): the upper half of an fp32, widened exactly on
// load, so that a step streams half the bytes and every sum stays fp32 (activations are not rounded).
typedef uint16_t bf16_bits;

// Rows [r, r + n) of one block's weights (W: float, or bf16_bits): w points at row r of slab 0; slab s
// starts stride elements later.
template <typename W>
struct Rows {
  const W* w;
  int64_t stride, n;
  const W* column(int64_t c) const { return w + (c / SLAB) * stride + c % SLAB; }
};

inline vec weight(const float* p) { return load(p); }
inline vec weight(const bf16_bits* p) {
#if LSTMOPT_VECTOR_BYTES == 64 && defined(__AVX512F__)
  return (vec)_mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#elif LSTMOPT_VECTOR_BYTES == 32 && defined(__AVX2__)
  return (vec)_mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#else
  ivec bits;
  for (int64_t i = 0; i < LANES; ++i) bits[i] = static_cast<int32_t>(uint32_t{p[i]} << 16);
  vec v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// What a multiply reads: row r is x[r][0:nx] followed by h[r][0:m.n - nx], so that one pass over a
// block's weights serves a step's input and hidden state alike (two passes measured 5-10% slower: the
// accumulators go to memory and back in between). The sums start from init (one row of biases, for every
// row) or, if it is null, from the accumulators' memory.
struct Inputs {
  const float* const* x;
  int64_t nx;
  const float* const* h;
  const float* init;
};

// Keeps v in a register. Without it GCC folds the load of a weight vector into each of the tile's FMAs,
// loading it once per row instead of once (measured 1.2x slower).
inline void pin(vec& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif LSTMOPT_VECTOR_BYTES <= 32 && defined(__AVX__) || LSTMOPT_VECTOR_BYTES == 16
  asm("" : "+x"(v));
#endif
}

// a[r][*] += rows v[r][0:k1 - k0] . weights rows [k0, k1), for the columns w points at.
template <int R, int V, bool PIN, typename W>
__attribute__((always_inline)) inline void sweep(vec (&a)[R][V], const W* const (&w)[V], const float* const* v,
                                                 int64_t k0, int64_t k1) {
  if (k1 <= k0) return;
  const float* p[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) p[r] = v[r] - k0;
  for (int64_t k = k0; k < k1; ++k) {
    vec b[V];
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) {
      b[j] = weight(w[j] + k * SLAB);
      if (PIN) pin(b[j]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vec x = splat(p[r][k]);
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) a[r][j] += x * b[j];
    }
  }
}

// R rows at once: C (R rows, stride WIDTH), columns [c0, c0 + V vectors) = the rows' inputs . m. R x V
// accumulators stay in registers; each weight vector loaded serves R rows (for one row, where they would
// not all fit, the FMAs read the weights from memory). Not inlined: register allocation in a caller's
// context spilled the accumulators.
template <int R, int V, bool PIN, typename W>
__attribute__((noinline)) void tile(float* __restrict C, const Inputs& in, const Rows<W>& m, int64_t c0) {
  vec a[R][V];
  const W* w[V];
#pragma GCC unroll 8
  for (int j = 0; j < V; ++j) w[j] = m.column(c0 + j * LANES);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) a[r][j] = load(in.init ? in.init + c0 + j * LANES : C + r * WIDTH + c0 + j * LANES);
  sweep<R, V, PIN, W>(a, w, in.x, 0, in.nx);
  sweep<R, V, PIN, W>(a, w, in.h, in.nx, m.n);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) store(C + r * WIDTH + c0 + j * LANES, a[r][j]);
}

template <int R, int V = TV, bool PIN = true, typename W>
inline void tile_all(float* C, const Inputs& in, const Rows<W>& m) {
  static_assert(VECS % V == 0, "tiles cover a block's columns exactly");
  for (int64_t c0 = 0; c0 < WIDTH; c0 += V * LANES) tile<R, V, PIN, W>(C, in, m, c0);
}

// acc (n rows, stride WIDTH) = the inputs of n <= TILE_ROWS rows . m: one tile of exactly n rows (two
// rows get twice as many columns, to keep enough FMAs in flight), or for one row a pass over all columns
// at once.
template <typename W>
inline void multiply_rows(float* acc, const Inputs& in, int64_t n, const Rows<W>& m) {
  switch (n) {
    case 6: tile_all<6>(acc, in, m); return;
    case 5: tile_all<5>(acc, in, m); return;
    case 4: tile_all<4>(acc, in, m); return;
    case 3: tile_all<3>(acc, in, m); return;
    case 2: tile_all<2, std::min<int64_t>(2 * TV, VECS)>(acc, in, m); return;
    default: tile_all<1, VECS, false>(acc, in, m);
  }
}

// A column's sum runs over at most this many rows in registers before it joins the total. One running
// sum over all I + H rows loses accuracy as they grow (its rounding error grows with their number); GEMM
// libraries, and so eager, sum in blocks. With I + H = 356 and weights at 3x their initial scale, one
// running sum measured 9x eager's own error against float64 (the contract allows 8x); blocks of 64 keep
// it within 0.9 of the bound over 768 configurations, where blocks of 128 did not. The blocks are summed
// here, outside the tiles, whose inner loop stays as it was (partial sums inside the tile made GCC spill
// the weight vectors: 15-20% slower at 16 streams).
constexpr int64_t CHUNK = 64;

// multiply_rows over blocks of CHUNK rows of m, each block's sum added to the total. Every column's sum
// runs over the same blocks in the same order whichever tile computes it: results do not depend on the
// batch size, the vector width or the thread count.
template <typename W>
inline void multiply(float* acc, const Inputs& in, int64_t n, const Rows<W>& m) {
  if (m.n <= CHUNK) return multiply_rows(acc, in, n, m);
  alignas(64) static const float zeros[WIDTH] = {};
  alignas(64) float part[TILE_ROWS * WIDTH];
  const float *x[TILE_ROWS], *h[TILE_ROWS];
  for (int64_t k0 = 0; k0 < m.n; k0 += CHUNK) {
    const int64_t k1 = std::min(k0 + CHUNK, m.n), x1 = std::min(k1, in.nx), h0 = std::max(k0, in.nx);
    for (int64_t r = 0; r < n; ++r) {
      if (k0 < x1) x[r] = in.x[r] + k0;
      if (h0 < k1) h[r] = in.h[r] + (h0 - in.nx);
    }
    multiply_rows(part, Inputs{x, std::max<int64_t>(x1 - k0, 0), h, zeros}, n, Rows<W>{m.w + k0 * SLAB, m.stride, k1 - k0});
    const float* start = k0 == 0 ? in.init : nullptr;  // the biases, or (null) what acc holds
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < WIDTH; c += LANES) {
        float* total = acc + r * WIDTH + c;
        store(total, load(start ? start + c : total) + load(part + r * WIDTH + c));
      }
  }
}

// --- int8 weights -----------------------------------------------------------------------------------
//
// Packs made with weights="int8" (pack_int8) hold each gate row's input and recurrent weights as int8
// with a scale per row and part (w ~ q * s, s = max|w| / 127): a quarter of the bytes a step streams. The
// activations (a step's input rows and hidden state) are quantized per row to int16 (v ~ q * max|v| /
// 32767), so their rounding is ~1e-5 of the row's largest value and the weights' rounding dominates the
// error. Products run as int16 pairs (x[k], x[k+1]) . (w[k], w[k+1]), one pmaddwd per pair of rows and
// vector of columns: twice the multiply-adds per instruction of fp32 FMAs, with exact int32 sums (results
// do not depend on the batch tiling or the thread count). State, gates and accumulation stay fp32.
//
// Layout: weights (blocks, SLABS, Kq, SLAB) int8 as fp32 packs are, but with rows paired: pair p of slab
// s holds, for each of its SLAB columns, rows 2p and 2p + 1 side by side. Kq = Iq + Rq, each part padded to
// an even number of rows (zeros), so that no pair mixes input and state, which have their own scales.
// Biases (blocks, 3, WIDTH): the summed biases, then the input part's scales and the recurrent part's.

// Pairs per int32 sum: |x| <= 32767 and |w| <= 127 keep 256 pairs of products below 2^31.
constexpr int64_t QCHUNK_PAIRS = 256;

inline int64_t even(int64_t n) { return n + (n & 1); }

// q[0:padded) = v[0:n) as int16 (the rest zeros); returns the scale. A NaN or infinity makes the scale
// NaN, so that it reaches the outputs as fp32 arithmetic would carry it.
inline float quantize_row(const float* __restrict v, int64_t n, int64_t padded, int16_t* __restrict q) {
  vec top = splat(0.0f);
  ivec bad{};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    const vec x = load(v + i);
    const vec a = x < 0 ? -x : x;
    bad |= a != a || a == splat(INFINITY);  // NaN or infinity
    top = a > top ? a : top;
  }
  float m = 0.0f;
  bool finite = true;
  for (int64_t l = 0; l < LANES; ++l) {
    m = std::max(m, top[l]);
    finite &= bad[l] == 0;
  }
  for (int64_t k = i; k < n; ++k) {
    m = std::max(m, std::fabs(v[k]));
    finite &= std::isfinite(v[k]);
  }
  if (!finite || m == 0.0f) {
    std::memset(q, 0, sizeof(int16_t) * padded);
    return finite ? 0.0f : NAN;
  }
  const float inv = 32767.0f / m;
  // Round to nearest by the 1.5 * 2^23 trick (|v * inv| <= 32767), as vexp does.
  for (i = 0; i + LANES <= n; i += LANES) {
    const vec r = (load(v + i) * splat(inv) + splat(12582912.0f)) - splat(12582912.0f);
    const ivec k = __builtin_convertvector(r, ivec);
    for (int64_t l = 0; l < LANES; ++l) q[i + l] = static_cast<int16_t>(k[l]);
  }
  for (int64_t k = i; k < n; ++k) q[k] = static_cast<int16_t>(std::nearbyint(v[k] * inv));
  for (int64_t k = n; k < padded; ++k) q[k] = 0;
  return m / 32767.0f;
}

#if defined(__AVX512BW__) && LSTMOPT_VECTOR_BYTES == 64
typedef __m512i qacc;
inline qacc qzero() { return _mm512_setzero_si512(); }
inline qacc qwiden(const int8_t* w) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))); }
inline qacc qpair(const int16_t* x) { int32_t v; std::memcpy(&v, x, 4); return _mm512_set1_epi32(v); }
inline qacc qmadd(qacc a, qacc x, qacc w) { return _mm512_add_epi32(a, _mm512_madd_epi16(x, w)); }
inline void qstore(int32_t* p, qacc a) { _mm512_storeu_si512(p, a); }
inline void qpin(qacc& v) { asm("" : "+v"(v)); }
#elif defined(__AVX2__) && LSTMOPT_VECTOR_BYTES == 32
typedef __m256i qacc;
inline qacc qzero() { return _mm256_setzero_si256(); }
inline qacc qwiden(const int8_t* w) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
inline qacc qpair(const int16_t* x) { int32_t v; std::memcpy(&v, x, 4); return _mm256_set1_epi32(v); }
inline qacc qmadd(qacc a, qacc x, qacc w) { return _mm256_add_epi32(a, _mm256_madd_epi16(x, w)); }
inline void qstore(int32_t* p, qacc a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
inline void qpin(qacc& v) { asm("" : "+x"(v)); }
#else
// Any other width (SSE2 builds, the wide test build): the same sums in plain code.
struct qacc { int32_t v[LANES]; int16_t w[2 * LANES]; };
inline qacc qzero() { return qacc{}; }
inline qacc qwiden(const int8_t* w) { qacc a{}; for (int64_t i = 0; i < 2 * LANES; ++i) a.w[i] = w[i]; return a; }
inline qacc qpair(const int16_t* x) { qacc a{}; a.w[0] = x[0]; a.w[1] = x[1]; return a; }
inline qacc qmadd(qacc a, const qacc& x, const qacc& w) {
  for (int64_t i = 0; i < LANES; ++i) a.v[i] += int32_t{x.w[0]} * w.w[2 * i] + int32_t{x.w[1]} * w.w[2 * i + 1];
  return a;
}
inline void qstore(int32_t* p, const qacc& a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline void qpin(qacc&) {}
#endif

// C (R rows, stride WIDTH), columns [c0, c0 + V vectors) = int32 sums over `pairs` row pairs of
// x[r] (int16, pair-aligned) . the weights. w: the block's slab 0 at its first pair; slabs `stride` bytes apart.
template <int R, int V, bool PIN>
__attribute__((noinline)) void qtile(int32_t* __restrict C, const int16_t* const* x, const int8_t* w0, int64_t stride,
                                     int64_t c0, int64_t pairs) {
  qacc a[R][V];
  const int8_t* w[V];
#pragma GCC unroll 8
  for (int j = 0; j < V; ++j) {
    const int64_t c = c0 + j * LANES;
    w[j] = w0 + (c / SLAB) * stride + (c % SLAB) * 2;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) a[r][j] = qzero();
  for (int64_t p = 0; p < pairs; ++p) {
    if constexpr (R == 1) {  // each weight vector serves one row: widen and use it at once (no spills)
      const qacc xr = qpair(x[0] + 2 * p);
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) a[0][j] = qmadd(a[0][j], xr, qwiden(w[j] + p * SLAB * 2));
      continue;
    }
    qacc b[V];
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) {
      b[j] = qwiden(w[j] + p * SLAB * 2);
      if (PIN) qpin(b[j]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const qacc xr = qpair(x[r] + 2 * p);
#pragma GCC unroll 8
      for (int j = 0; j < V; ++j) a[r][j] = qmadd(a[r][j], xr, b[j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < V; ++j) qstore(C + r * WIDTH + c0 + j * LANES, a[r][j]);
}

template <int R, int V = TV, bool PIN = true>
inline void qtile_all(int32_t* C, const int16_t* const* x, const int8_t* w0, int64_t stride, int64_t pairs) {
  static_assert(VECS % V == 0, "tiles cover a block's columns exactly");
  for (int64_t c0 = 0; c0 < WIDTH; c0 += V * LANES) qtile<R, V, PIN>(C, x, w0, stride, c0, pairs);
}

inline void qmultiply_rows(int32_t* C, const int16_t* const* x, int64_t n, const int8_t* w0, int64_t stride,
                           int64_t pairs) {
  switch (n) {
    case 6: qtile_all<6>(C, x, w0, stride, pairs); return;
    case 5: qtile_all<5>(C, x, w0, stride, pairs); return;
    case 4: qtile_all<4>(C, x, w0, stride, pairs); return;
    case 3: qtile_all<3>(C, x, w0, stride, pairs); return;
    case 2: qtile_all<2, std::min<int64_t>(2 * TV, VECS)>(C, x, w0, stride, pairs); return;
    default: qtile_all<1, VECS, false>(C, x, w0, stride, pairs);
  }
}

// acc (n rows, stride WIDTH) += the rows x[r] (int16, scale[r]) . one part of a block's int8 weights
// (`pairs` row pairs from w0, column scales wscale), in int32 sums of up to QCHUNK_PAIRS pairs.
inline void qmultiply(float* acc, const int16_t* const* x, const float* scale, int64_t n, const int8_t* w0,
                      int64_t stride, int64_t pairs, const float* wscale) {
  alignas(64) int32_t part[TILE_ROWS * WIDTH];
  const int16_t* xs[TILE_ROWS];
  for (int64_t p0 = 0; p0 < pairs; p0 += QCHUNK_PAIRS) {
    for (int64_t r = 0; r < n; ++r) xs[r] = x[r] + 2 * p0;
    qmultiply_rows(part, xs, n, w0 + p0 * SLAB * 2, stride, std::min(QCHUNK_PAIRS, pairs - p0));
    for (int64_t r = 0; r < n; ++r) {
      const vec s = splat(scale[r]);
      for (int64_t c = 0; c < WIDTH; c += LANES) {
        ivec sums;
        std::memcpy(&sums, part + r * WIDTH + c, sizeof(sums));
        store(acc + r * WIDTH + c, load(acc + r * WIDTH + c) + __builtin_convertvector(sums, vec) * (s * load(wscale + c)));
      }
    }
  }
}

// Each thread's quantized activations: a pass's input rows (N, Iq) and a step's hidden state (B, Rq).
struct Quantized {
  std::vector<int16_t> x, h;
  std::vector<float> x_scale, h_scale;
  void rows(std::vector<int16_t>& q, std::vector<float>& scale, const float* v, int64_t n, int64_t width,
            int64_t padded) {
    if (q.size() < static_cast<size_t>(n * padded)) q.resize(n * padded);
    if (scale.size() < static_cast<size_t>(n)) scale.resize(n);
    for (int64_t r = 0; r < n; ++r) scale[r] = quantize_row(v + r * width, width, padded, q.data() + r * padded);
  }
};

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
  bool gru;                 // a GRU's layer: gru_cell, no cell state
  // int8 packs (pack_int8): the weights, with w null; bias then points at (blocks, 3, WIDTH).
  const int8_t* wq = nullptr;
  int64_t bias_stride() const { return wq ? 3 * WIDTH : WIDTH; }
  // bf16 packs (pack with weights="bfloat16"): the weights, with w null (the projection stays fp32).
  const bf16_bits* wh = nullptr;
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

// One direction of one layer over packed rows, the blocks [share.b0, share.b1) of it.
//
// Each step makes one pass over each block's weights (six rows at a time for batches, one for streaming),
// with the cell update of the block's units right after, while the gates are in cache. The inputs of all
// steps are projected first (here for up to GEMM_ROWS rows, else by a GEMM before the threads start).
//
// closing: the parallel region ends after this pass, and its end is the barrier the last step needs.
void run_pass(const Pass& p, const Steps& steps, int64_t H, const Share& share, bool closing) {
  const int64_t N = steps.rows, T = steps.count(), B = steps.batch(), R = p.R, K = p.I + R;
  const int64_t b0 = share.b0, b1 = share.b1;
  alignas(64) float acc[TILE_ROWS * WIDTH];
  thread_local Quantized q;  // this thread's: every thread quantizes all rows it reads
  if (p.wq) q.rows(q.x, q.x_scale, p.x, N, p.I, even(p.I));
  if (p.xp && p.wq) {  // int8: the inputs' part of the gates, as gates_int8 computes it for a single step
    const int64_t Iq = even(p.I), stride = (Iq + even(R)) * SLAB;
    const int16_t* rows[TILE_ROWS];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const float* bias = p.bias + blk * p.bias_stride();
      for (int64_t r0 = 0; r0 < N; r0 += TILE_ROWS) {
        const int64_t n = std::min(TILE_ROWS, N - r0);
        for (int64_t r = 0; r < n; ++r) {
          std::memcpy(acc + r * WIDTH, bias, sizeof(float) * WIDTH);
          rows[r] = q.x.data() + (r0 + r) * Iq;
        }
        qmultiply(acc, rows, q.x_scale.data() + r0, n, p.wq + blk * SLABS * stride, stride, Iq / 2, bias + WIDTH);
        for (int64_t r = 0; r < n; ++r)
          for (int64_t s = 0; s < SLABS; ++s)
            std::memcpy(p.xp + ((blk * SLABS + s) * N + r0 + r) * SLAB, acc + r * WIDTH + s * SLAB,
                        sizeof(float) * SLAB);
      }
    }
  } else if (p.xp && !p.projected) {
    const float* in[TILE_ROWS];
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t r0 = 0; r0 < N; r0 += TILE_ROWS) {
        const int64_t n = std::min(TILE_ROWS, N - r0);
        for (int64_t r = 0; r < n; ++r) in[r] = p.x + (r0 + r) * p.I;
        const Inputs inputs{in, p.I, nullptr, p.bias + blk * WIDTH};
        if (p.wh)
          multiply(acc, inputs, n, Rows<bf16_bits>{p.wh + blk * SLABS * K * SLAB, K * SLAB, p.I});
        else
          multiply(acc, inputs, n, Rows<float>{p.w + blk * SLABS * K * SLAB, K * SLAB, p.I});
        for (int64_t r = 0; r < n; ++r)
          for (int64_t s = 0; s < SLABS; ++s)
            std::memcpy(p.xp + ((blk * SLABS + s) * N + r0 + r) * SLAB, acc + r * WIDTH + s * SLAB,
                        sizeof(float) * SLAB);
      }
  }
  // Own units of the initial states: the hidden state into both buffers (rows that have not started, in a
  // reverse pass over sequences of different lengths, find it in either), the cell state into its output.
  // A thread owns the cell units of its blocks and the hidden units it writes: the same, or with a
  // projection, those of its projection blocks.
  const int64_t first_unit = b0 * UNITS, own = std::min(b1 * UNITS, H) - first_unit;
  const int64_t first_h = p.wp ? std::min(share.p0 * WIDTH, R) : first_unit;
  const int64_t own_h = p.wp ? std::min(share.p1 * WIDTH, R) - first_h : own;
  auto initial = [&](float* to, const float* from, int64_t n) {
    if (from)
      std::memcpy(to, from, sizeof(float) * n);
    else
      std::memset(to, 0, sizeof(float) * n);
  };
  for (int64_t r = 0; r < B; ++r) {
    const int64_t at = r * R + first_h;
    initial(p.hs + at, p.h0 ? p.h0 + at : nullptr, own_h);
    initial(p.hs + B * R + at, p.h0 ? p.h0 + at : nullptr, own_h);
    initial(p.c + r * H + first_unit, p.c0 ? p.c0 + r * H + first_unit : nullptr, own);
  }
  // No barrier after these writes: the first step reads h_start, and each thread's own units of the
  // buffers are read only after that step's barrier.
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = p.reverse ? T - 1 - s : s, rows = steps.sizes[t];
    const float* h_in = s == 0 ? p.h_start : p.hs + (s % 2) * B * R;
    float* h_out = p.hs + ((s + 1) % 2) * B * R;
    if (p.wq) q.rows(q.h, q.h_scale, h_in, rows, R, even(R));
    // Steps alternate the order in which they visit the blocks: the weights last read are read first,
    // while still in cache, where a call's working set is a little larger than the cache.
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t blk = s % 2 == 0 ? i : b1 - 1 - (i - b0);
      const int64_t first = blk * UNITS, units = std::min(UNITS, H - first);
      for (int64_t r0 = 0; r0 < rows; r0 += TILE_ROWS) {
        const int64_t n = std::min(TILE_ROWS, rows - r0);
        gates(acc, p, steps, blk, t, r0, n, h_in, q);
        for (int64_t r = 0; r < n; ++r) {
          float* c_row = p.c + (r0 + r) * H + first;
          if (p.gru) {
            gru_cell(acc + r * WIDTH, h_in + (r0 + r) * R + first, h_out + (r0 + r) * R + first,
                     p.out + (steps.offsets[t] + r0 + r) * p.out_stride + p.col + first, units);
          } else if (p.wp) {  // o * tanh(c) into m (twice: cell() writes a state and an output), projected below
            float* m_row = p.m + (r0 + r) * H + first;
            cell(acc + r * WIDTH, c_row, m_row, m_row, units);
          } else {
            cell(acc + r * WIDTH, c_row, h_out + (r0 + r) * R + first,
                 p.out + (steps.offsets[t] + r0 + r) * p.out_stride + p.col + first, units);
          }
        }
      }
    }
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
    std::memcpy(p.h + r * R + first_h, p.hs + ((last % 2) * B + r) * R + first_h, sizeof(float) * own_h);
  }
}

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

// The whole call, every layer and direction. rows_in: (N, I) packed rows; projections: none, or (LSTMP)
// one per layer and direction, to P = proj_size units. Returns the output rows (N, D * R) and h_n (S, B, R),
// c_n (S, B, H), where R is P or, without projections, H.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& rows_in, const Steps& steps,
                                                   const std::optional<at::Tensor>& hx,
                                                   const std::optional<at::Tensor>& cx, at::TensorList weights,
                                                   at::TensorList biases, int64_t H, bool bidirectional,
                                                   at::TensorList projections, int64_t proj_size, bool gru) {
  const int64_t D = bidirectional ? 2 : 1, S = static_cast<int64_t>(biases.size());
  const int64_t N = steps.rows, B = steps.batch(), T = steps.count(), I0 = rows_in.size(1);
  const int64_t blocks = (H + UNITS - 1) / UNITS;
  const bool projected = !projections.empty();
  const int64_t R = projected ? proj_size : H, pblocks = projected ? (R + WIDTH - 1) / WIDTH : 0;
  TORCH_CHECK(S > 0 && S % D == 0 && static_cast<int64_t>(weights.size()) == S,
              "lstmopt::lstm: one weight tensor and one bias per layer and direction");
  TORCH_CHECK(projected ? static_cast<int64_t>(projections.size()) == S && proj_size > 0 && proj_size < H && !gru
                        : proj_size == 0,
              "lstmopt::lstm: one projection per layer and direction, to 0 < proj_size < hidden_size units");
  const bool int8 = weights[0].scalar_type() == at::kChar;  // packs of pack_int8
  const bool bf16 = weights[0].scalar_type() == at::kBFloat16;  // packs made with weights="bfloat16"
  const auto weights_type = int8 ? at::kChar : bf16 ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK(!int8 || (!gru && !projected), "lstmopt::lstm: int8 packs serve LSTMs without a projection");
  for (int64_t s = 0; s < S; ++s) {
    const int64_t I = s < D ? I0 : D * R;
    const std::vector<int64_t> packed_bias = int8 ? std::vector<int64_t>{blocks, 3, WIDTH} : std::vector<int64_t>{blocks, WIDTH};
    TORCH_CHECK(weights[s].scalar_type() == weights_type && weights[s].is_contiguous() &&
                    weights[s].is_cpu() &&
                    weights[s].sizes() == at::IntArrayRef({blocks, SLABS, int8 ? even(I) + even(R) : I + R, SLAB}),
                "lstmopt::lstm: weights of layer ", s / D, " are not packed for this input");
    TORCH_CHECK(biases[s].scalar_type() == at::kFloat && biases[s].is_contiguous() && biases[s].is_cpu() &&
                    biases[s].sizes() == at::IntArrayRef(packed_bias),
                "lstmopt::lstm: biases of layer ", s / D, " are not packed");
    TORCH_CHECK(!projected || (projections[s].scalar_type() == at::kFloat && projections[s].is_contiguous() &&
                               projections[s].is_cpu() &&
                               projections[s].sizes() == at::IntArrayRef({pblocks, SLABS, H, SLAB})),
                "lstmopt::lstm: projection of layer ", s / D, " is not packed");
  }
  // The initial states are read where the threads start (each its own units), not copied here first.
  auto given_state = [&](const std::optional<at::Tensor>& given, int64_t units) {
    if (!given.has_value()) return at::Tensor();
    TORCH_CHECK(given->sizes() == at::IntArrayRef({S, B, units}) && given->scalar_type() == at::kFloat &&
                    given->is_cpu(), "lstmopt::lstm: states must be (layers * directions, batch, ",
                units == H ? "hidden" : "proj", ") float32");
    return given->contiguous();
  };
  const at::Tensor h0 = given_state(hx, R), c0 = given_state(cx, H);
  const std::vector<float> zero_state(h0.defined() ? 0 : B * R);  // the first step's, without hx
  at::Tensor h_n = at::empty({S, B, R}, rows_in.options()), c_n = at::empty({S, B, H}, rows_in.options());

  // The work per step (multiply-adds) decides whether to split the call between threads.
  const int64_t step_work = B * ((T == 1 ? I0 + R : R) * blocks * WIDTH + H * pblocks * WIDTH);
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), blocks));
  const bool parallel = threads > 1 && step_work >= PARALLEL_STEP && step_work * T * S >= PARALLEL_CALL &&
                        !at::in_parallel_region();
  // The inputs' projections by a GEMM, which runs on the threads itself (int8 packs: always the kernel's own).
  const bool gemm = T > 1 && N > GEMM_ROWS && !int8 && !bf16;

  std::vector<at::Tensor> outs, xps;
  std::vector<Pass> passes;
  std::unique_ptr<float[]> own_scratch;
  // Per layer and direction: two hidden-state buffers, and with a projection o * tanh(c) before it.
  const int64_t per_pass = 2 * B * R + (projected ? B * H : 0);
  float* const hs = scratch(static_cast<size_t>(S * per_pass), own_scratch);
  float* const h_base = h_n.data_ptr<float>();
  float* const c_base = c_n.data_ptr<float>();
  const float* const h0_base = h0.defined() ? h0.const_data_ptr<float>() : nullptr;
  const float* const c0_base = c0.defined() ? c0.const_data_ptr<float>() : nullptr;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t layer = s / D, d = s % D, I = layer == 0 ? I0 : D * R;
    if (d == 0) outs.push_back(at::empty({N, D * R}, rows_in.options()));
    const at::Tensor& x = layer == 0 ? rows_in : outs[layer - 1];
    at::Tensor xp;
    if (T > 1) xp = at::empty({blocks, SLABS, N, SLAB}, rows_in.options());
    xps.push_back(xp);
    float* const buffers = hs + s * per_pass;
    passes.push_back(Pass{x.data_ptr<float>(), I, int8 || bf16 ? nullptr : weights[s].data_ptr<float>(), biases[s].data_ptr<float>(),
                          d == 1, xp.defined() ? xp.data_ptr<float>() : nullptr, false,
                          h0_base ? h0_base + s * B * R : nullptr, nullptr /* h_start, below */,
                          c0_base ? c0_base + s * B * H : nullptr,
                          h_base + s * B * R, c_base + s * B * H, buffers, outs[layer].data_ptr<float>(), D * R,
                          d * R, R, projected ? projections[s].data_ptr<float>() : nullptr,
                          projected ? buffers + 2 * B * R : nullptr, gru});
    passes.back().h_start = passes.back().h0 ? passes.back().h0 : zero_state.data();
    if (int8) passes.back().wq = weights[s].const_data_ptr<int8_t>();
    if (bf16) passes.back().wh = reinterpret_cast<const bf16_bits*>(weights[s].const_data_ptr<at::BFloat16>());
  }
  auto project_by_gemm = [&](int64_t s) {  // before the threads of a layer start: its input is complete
    const int64_t layer = s / D;
    const at::Tensor& x = layer == 0 ? rows_in : outs[layer - 1];
    at::matmul_out(xps[s], x, weights[s].narrow(2, 0, passes[s].I));
    xps[s].add_(biases[s].view({blocks, SLABS, 1, SLAB}));
    passes[s].projected = true;
  };

  if (!parallel) {
    for (int64_t s = 0; s < S; ++s) {
      if (gemm) project_by_gemm(s);
      run_pass(passes[s], steps, H, Share::of(0, 1, blocks, pblocks), true);
    }
  } else if (!gemm) {
    // One parallel region for the whole call: each thread owns a range of blocks (hidden units) in every
    // layer, and barriers hand the hidden states around, instead of waking threads per layer or step.
#pragma omp parallel num_threads(threads)
    {
      const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();  // the team may be smaller
      const Share share = Share::of(id, team, blocks, pblocks);
      for (int64_t s = 0; s < S; ++s) run_pass(passes[s], steps, H, share, s == S - 1);
    }
  } else {
    for (int64_t first = 0; first < S; first += D) {
      for (int64_t s = first; s < first + D; ++s) project_by_gemm(s);
#pragma omp parallel num_threads(threads)
      {
        const int64_t team = omp_get_num_threads(), id = omp_get_thread_num();
        const Share share = Share::of(id, team, blocks, pblocks);
        for (int64_t s = first; s < first + D; ++s) run_pass(passes[s], steps, H, share, s == first + D - 1);
      }
    }
  }
  return {outs.back(), h_n, c_n};
}

}  // namespace

// nn.LSTM's (or nn.GRU's) call on the native kernel. input: a tensor as nn.LSTM takes it ((T, B, I),
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
                                                         at::TensorList projections, int64_t proj_size, bool gru) {
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
               proj_size, gru);
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
                             gru);
  at::Tensor output = out.view({T, B, out.size(1)});
  if (unbatched) return {output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)};
  return {batch_first ? output.transpose(0, 1) : output, h_n, c_n};
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
  auto by_block = [&](const at::Tensor& per_gate_row) {  // (4, padded) -> (blocks, WIDTH)
    return per_gate_row.view({4, blocks, UNITS}).permute({1, 0, 2}).reshape({blocks, WIDTH});
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
    weights.push_back(full.view({4, blocks, UNITS, Kq}).permute({1, 3, 0, 2}).reshape({blocks, Kq, SLABS, SLAB})
                          .permute({0, 2, 1, 3}).reshape({blocks, SLABS, Kq / 2, 2, SLAB}).transpose(3, 4)
                          .contiguous().view({blocks, SLABS, Kq, SLAB}));
    at::Tensor bias = at::zeros({4, padded}, w_ih.options());
    if (has_biases) {
      TORCH_CHECK(dense[i + 2].numel() == 4 * H && dense[i + 3].numel() == 4 * H, "lstmopt::pack: bias sizes");
      bias.narrow(1, 0, H).copy_(dense[i + 2].add(dense[i + 3]).reshape({4, H}));
    }
    biases.push_back(at::stack({by_block(bias), by_block(s_ih), by_block(s_hh)}, 1).contiguous());
  }
  return {weights, biases};
}

// nn.LSTM's flat weights (w_ih, w_hh[, b_ih, b_hh][, w_hr] per layer and direction) in this kernel's layout:
// per layer and direction, weights (blocks, SLABS, I + R, SLAB), whose column c of slab s is gate
// (s * SLAB + c) / 16 of unit 16 * block + (s * SLAB + c) % 16, and biases (blocks, WIDTH), b_ih + b_hh;
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
    weights.push_back(full.view({4, blocks, UNITS, K}).permute({1, 3, 0, 2}).reshape({blocks, K, SLABS, SLAB})
                          .permute({0, 2, 1, 3}).contiguous());
    at::Tensor bias = at::zeros({4, padded}, w_ih.options());
    if (has_biases) {
      TORCH_CHECK(dense[i + 2].numel() == 4 * H && dense[i + 3].numel() == 4 * H, "lstmopt::pack: bias sizes");
      bias.narrow(1, 0, H).copy_(dense[i + 2].add(dense[i + 3]).reshape({4, H}));
    }
    biases.push_back(bias.view({4, blocks, UNITS}).permute({1, 0, 2}).reshape({blocks, WIDTH}).contiguous());
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
    weights.push_back(full.view({4, blocks, UNITS, K}).permute({1, 3, 0, 2}).reshape({blocks, K, SLABS, SLAB})
                          .permute({0, 2, 1, 3}).contiguous());
    at::Tensor bias = at::zeros({4, padded}, w_ih.options());
    if (has_biases) {
      TORCH_CHECK(dense[i + 2].numel() == 3 * H && dense[i + 3].numel() == 3 * H, "lstmopt::pack_gru: bias sizes");
      const at::Tensor b_ih = dense[i + 2].view({3, H}), b_hh = dense[i + 3].view({3, H});
      bias.narrow(1, 0, H).narrow(0, 0, 2).copy_(b_ih.narrow(0, 0, 2).add(b_hh.narrow(0, 0, 2)));
      bias[2].narrow(0, 0, H).copy_(b_ih[2]);
      bias[3].narrow(0, 0, H).copy_(b_hh[2]);
    }
    biases.push_back(bias.view({4, blocks, UNITS}).permute({1, 0, 2}).reshape({blocks, WIDTH}).contiguous());
  }
  return {weights, biases};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_plain(const at::Tensor& input,
                                                          const std::optional<at::Tensor>& batch_sizes,
                                                          const std::optional<at::Tensor>& hx,
                                                          const std::optional<at::Tensor>& cx, at::TensorList weights,
                                                          at::TensorList biases, int64_t hidden_size,
                                                          bool bidirectional, bool batch_first) {
  return recurrent(input, batch_sizes, hx, cx, weights, biases, hidden_size, bidirectional, batch_first, {}, 0,
                   false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstmp(const at::Tensor& input,
                                                     const std::optional<at::Tensor>& batch_sizes,
                                                     const std::optional<at::Tensor>& hx,
                                                     const std::optional<at::Tensor>& cx, at::TensorList weights,
                                                     at::TensorList biases, int64_t hidden_size, bool bidirectional,
                                                     bool batch_first, at::TensorList projections, int64_t proj_size) {
  return recurrent(input, batch_sizes, hx, cx, weights, biases, hidden_size, bidirectional, batch_first,
                   projections, proj_size, false);
}

// nn.GRU's call: input and hx as nn.GRU takes them (hx permuted to sorted order for packed data); returns
// the output and h_n.
std::tuple<at::Tensor, at::Tensor> gru(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                                       const std::optional<at::Tensor>& hx, at::TensorList weights,
                                       at::TensorList biases, int64_t hidden_size, bool bidirectional,
                                       bool batch_first) {
  auto [out, h_n, scratch] = recurrent(input, batch_sizes, hx, std::nullopt, weights, biases, hidden_size,
                                       bidirectional, batch_first, {}, 0, true);
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
}

TORCH_LIBRARY_IMPL(lstmopt, CPU, m) {
  m.impl("lstm", &lstm_plain);
  m.impl("lstmp", &lstmp);
  m.impl("gru", &gru);
  m.impl("pack_gru", &pack_gru);
  m.impl("pack", &pack);
  m.impl("pack_projections", &pack_projections);
}
