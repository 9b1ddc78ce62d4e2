// The kernel's vectors and the block layout every pack and pass shares: GCC vector types as wide as the
// instruction set this variant is built for, their exp/sigmoid/tanh, and the sizes of blocks, tiles and slabs.
// Included by lstm.cpp (the kernel) and pack.cpp (the layouts it reads); part of the ops library only.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

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

// Int8 packs pad each part (input, recurrent) to an even number of rows: rows run in pairs.
inline int64_t even(int64_t n) { return n + (n & 1); }

}  // namespace
