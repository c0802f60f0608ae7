// dscompile::weighted_rows: y[t] = sum over j of a[t, j] * rows[idx[t, j]], for the few tokens of a decode step.
//
// A MoE routed by its experts' activations (moe_ops, router="activation") has every routed neuron's activation
// before it chooses; what remains is the chosen neurons' down rows, weighted by their activations. Gathering them
// with Inductor's indexed reduction walked the rows column by column (SmolLM2, 768 of 1536 neurons: half the dense
// decode speed). Here each task takes a token and a slice of the output's columns and streams every chosen row's
// slice in order, so a row's bytes are read once and a token's sums do not depend on the other tokens or the threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "vector.h"

at::Tensor weighted_rows(const at::Tensor& a_, const at::Tensor& idx_, const at::Tensor& rows_) {
  TORCH_CHECK(a_.dim() == 2 && a_.scalar_type() == at::kFloat && a_.device().is_cpu(),
              "weighted_rows: a must be a float32 CPU matrix [tokens, k]");
  TORCH_CHECK(idx_.sizes() == a_.sizes(), "weighted_rows: idx must be [tokens, k] like a");
  TORCH_CHECK(rows_.dim() == 2 && rows_.scalar_type() == at::kFloat && rows_.device().is_cpu(),
              "weighted_rows: rows must be a float32 CPU matrix [n, hidden]");
  const at::Tensor a = a_.contiguous(), idx = idx_.to(at::kLong).contiguous(), rows = rows_.contiguous();
  const long T = a.size(0), k = a.size(1), N = rows.size(0), H = rows.size(1);
  const long* ip = idx.data_ptr<long>();
  for (long i = 0; i < T * k; i++)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "weighted_rows: row index ", ip[i], " out of range [0, ", N, ")");
  at::Tensor out = at::empty({T, H}, a.options());
  // Column slices per token: enough tasks for every thread, in whole vectors.
  const long per_token = std::max(1L, at::get_num_threads() / std::max(1L, T));
  const long slice = std::max(1L, (H / per_token + VW - 1) / VW) * VW, slices = (H + slice - 1) / slice;
  const float* ap = a.data_ptr<float>();
  const float* rp = rows.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T * slices, 1, [&](long begin, long end) {
    for (long task = begin; task < end; task++) {
      const long t = task / slices, h = (task % slices) * slice, n = std::min(slice, H - h);
      float* y = op + t * H + h;
      std::fill(y, y + n, 0.f);
      for (long j = 0; j < k; j++) axpy(y, ap[t * k + j], rp + ip[t * k + j] * H + h, n);
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(dscompile, m) { m.def("weighted_rows(Tensor a, Tensor idx, Tensor rows) -> Tensor"); }
TORCH_LIBRARY_IMPL(dscompile, CPU, m) { m.impl("weighted_rows", weighted_rows); }
