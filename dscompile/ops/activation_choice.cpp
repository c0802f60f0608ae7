// The choice of a MoE routed by its experts' activations (moe_ops, router="activation"): each token's top k experts
// by score, found by selection (std::nth_element; ties go to the lowest expert ids), the same in both ops below.
//
// dscompile::top_weighted_rows (decode, few tokens): the choice and the sum of the chosen neurons' rows weighted by
// their activations. Every routed neuron's activation is known before the choice; what remains is the chosen
// neurons' down rows. In Inductor, topk alone took 80 us a layer (768 of 1536), and the indexed reduction over the
// chosen rows walked them column by column (half the dense decode speed on SmolLM2). Here a token's experts are
// listed in ascending order (so their rows stream forward and later ones are prefetched), and each task takes a
// token and a slice of the output's columns: a row's bytes are read once, and a token's sums depend on nothing but
// the token, whatever the other tokens and the threads.
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
#include <tuple>
#include <vector>

#include "vector.h"

constexpr long AHEAD = 8;  // experts prefetched ahead of the one being summed

namespace {

// chosen[0..k) = the k experts with the largest scores s[0..R), in ascending order; sorted is R floats of scratch.
void choose_top(const float* s, long R, long k, std::vector<float>& sorted, long* chosen) {
  std::copy(s, s + R, sorted.begin());
  std::nth_element(sorted.begin(), sorted.begin() + (R - k), sorted.end());
  const float kth = sorted[R - k];
  long ties = k - std::count_if(s, s + R, [kth](float v) { return v > kth; });
  for (long e = 0, n = 0; e < R && n < k; e++)
    if (s[e] > kth || (s[e] == kth && ties-- > 0)) chosen[n++] = e;
}

void check_scores(const at::Tensor& scores, int64_t k, const char* op) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat && scores.device().is_cpu(), op,
              ": scores must be a float32 CPU matrix [tokens, experts]");
  TORCH_CHECK(k >= 1 && k <= scores.size(1), op, ": k must be in [1, ", scores.size(1), "], got ", k);
}

}  // namespace

at::Tensor top_mask(const at::Tensor& scores_, int64_t k) {
  check_scores(scores_, k, "top_mask");
  const at::Tensor scores = scores_.contiguous();
  const long T = scores.size(0), R = scores.size(1);
  at::Tensor mask = at::zeros({T, R}, scores.options());
  const float* sp = scores.data_ptr<float>();
  float* mp = mask.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](long begin, long end) {
    std::vector<float> sorted(R);
    std::vector<long> chosen(k);
    for (long t = begin; t < end; t++) {
      choose_top(sp + t * R, R, k, sorted, chosen.data());
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
  at::Tensor out = at::empty({T, H}, a.options());
  const float* sp = scores.data_ptr<float>();
  long* ip = idx.data_ptr<long>();
  at::parallel_for(0, T, 1, [&](long begin, long end) {
    std::vector<float> sorted(R);
    for (long t = begin; t < end; t++) choose_top(sp + t * R, R, k, sorted, ip + t * k);
  });
  // Column slices per token: enough tasks for every thread, in whole vectors.
  const long per_token = std::max(1L, at::get_num_threads() / std::max(1L, T));
  const long slice = std::max(1L, (H / per_token + VW - 1) / VW) * VW, slices = (H + slice - 1) / slice;
  const float* ap = a.data_ptr<float>();
  const float* rp = rows.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T * slices, 1, [&](long begin, long end) {
    for (long task = begin; task < end; task++) {
      const long t = task / slices, h = (task % slices) * slice, n = std::min(slice, H - h);
      const long* chosen = ip + t * k;
      float* y = op + t * H + h;
      std::fill(y, y + n, 0.f);
      for (long j = 0; j < k; j++) {
        if (j + AHEAD < k) {  // a later expert's rows, while this one's are summed
          const float* next = rp + chosen[j + AHEAD] * m * H + h;
          for (long i = 0; i < m; i++)
            for (long c = 0; c < n; c += 16) __builtin_prefetch(next + i * H + c, 0, 3);
        }
        const long e = chosen[j];
        for (long i = 0; i < m; i++) axpy(y, ap[t * N + e * m + i], rp + (e * m + i) * H + h, n);
      }
    }
  });
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
