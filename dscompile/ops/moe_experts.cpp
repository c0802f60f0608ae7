// dscompile::moe_experts: for each token, the sum over its chosen experts of down_e^T (act(gate_e x) * up_e x).
//
// A carved FFN's routed experts are blocks [R, m, hidden] of gate, up and down rows. At decode only the chosen
// experts' blocks need reading, and a block chosen by several tokens of the step is read once for all of them:
// each chosen expert is one task, its tokens' rows are multiplied in while its rows stream (the thin-product loops
// of thin_rows.h), and every thread adds its experts' outputs into its own buffer, summed at the end. With every
// expert chosen this is the dense FFN.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "thin_rows.h"

namespace {

enum class Activation { silu, gelu, gelu_tanh, relu };

Activation parse(const std::string& name) {
  if (name == "silu") return Activation::silu;
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_tanh") return Activation::gelu_tanh;
  if (name == "relu") return Activation::relu;
  TORCH_CHECK(false, "moe_experts: unknown activation '", name, "' (silu, gelu, gelu_tanh, relu)");
}

inline float activate(Activation f, float v) {
  switch (f) {
    case Activation::silu: return v / (1.f + std::exp(-v));
    case Activation::gelu: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case Activation::gelu_tanh: return 0.5f * v * (1.f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case Activation::relu: return v > 0.f ? v : 0.f;
  }
  return v;
}

// y [n, rows] = x [n, K] @ w[rows, K]^T (+ bias), w a block of an expert.
void product(const float* x, long n, long K, const float* w, long rows, const float* bias, float* y) {
  const float* end = w + rows * K;
  long r = 0;
  for (; r + ROWS <= rows; r += ROWS) all_rows<ROWS>(x, K, n, K, w, K, y, rows, r, bias, end);
  for (; r < rows; r++) all_rows<1>(x, K, n, K, w, K, y, rows, r, bias, end);
}

// Announce the start of a block the thread reads next (the in-block prefetch stops at each block's end).
void prefetch_start(const float* block, long floats) {
  for (long i = 0; i < floats; i += 64 / sizeof(float)) __builtin_prefetch(block + i, 0, 2);
}

constexpr long NEXT = 16384 / sizeof(float);  // how much of the next expert's blocks to announce

const float* maybe(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

}  // namespace

at::Tensor moe_experts(const at::Tensor& x_, const at::Tensor& idx_, const std::optional<at::Tensor>& gate_,
                       const at::Tensor& up_, const at::Tensor& down_, const std::optional<at::Tensor>& gate_bias_,
                       const std::optional<at::Tensor>& up_bias_, c10::string_view activation) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(),
              "moe_experts: x must be a float32 CPU matrix [tokens, hidden]");
  TORCH_CHECK(idx_.dim() == 2 && idx_.size(0) == x_.size(0), "moe_experts: idx must be [tokens, top_k]");
  TORCH_CHECK(up_.dim() == 3 && down_.sizes() == up_.sizes() && up_.size(2) == x_.size(1) &&
                  (!gate_.has_value() || gate_->sizes() == up_.sizes()),
              "moe_experts: gate, up and down must be [experts, width, hidden] with the input's hidden size");
  const Activation act = parse(std::string(activation));
  const at::Tensor x = x_.contiguous(), idx = idx_.to(at::kLong).contiguous();
  const at::Tensor up = up_.contiguous(), down = down_.contiguous();
  std::optional<at::Tensor> gate, gate_bias, up_bias;
  if (gate_.has_value()) gate = gate_->contiguous();
  if (gate_bias_.has_value()) gate_bias = gate_bias_->contiguous();
  if (up_bias_.has_value()) up_bias = up_bias_->contiguous();
  for (const auto* t : {&up, &down})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "moe_experts: float32 weights only");
  const long T = x.size(0), H = x.size(1), E = up.size(0), m = up.size(1), k = idx.size(1);

  // The tokens of each chosen expert, in token order.
  std::vector<std::vector<long>> tokens(E);
  const long* ip = idx.data_ptr<long>();
  for (long t = 0; t < T; t++)
    for (long j = 0; j < k; j++) {
      const long e = ip[t * k + j];
      TORCH_CHECK(e >= 0 && e < E, "moe_experts: expert index ", e, " out of range [0, ", E, ")");
      if (tokens[e].empty() || tokens[e].back() != t) tokens[e].push_back(t);
    }
  std::vector<long> chosen;
  for (long e = 0; e < E; e++)
    if (!tokens[e].empty()) chosen.push_back(e);

  const int threads = at::get_num_threads();
  at::Tensor partial = at::zeros({threads, T, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* upp = up.data_ptr<float>();
  const float* downp = down.data_ptr<float>();
  const float* gatep = maybe(gate);
  const float* gbp = maybe(gate_bias);
  const float* ubp = maybe(up_bias);
  float* pp = partial.data_ptr<float>();

  at::parallel_for(0, static_cast<long>(chosen.size()), 1, [&](long begin, long end) {
    float* mine = pp + at::get_thread_num() * T * H;
    std::vector<float> rows, u, g;
    for (long c = begin; c < end; c++) {
      const long e = chosen[c];
      if (c + 1 < end) {
        const long next = chosen[c + 1] * m * H, size = std::min(NEXT, m * H);
        prefetch_start(upp + next, size);
        prefetch_start(downp + next, size);
        if (gatep) prefetch_start(gatep + next, size);
      }
      const std::vector<long>& ts = tokens[e];
      const long n = static_cast<long>(ts.size());
      rows.resize(n * H);
      for (long i = 0; i < n; i++) std::copy(xp + ts[i] * H, xp + (ts[i] + 1) * H, rows.data() + i * H);
      u.resize(n * m);
      product(rows.data(), n, H, upp + e * m * H, m, ubp ? ubp + e * m : nullptr, u.data());
      if (gatep) {
        g.resize(n * m);
        product(rows.data(), n, H, gatep + e * m * H, m, gbp ? gbp + e * m : nullptr, g.data());
        for (long i = 0; i < n * m; i++) u[i] *= activate(act, g[i]);
      } else {
        for (long i = 0; i < n * m; i++) u[i] = activate(act, u[i]);
      }
      const float* de = downp + e * m * H;
      for (long j = 0; j < m; j++)  // each down row read once, for every token of the expert
        for (long i = 0; i < n; i++) axpy(mine + ts[i] * H, u[i * m + j], de + j * H, H);
    }
  });
  at::Tensor out = partial[0].clone();
  for (int t = 1; t < threads; t++) out.add_(partial[t]);
  return out;
}

TORCH_LIBRARY_FRAGMENT(dscompile, m) {
  m.def("moe_experts(Tensor x, Tensor idx, Tensor? gate, Tensor up, Tensor down, Tensor? gate_bias, "
        "Tensor? up_bias, str activation) -> Tensor");
}
TORCH_LIBRARY_IMPL(dscompile, CPU, m) { m.impl("moe_experts", moe_experts); }
