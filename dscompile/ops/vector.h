// Vector types shared by the kernels: 16-wide with AVX-512, else 8-wide (AVX2), as GCC vector extensions.
#pragma once

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
  for (; i + VW <= n; i += VW) store(y + i, load(y + i) + a * load(x + i));
  for (; i < n; i++) y[i] += a * x[i];
}
