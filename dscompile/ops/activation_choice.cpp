// The choice of a MoE routed by its experts' activations (moe_ops, router="activation"): each token's top k experts
// by score, found by radix selection (ties go to the lowest expert ids), the same in both ops below.
//
// dscompile::top_weighted_rows (decode, few tokens): the choice and the sum of the chosen neurons' rows weighted by
// their activations. Every routed neuron's activation is known before the choice; what remains is the chosen
// neurons' down rows. In Inductor, topk alone took 80 us a layer (768 of 1536), and the indexed reduction over the
// chosen rows walked them column by column (half the dense decode speed on SmolLM2). Here a token's experts are
// listed in ascending order (so their rows stream forward and later ones are prefetched), and each task sums a
// fixed run of them whole: a row's bytes are read once, and a token's sums depend on nothing but the token,
// whatever the other tokens and the threads.
//
// dscompile::top_mask (prefill and larger batches, without autograd): the choice as a 0/1 mask [tokens, experts]
// for the masked formulation. torch.topk over 1,536 scores took 14 ms a layer at 2,048 tokens, about a dense
// layer's matmul.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "vector.h"

constexpr long AHEAD = 16;  // rows prefetched ahead of the ones being summed
constexpr long CHUNK = 64;  // chosen rows summed per task

namespace {

// A float's order as an unsigned integer (-0 counts as +0): larger float, larger key.
inline uint32_t order_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u &= -static_cast<uint32_t>(u != 0x80000000u);                                  // -0 as +0
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);  // negatives: every bit flipped
}

// Scratch for one thread's choices over R experts.
struct Choice {
  std::vector<uint32_t> key, candidate;
  std::vector<long> taken;
  explicit Choice(long R) : key(R), candidate(R), taken(R + 1) {}
};

// chosen[0..k) = the k experts with the largest scores s[0..R), in ascending order, ties to the lowest ids. The
// k-th largest key is found a byte at a time from the top (radix selection: a histogram of the remaining
// candidates' next byte, then only the candidates in the bin that holds it), and the last pass keeps the experts
// above it and the first of those equal to it, without branches. std::nth_element took 24 us a token over 1,536
// scores (its comparisons mispredict on new scores); this takes about 8.
void choose_top(const float* s, long R, long k, Choice& w, long* chosen) {
  uint32_t* key = w.key.data();
  uint32_t* candidate = w.candidate.data();
  for (long e = 0; e < R; e++) key[e] = order_key(s[e]);
  long n = R, need = k;  // need: how many of the candidates to take, from the top
  uint32_t threshold = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    uint32_t counts[4][256] = {};  // four histograms, so that equal neighbours do not wait on each other's counts
    if (shift == 24)
      for (long e = 0; e < R; e++) counts[e & 3][key[e] >> 24]++;
    else
      for (long i = 0; i < n; i++) counts[i & 3][(key[candidate[i]] >> shift) & 255]++;
    uint32_t count[256];
    for (int b = 0; b < 256; b++) count[b] = counts[0][b] + counts[1][b] + counts[2][b] + counts[3][b];
    int bin = 255;
    for (; bin > 0 && need > static_cast<long>(count[bin]); bin--) need -= count[bin];
    threshold |= static_cast<uint32_t>(bin) << shift;
    long kept = 0;  // the candidates in that bin, compacted in order
    if (shift == 24)
      for (long e = 0; e < R; e++) {
        candidate[kept] = e;
        kept += (key[e] >> 24) == static_cast<uint32_t>(bin);
      }
    else
      for (long i = 0; i < n; i++) {
        const uint32_t c = candidate[i];
        candidate[kept] = c;
        kept += ((key[c] >> shift) & 255) == static_cast<uint32_t>(bin);
      }
    n = kept;
  }
  long* taken = w.taken.data();
  long count = 0, ties = need;  // every key above the threshold, then the first `need` equal to it
  for (long e = 0; e < R; e++) {
    const long equal = key[e] == threshold, take = (key[e] > threshold) | (equal & (ties > 0));  // no branches
    ties -= equal & take;
    taken[count] = e;
    count += take;
  }
  std::copy(taken, taken + k, chosen);
}

void check_scores(const at::Tensor& scores, int64_t k, const char* op) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.device().is_cpu(), op,
              ": scores must be a float32 CPU matrix [tokens, experts]");
  TORCH_CHECK(k >= 1 && k <= scores.size(1), op, ": k must be in [1, ", scores.size(1), "], got ", k);
}

void prefetch_row(const float* row, long n) {
  for (long c = 0; c < n; c += 16) __builtin_prefetch(row + c, 0, 3);
}

// y += a[n0] * rows[n0] + ... + a[n3] * rows[n3], added in that order (the same roundings as four axpy calls),
// with y loaded and stored once per vector instead of four times.
void axpy4(float* y, long H, const float* a, long n0, long n1, long n2, long n3, const float* rows) {
  const float* x0 = rows + n0 * H;
  const float* x1 = rows + n1 * H;
  const float* x2 = rows + n2 * H;
  const float* x3 = rows + n3 * H;
  const float a0 = a[n0], a1 = a[n1], a2 = a[n2], a3 = a[n3];
  long i = 0;
  for (; i + VW <= H; i += VW)
    store(y + i, madd(a3, load(x3 + i), madd(a2, load(x2 + i), madd(a1, load(x1 + i), madd(a0, load(x0 + i),
                                                                                           load(y + i))))));
  for (; i < H; i++) y[i] = (((y[i] + a0 * x0[i]) + a1 * x1[i]) + a2 * x2[i]) + a3 * x3[i];
}

}  // namespace

at::Tensor top_mask(const at::Tensor& scores_, int64_t k) {
  check_scores(scores_, k, "top_mask");
  const at::Tensor scores = scores_.contiguous();
  const long T = scores.size(0), R = scores.size(1);
  at::Tensor mask = at::zeros({T, R}, scores.options());
  const float* sp = scores.data_ptr<float>();
  float* mp = mask.data_ptr<float>();
  at::parallel_for(0, T, 4, [&](long begin, long end) {
    Choice scratch(R);
    std::vector<long> chosen(k);
    for (long t = begin; t < end; t++) {
      choose_top(sp + t * R, R, k, scratch, chosen.data());
      for (long j = 0; j < k; j++) mp[t * R + chosen[j]] = 1.f;
    }
  });
  return mask;
}

std::tuple<at::Tensor, at::Tensor> top_weighted_rows(const at::Tensor& scores_, const at::Tensor& a_,
                                                     const at::Tensor& rows_, int64_t k) {
  check_scores(scores_, k, "top_weighted_rows");
  for (const auto* t : {&a_, &rows_})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                "top_weighted_rows: a and rows must be float32 CPU matrices");
  const long T = scores_.size(0), R = scores_.size(1), N = rows_.size(0), H = rows_.size(1);
  TORCH_CHECK(a_.size(0) == T && a_.size(1) == N && N % R == 0,
              "top_weighted_rows: a must be [tokens, neurons] with a whole number of neurons per expert");
  const at::Tensor scores = scores_.contiguous(), a = a_.contiguous(), rows = rows_.contiguous();
  const long m = N / R;
  at::Tensor idx = at::empty({T, k}, scores.options().dtype(at::kLong));
  const float* sp = scores.data_ptr<float>();
  long* ip = idx.data_ptr<long>();
  at::parallel_for(0, T, 1, [&](long begin, long end) {
    Choice scratch(R);
    for (long t = begin; t < end; t++) choose_top(sp + t * R, R, k, scratch, ip + t * k);
  });
  // Each task sums a fixed run of CHUNK chosen rows of one token over all columns, so every row streams whole and
  // in ascending order; the runs' partial sums are then added in order. The sums depend on CHUNK only, not on the
  // threads or on the other tokens. (Slicing the columns between threads instead read each row in halves and
  // reached half of thin_linear's bandwidth on a 2-core EPYC: 199 us against 107 for a layer's 1,536 rows.)
  const long per_token = k * m, runs = (per_token + CHUNK - 1) / CHUNK;
  at::Tensor partial = at::empty({T, runs, H}, a.options());
  const float* ap = a.data_ptr<float>();
  const float* rp = rows.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, T * runs, 1, [&](long begin, long end) {
    for (long task = begin; task < end; task++) {
      const long t = task / runs, first = (task % runs) * CHUNK, last = std::min(first + CHUNK, per_token);
      const long* chosen = ip + t * k;
      auto neuron = [&](long r) { return chosen[r / m] * m + r % m; };
      float* y = pp + task * H;
      std::fill(y, y + H, 0.f);
      const long ahead_end = std::min(last + AHEAD, per_token);  // into the next run: mostly this thread's next task
      if (task == begin)
        for (long r = first; r < std::min(first + AHEAD, ahead_end); r++) prefetch_row(rp + neuron(r) * H, H);
      long r = first;
      for (; r + 4 <= last; r += 4) {
        for (long j = r + AHEAD; j < std::min(r + AHEAD + 4, ahead_end); j++)  // later rows, while these are summed
          prefetch_row(rp + neuron(j) * H, H);
        const long n0 = neuron(r), n1 = neuron(r + 1), n2 = neuron(r + 2), n3 = neuron(r + 3);
        axpy4(y, H, ap + t * N, n0, n1, n2, n3, rp);
      }
      for (; r < last; r++) axpy(y, ap[t * N + neuron(r)], rp + neuron(r) * H, H);
    }
  });
  at::Tensor out = at::empty({T, H}, a.options());
  float* op = out.data_ptr<float>();
  for (long t = 0; t < T; t++) {
    float* y = op + t * H;
    std::copy(pp + t * runs * H, pp + t * runs * H + H, y);
    for (long c = 1; c < runs; c++)
      for (long h = 0; h < H; h++) y[h] += pp[(t * runs + c) * H + h];
  }
  return {out, idx};
}

TORCH_LIBRARY_FRAGMENT(dscompile, m) {
  m.def("top_weighted_rows(Tensor scores, Tensor a, Tensor rows, int k) -> (Tensor, Tensor)");
  m.def("top_mask(Tensor scores, int k) -> Tensor");
}
TORCH_LIBRARY_IMPL(dscompile, CPU, m) {
  m.impl("top_weighted_rows", top_weighted_rows);
  m.impl("top_mask", top_mask);
}
