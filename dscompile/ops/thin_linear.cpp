// dscompile::thin_linear: y = x @ w.T (+ b) for the few rows of a decode step, streaming each weight row once.
//
// A decode step multiplies a handful of rows (one per sequence, or the tokens being verified) by every weight
// matrix, so it is bound by how fast the weights stream from memory. BLAS libraries block such products like
// large ones, repack the weights, and read them at half the bandwidth or less once there are several rows. Here
// each thread walks its share of weight rows in order, ROWS at a time, keeps them in registers while every input
// row (held in L1) is multiplied in, and prefetches the rows it reads next.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "thin_rows.h"

constexpr long GRAIN = 16;  // weight-row blocks per parallel task

namespace {

// One weight's share of a call: its rows (float32, or bfloat16 when w16 is set), their stride, its bias and output.
struct Product {
  const float* w;
  const bf16* w16;
  long N, ldw;
  const float* bias;
  float* y;
  long first_block;  // index of its first ROWS-row block among all the call's blocks
};

// Every input row against the product's weight rows n .. n + R - 1, in the weights' own dtype.
template <int R>
void product_rows(const Product& pr, const float* x, long ldx, long M, long K, long n) {
  if (pr.w16) all_rows<R>(x, ldx, M, K, pr.w16, pr.ldw, pr.y, pr.N, n, pr.bias, pr.w16 + pr.N * pr.ldw);
  else all_rows<R>(x, ldx, M, K, pr.w, pr.ldw, pr.y, pr.N, n, pr.bias, pr.w + pr.N * pr.ldw);
}

}  // namespace

// y_i = x @ w_i.T (+ b_i) for every weight of one input, in one parallel pass: the products of one activation
// (q, k and v; gate and up) share the thread start-up and the prefetcher's ramp instead of paying it each.
std::vector<at::Tensor> thin_linear_many(const at::Tensor& x_, at::TensorList ws,
                                         const c10::List<std::optional<at::Tensor>>& bs) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(),
              "thin_linear: x must be a float32 CPU matrix [M, K], got ", x_.sizes());
  TORCH_CHECK(bs.size() == 0 || bs.size() == ws.size(), "thin_linear: one bias (or None) per weight");
  const at::Tensor x = x_.stride(1) == 1 ? x_ : x_.contiguous();
  const long M = x.size(0), K = x.size(1), ldx = x.stride(0);
  std::vector<at::Tensor> weights, biases, outputs;
  std::vector<Product> products;
  long blocks = 0;
  for (size_t i = 0; i < ws.size(); i++) {
    const at::Tensor& w_ = ws[i];
    const bool half = w_.scalar_type() == at::kBFloat16;  // weights stored in bfloat16 (drafting: half the bytes)
    TORCH_CHECK(w_.dim() == 2 && w_.size(1) == K && (w_.scalar_type() == at::kFloat || half) && w_.device().is_cpu(),
                "thin_linear: expected float32 or bfloat16 CPU weights [N, ", K, "], got ", w_.sizes(), " ",
                w_.scalar_type());
    weights.push_back(w_.stride(1) == 1 ? w_ : w_.contiguous());
    const long N = weights.back().size(0);
    at::Tensor b;
    if (bs.size() > 0 && bs.get(i).has_value()) {
      b = bs.get(i)->contiguous();
      TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == N, "thin_linear: bias must be float32 [N]");
    }
    biases.push_back(b);
    outputs.push_back(at::empty({M, N}, x.options()));
    const at::Tensor& wt = weights.back();
    products.push_back({half ? nullptr : wt.data_ptr<float>(),
                        half ? reinterpret_cast<const bf16*>(wt.data_ptr<at::BFloat16>()) : nullptr, N, wt.stride(0),
                        b.defined() ? b.data_ptr<float>() : nullptr, outputs.back().data_ptr<float>(), blocks});
    blocks += N / ROWS;
  }
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, blocks, GRAIN, [&](long begin, long end) {
    size_t p = 0;
    for (long i = begin; i < end; i++) {
      while (i >= products[p].first_block + products[p].N / ROWS) p++;
      product_rows<ROWS>(products[p], xp, ldx, M, K, (i - products[p].first_block) * ROWS);
    }
  });
  for (const Product& pr : products)  // rows left over from the blocks
    for (long n = pr.N / ROWS * ROWS; n < pr.N; n++) product_rows<1>(pr, xp, ldx, M, K, n);
  return outputs;
}

at::Tensor thin_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  c10::List<std::optional<at::Tensor>> bs;
  bs.push_back(b);
  return thin_linear_many(x, {w}, bs)[0];
}

TORCH_LIBRARY(dscompile, m) {
  m.def("thin_linear(Tensor x, Tensor w, Tensor? b=None) -> Tensor");
  m.def("thin_linear_many(Tensor x, Tensor[] ws, Tensor?[] bs) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(dscompile, CPU, m) {
  m.impl("thin_linear", thin_linear);
  m.impl("thin_linear_many", thin_linear_many);
}
