// Thin products, the inner loops: y[m, n] = x[m] . w[n] for a few input rows m, each weight row streamed once.
#pragma once

#include <algorithm>

#include "vector.h"

#if defined(__AVX512F__)
constexpr int ROWS = 3;  // 32 vector registers: 3 weight rows x 8 input rows of accumulators
#else
constexpr int ROWS = 1;  // AVX2 (16 registers): 1 weight row x 8 input rows
#endif
// How far ahead the weight loads are announced, in bytes: into L1 and, further, into L2 (measured on a 2-core
// Xeon with 8 input rows: 20.8 -> 23.7 GB/s on [1536, 576] weights, 24.9 -> 27.1 on the [49152, 576] LM head).
constexpr long PREFETCH_L1 = 8192, PREFETCH_L2 = 49152;

// y[m, n + r] for M input rows (M <= 8) and R weight rows starting at n; prefetches stop at wend. Weights are float32
// or bfloat16 (W), widened as they are loaded; inputs, sums and outputs are float32.
template <int M, int R, typename W>
static inline __attribute__((always_inline)) void block(const float* x, long ldx, long K, const W* w, long ldw,
                                                        float* y, long ldy, long n, const float* bias, const W* wend) {
  constexpr long ahead1 = PREFETCH_L1 / sizeof(W), ahead2 = PREFETCH_L2 / sizeof(W);
  vec acc[R][M] = {};
  const W* wr = w + n * ldw;
  long k = 0;
  for (; k + VW <= K; k += VW) {
    vec a[R];
    for (int r = 0; r < R; r++) {
      a[r] = load(wr + r * ldw + k);
      __builtin_prefetch(std::min(wr + r * ldw + k + ahead1, wend), 0, 3);  // not past the matrix
      __builtin_prefetch(std::min(wr + r * ldw + k + ahead2, wend), 0, 2);
    }
    for (int m = 0; m < M; m++) {
      vec xv = load(x + m * ldx + k);
      for (int r = 0; r < R; r++) acc[r][m] = madd(a[r], xv, acc[r][m]);
    }
  }
  for (int m = 0; m < M; m++) {
    for (int r = 0; r < R; r++) {
      float s = lane_sum(acc[r][m]);
      for (long j = k; j < K; j++) s += x[m * ldx + j] * value(wr[r * ldw + j]);
      y[m * ldy + n + r] = bias ? s + bias[n + r] : s;
    }
  }
}

// Every input row against weight rows n .. n + R - 1, eight input rows at a time (the weight rows stay in L1), the
// rest in one block of exactly their count: splitting 5 rows into 4 + 1 walks the weight rows twice and cost 20%
// on the LM head (measured on a 2-core Xeon: 3.03 ms at 5 rows against 2.24 at 4).
template <int R, typename W>
static inline void all_rows(const float* x, long ldx, long M, long K, const W* w, long ldw, float* y, long N,
                            long n, const float* bias, const W* wend) {
  long m = 0;
  for (; m + 8 <= M; m += 8) block<8, R, W>(x + m * ldx, ldx, K, w, ldw, y + m * N, N, n, bias, wend);
  x += m * ldx;
  y += m * N;
  switch (M - m) {
    case 7: block<7, R, W>(x, ldx, K, w, ldw, y, N, n, bias, wend); break;
    case 6: block<6, R, W>(x, ldx, K, w, ldw, y, N, n, bias, wend); break;
    case 5: block<5, R, W>(x, ldx, K, w, ldw, y, N, n, bias, wend); break;
    case 4: block<4, R, W>(x, ldx, K, w, ldw, y, N, n, bias, wend); break;
    case 3: block<3, R, W>(x, ldx, K, w, ldw, y, N, n, bias, wend); break;
    case 2: block<2, R, W>(x, ldx, K, w, ldw, y, N, n, bias, wend); break;
    case 1: block<1, R, W>(x, ldx, K, w, ldw, y, N, n, bias, wend); break;
    default: break;
  }
}
