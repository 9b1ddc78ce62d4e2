// fp32 and bf16 weights: the register tiles that multiply a block's weights by a step's inputs and hidden
// state, and the blocked sums over them (lstm.cpp's passes call multiply()).
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

namespace {

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
//
// Always inlined: called from a few places in pass.h, GCC would keep one out-of-line copy, and a streaming step's
// calls then cost 1% more instructions than when it sat inside one long pass function (callgrind).
template <typename W>
__attribute__((always_inline)) inline void multiply(float* acc, const Inputs& in, int64_t n, const Rows<W>& m) {
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

}  // namespace
