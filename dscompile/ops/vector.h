// Vector types shared by the kernels: 16-wide with AVX-512, else 8-wide (AVX2), as GCC vector extensions.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
typedef float vec __attribute__((vector_size(VW * 4), aligned(4)));
typedef int ivec __attribute__((vector_size(VW * 4)));
typedef float half_vec __attribute__((vector_size(32), aligned(4)));
typedef float quarter_vec __attribute__((vector_size(16), aligned(4)));

typedef unsigned short bf16_vec __attribute__((vector_size(VW * 2), aligned(2)));
typedef unsigned int uvec __attribute__((vector_size(VW * 4)));
typedef unsigned short bf16;  // bfloat16's bits: the high half of a float32

static inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
// VW bfloat16 values widened to float32 (exact: a bfloat16 is a float32 with its low 16 bits zero).
static inline vec load(const bf16* p) {
  const uvec bits = __builtin_convertvector(*reinterpret_cast<const bf16_vec*>(p), uvec) << 16;
  vec out;
  __builtin_memcpy(&out, &bits, sizeof out);
  return out;
}
static inline float value(float x) { return x; }
static inline float value(bf16 x) {
  const unsigned int bits = static_cast<unsigned int>(x) << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof out);
  return out;
}
static inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }

// a * b + c rounded once. The kernels build with -ffp-contract=off and fuse only here: left to the compiler, whether
// `acc += a * b` became an FMA depended on the CPU it tuned for (GCC avoids FMA chains on AMD Zen) and on the
// instance of a template, so a row's sum could differ between a block of one row and a block of eight.
static inline vec madd(vec a, vec b, vec c) {
#if defined(__AVX512F__)
  return (vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
static inline vec madd(float a, vec b, vec c) { return madd(vec{} + a, b, c); }

// The sum of a vector's lanes as a tree (halves added), so the sums of many vectors overlap in the pipeline.
static inline float lane_sum(vec a) {
  half_vec h;
#if defined(__AVX512F__)
  half_vec lo, hi;
  __builtin_memcpy(&lo, &a, sizeof lo);
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&a) + sizeof lo, sizeof hi);
  h = lo + hi;
#else
  h = a;
#endif
  quarter_vec l4, h4;
  __builtin_memcpy(&l4, &h, sizeof l4);
  __builtin_memcpy(&h4, reinterpret_cast<const char*>(&h) + sizeof l4, sizeof h4);
  quarter_vec s = l4 + h4;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// y += a * x over n floats.
static inline void axpy(float* y, float a, const float* x, long n) {
  long i = 0;
  for (; i + VW <= n; i += VW) store(y + i, madd(a, load(x + i), load(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}
