// int8 weights: activations rounded to int16 per row, int16 pairs times int8 pairs in int32 sums
// (pmaddwd), the sums scaled back to fp32 (lstm.cpp's passes call qmultiply()).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

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

}  // namespace
