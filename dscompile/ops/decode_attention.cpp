// dscompile::decode_attention: softmax(scale * q k^T + mask) v for the few queries of a decode step.
//
// The CPU flash-attention kernel blocks for long query sequences; a decode step has one query per sequence (or the
// handful being verified) against the whole cache, so it is bound by reading K and V. Here every (sequence, KV head,
// slice of the cache) is one task: the queries of all heads sharing that KV head are scored together, so each
// cached key and value is read once, and slots the mask excludes (the unfilled end of a static cache) are not read
// at all. Slices are merged with the usual max/sum rescaling (flash-decoding), so long caches use every thread.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "vector.h"

namespace {

constexpr float MASKED = -1e30f;  // an additive mask at or below this excludes the slot (the runtime uses finfo.min)
constexpr long SLICE = 128;       // cache slots per task at least, when a cache is split over threads

// exp(x) for a vector (Cephes' single-precision polynomial, within 2 ulp); -inf gives 0.
inline vec vexp(vec x) {
  const vec excluded = x == -std::numeric_limits<float>::infinity() ? vec{} + 1.f : vec{};
  x = x < -87.3365f ? vec{} - 87.3365f : x;
  x = x > 88.3763f ? vec{} + 88.3763f : x;
  const vec y = x * 1.44269504088896341f + 0.5f;
  vec n = __builtin_convertvector(__builtin_convertvector(y, ivec), vec);
  n = n > y ? n - 1.f : n;  // floor
  const vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = vec{} + 1.9875691500E-4f;
  p = madd(p, r, vec{} + 1.3981999507E-3f);
  p = madd(p, r, vec{} + 8.3334519073E-3f);
  p = madd(p, r, vec{} + 4.1665795894E-2f);
  p = madd(p, r, vec{} + 1.6666665459E-1f);
  p = madd(p, r, vec{} + 5.0000001201E-1f);
  p = p * r * r + r + 1.f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  const vec out = p * scale;
  return excluded != 0.f ? vec{} : out;
}

// sum over i of exp(s[i] - best), each s[i] replaced by its exp (in place); -inf entries become 0.
inline float exp_sum(float* s, long n, float best) {
  vec total = {};
  long i = 0;
  for (; i + VW <= n; i += VW) {
    const vec e = vexp(load(s + i) - best);
    store(s + i, e);
    total += e;
  }
  float sum = lane_sum(total);
  for (; i < n; i++) {
    s[i] = std::exp(s[i] - best);
    sum += s[i];
  }
  return sum;
}

#if defined(__AVX512F__)
// The lane sums of eight vectors at once, each summed in lane_sum's order (so a slot scores the same whether it is
// scored in a group or alone): half the shuffles of eight lane_sums.
inline void lane_sums8(const vec* a, float* out) {
  vec h[4], s[2];
  for (int p = 0; p < 4; p++)  // a[i] + a[i + 8] of two vectors, side by side
    h[p] = __builtin_shufflevector(a[2 * p], a[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * p], a[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  for (int p = 0; p < 2; p++)  // then h[i] + h[i + 4], four vectors side by side
    s[p] = __builtin_shufflevector(h[2 * p], h[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(h[2 * p], h[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  // then (s0 + s2) and (s1 + s3) of all eight, then their sum
  const vec t = __builtin_shufflevector(s[0], s[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                __builtin_shufflevector(s[0], s[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  const vec r = __builtin_shufflevector(t, t, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
                __builtin_shufflevector(t, t, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int j = 0; j < 8; j++) out[j] = r[j];
}
#endif

constexpr int SLOTS = 8;  // cache slots scored at once: independent accumulators hide the FMA latency

// scores[j] = q . k[j] for SLOTS consecutive slots (key rows ks floats apart), d floats each.
inline void dots(const float* q, const float* k, long ks, long d, float* scores) {
  vec acc[SLOTS] = {};
  long i = 0;
  for (; i + VW <= d; i += VW) {
    const vec qv = load(q + i);
    for (int j = 0; j < SLOTS; j++) acc[j] = madd(qv, load(k + j * ks + i), acc[j]);
  }
#if defined(__AVX512F__)
  lane_sums8(acc, scores);
#else
  for (int j = 0; j < SLOTS; j++) scores[j] = lane_sum(acc[j]);
#endif
  for (int j = 0; j < SLOTS; j++)
    for (long t = i; t < d; t++) scores[j] += q[t] * k[j * ks + t];
}


inline float dot(const float* a, const float* b, long n) {
  vec acc = {};
  long i = 0;
  for (; i + VW <= n; i += VW) acc = madd(load(a + i), load(b + i), acc);
  float s = lane_sum(acc);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

// out[r][0:d] += sum over slots s of p[r][s] * v[s] for the RB rows r of a block (their probabilities lds floats
// apart, their outputs d apart): each value row is loaded once for the whole block, and each row accumulates in slot
// order whatever the block, so a query's output does not depend on how many queries the step has.
template <int RB>
inline void weighted_sums(const float* p, long lds, long slots, const float* v, long vs, long d, float* out) {
  long i = 0;
  for (; i + 4 * VW <= d; i += 4 * VW) {
    vec acc[RB][4];
    for (int r = 0; r < RB; r++)
      for (int j = 0; j < 4; j++) acc[r][j] = load(out + r * d + i + j * VW);
    for (long s = 0; s < slots; s++) {
      bool any = false;
      for (int r = 0; r < RB; r++) any |= p[r * lds + s] != 0.f;
      if (!any) continue;  // masked for every row: the unfilled end of a static cache, other rows' drafts
      const float* row = v + s * vs + i;
      const vec x[4] = {load(row), load(row + VW), load(row + 2 * VW), load(row + 3 * VW)};
      for (int r = 0; r < RB; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = madd(p[r * lds + s], x[j], acc[r][j]);
    }
    for (int r = 0; r < RB; r++)
      for (int j = 0; j < 4; j++) store(out + r * d + i + j * VW, acc[r][j]);
  }
  for (int r = 0; r < RB; r++) {
    const float* pr = p + r * lds;
    float* o = out + r * d;
    long j = i;
    for (; j + VW <= d; j += VW) {
      vec acc = load(o + j);
      for (long s = 0; s < slots; s++) acc = madd(pr[s], load(v + s * vs + j), acc);
      store(o + j, acc);
    }
    for (; j < d; j++) {
      float acc = o[j];
      for (long s = 0; s < slots; s++) acc += pr[s] * v[s * vs + j];
      o[j] = acc;
    }
  }
}

constexpr int ROW_BLOCK = VW == 16 ? 6 : 2;  // rows per block: 4 x ROW_BLOCK accumulators and 4 value vectors

// weighted_sums for all rows, ROW_BLOCK at a time.
inline void all_weighted_sums(const float* p, long lds, long rows, long slots, const float* v, long vs, long d,
                              float* out) {
  long r = 0;
  for (; r + ROW_BLOCK <= rows; r += ROW_BLOCK)
    weighted_sums<ROW_BLOCK>(p + r * lds, lds, slots, v, vs, d, out + r * d);
  for (; r < rows; r++) weighted_sums<1>(p + r * lds, lds, slots, v, vs, d, out + r * d);
}

// s[i] = scale * s[i] + mask[i] over n scores, or -inf where the mask excludes the slot; returns their maximum.
inline float scale_and_mask(float* s, const float* mask, long n, float scale) {
  const float inf = std::numeric_limits<float>::infinity();
  vec best = vec{} - inf;
  long i = 0;
  for (; i + VW <= n; i += VW) {
    vec x = scale * load(s + i);
    if (mask) {
      const vec m = load(mask + i);
      x = m <= MASKED ? vec{} - inf : x + m;
    }
    store(s + i, x);
    best = best > x ? best : x;
  }
  float top = -inf;
  for (int j = 0; j < VW; j++) top = std::max(top, best[j]);
  for (; i < n; i++) {
    const float add = mask ? mask[i] : 0.f;
    s[i] = add <= MASKED ? -inf : scale * s[i] + add;
    top = std::max(top, s[i]);
  }
  return top;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                            const std::optional<at::Tensor>& mask_, double scale_) {
  TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4, "decode_attention: q, k, v must be 4-d");
  TORCH_CHECK(q_.scalar_type() == at::kFloat && k_.scalar_type() == at::kFloat && v_.scalar_type() == at::kFloat,
              "decode_attention: float32 only");
  auto inner = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  const at::Tensor q = inner(q_), k = inner(k_), v = inner(v_);
  const long B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const long Hk = k.size(1), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hk && v.size(2) == S && k.size(3) == D,
              "decode_attention: k [B, Hk, S, D] and v [B, Hk, S, Dv] must match q [B, H, T, D]");
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "decode_attention: query heads must be a multiple of KV heads");
  const long G = H / Hk, R = G * T;  // query rows per task: every head of the group, every query
  at::Tensor mask;
  long mb = 0, mh = 0, mt = 0;
  if (mask_.has_value()) {
    mask = inner(*mask_);
    TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.dim() == 4 && mask.size(-1) == S,
                "decode_attention: the mask must be float32 [B|1, H|1, T|1, S]");
    mb = mask.size(0) == 1 ? 0 : mask.stride(0);
    mh = mask.size(1) == 1 ? 0 : mask.stride(1);
    mt = mask.size(2) == 1 ? 0 : mask.stride(2);
  }
  const float scale = static_cast<float>(scale_);
  const long splits = std::max(1L, std::min((S + SLICE - 1) / SLICE,
                                            (2L * at::get_num_threads() + B * Hk - 1) / (B * Hk)));
  const long slice = (S + splits - 1) / splits;
  // Per task and row: the slice's max score, its sum of exp(score - max), and the weighted values.
  std::vector<float> row_max(B * Hk * splits * R), row_sum(B * Hk * splits * R), acc(B * Hk * splits * R * Dv);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* mp = mask.defined() ? mask.data_ptr<float>() : nullptr;

  at::parallel_for(0, B * Hk * splits, 1, [&](long begin, long end) {
    std::vector<float> scores(R * slice);
    for (long task = begin; task < end; task++) {
      const long b = task / (Hk * splits), hk = (task / splits) % Hk, part = task % splits;
      const long s0 = part * slice, s1 = std::min(S, s0 + slice);
      const float* kb = kp + b * k.stride(0) + hk * k.stride(1);
      const float* vb = vp + b * v.stride(0) + hk * v.stride(1);
      float* m_out = row_max.data() + task * R;
      float* l_out = row_sum.data() + task * R;
      float* a_out = acc.data() + task * R * Dv;
      std::fill(a_out, a_out + R * Dv, 0.f);
      for (long r = 0; r < R; r++) {
        const long h = hk * G + r / T, t = r % T;
        const float* qr = qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
        const float* mr = mp ? mp + b * mb + h * mh + t * mt : nullptr;
        float* sr = scores.data() + r * slice;
        for (long s = s0; s < s1; s += SLOTS) {
          const long n = std::min<long>(SLOTS, s1 - s);
          bool any = !mr;
          for (long j = 0; j < n && !any; j++) any = mr[s + j] > MASKED;
          if (any && n == SLOTS) dots(qr, kb + s * k.stride(2), k.stride(2), D, sr + s - s0);
          else if (any)
            for (long j = 0; j < n; j++) sr[s - s0 + j] = dot(qr, kb + (s + j) * k.stride(2), D);
        }
        const float best = scale_and_mask(sr, mr ? mr + s0 : nullptr, s1 - s0, scale);
        float total = 0.f;
        if (best > -std::numeric_limits<float>::infinity()) total = exp_sum(sr, s1 - s0, best);
        else std::fill(sr, sr + (s1 - s0), 0.f);
        m_out[r] = best;
        l_out[r] = total;
      }
      all_weighted_sums(scores.data(), slice, R, s1 - s0, vb + s0 * v.stride(2), v.stride(2), Dv, a_out);
    }
  });

  at::Tensor out = at::empty({B, T, H, Dv}, q.options());  // the layout of the CPU flash kernel's output
  float* op = out.data_ptr<float>();
  for (long b = 0; b < B; b++) {
    for (long hk = 0; hk < Hk; hk++) {
      for (long r = 0; r < R; r++) {
        const long h = hk * G + r / T, t = r % T;
        float best = -std::numeric_limits<float>::infinity();
        for (long part = 0; part < splits; part++) best = std::max(best, row_max[((b * Hk + hk) * splits + part) * R + r]);
        float* o = op + ((b * T + t) * H + h) * Dv;
        std::fill(o, o + Dv, 0.f);
        if (best == -std::numeric_limits<float>::infinity()) {
          // Every slot excluded: an additive mask of finfo.min everywhere leaves equal scores, so SDPA averages v.
          for (long s = 0; s < S; s++) axpy(o, 1.f / S, vp + b * v.stride(0) + hk * v.stride(1) + s * v.stride(2), Dv);
          continue;
        }
        float total = 0.f;
        for (long part = 0; part < splits; part++) {
          const long task = (b * Hk + hk) * splits + part;
          const float w = row_sum[task * R + r] == 0.f ? 0.f : std::exp(row_max[task * R + r] - best);
          total += w * row_sum[task * R + r];
          if (w != 0.f) axpy(o, w, acc.data() + (task * R + r) * Dv, Dv);
        }
        const float inv = 1.f / total;
        for (long d = 0; d < Dv; d++) o[d] *= inv;
      }
    }
  }
  return out.permute({0, 2, 1, 3});
}

TORCH_LIBRARY_FRAGMENT(dscompile, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(dscompile, CPU, m) { m.impl("decode_attention", decode_attention); }
