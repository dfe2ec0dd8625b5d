// One query per head attending over a float32 KV cache: the attention of a CPU decode step.
//
// torch runs this as two batched matmuls and a softmax, ~100 us per layer for SmolLM2's or Gemma 3's cache
// of ~600 positions, about twice the time it takes to read the cache. Here each task reads a span of keys
// and values once (all query heads of a KV head share them), keeps a running max and sum (the
// online-softmax form), and the spans are merged at the end; spans split the keys so both threads work
// even with a single KV head. Built at run time by tinytitan.models.attention_kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // independent partial sums: the compiler keeps them in one vector register
constexpr int64_t kMaxGroup = 16;

struct Partial {
  float* m;    // [g] max score over the span's visible keys (-FLT_MAX when none)
  float* l;    // [g] sum of exp(score - m)
  float* acc;  // [g, d] sum of exp(score - m) * value
};

// q [g, d]; k, v: rows t0..t1 of one KV head, `stride` floats apart; kpos null or positions (< 0: empty)
void attend_span(const float* q, int64_t g, int64_t d, const float* k, const float* v, int64_t stride,
                 const int64_t* kpos, int64_t t0, int64_t t1, Partial out) {
  const int64_t n = t1 - t0;
  std::vector<float> p(static_cast<size_t>(g * n));
  std::vector<char> visible(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    visible[t] = kpos == nullptr || kpos[t0 + t] >= 0;
    const float* kr = k + (t0 + t) * stride;
    for (int64_t j = 0; j < g; ++j) {
      const float* qj = q + j * d;
      float lane[kLanes] = {0};
      for (int64_t c = 0; c < d; c += kLanes)
        for (int64_t i = 0; i < kLanes; ++i) lane[i] += qj[c + i] * kr[c + i];
      float dot = 0;
      for (int64_t i = 0; i < kLanes; ++i) dot += lane[i];
      p[j * n + t] = dot;
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    float* pj = p.data() + j * n;
    float m = -FLT_MAX;
    for (int64_t t = 0; t < n; ++t)
      if (visible[t]) m = std::max(m, pj[t]);
    float l = 0;
    for (int64_t t = 0; t < n; ++t) {
      pj[t] = visible[t] ? std::exp(pj[t] - m) : 0.f;
      l += pj[t];
    }
    out.m[j] = m;
    out.l[j] = l;
  }
  std::fill(out.acc, out.acc + g * d, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const float* vr = v + (t0 + t) * stride;
    for (int64_t j = 0; j < g; ++j) {
      const float w = p[j * n + t];
      float* aj = out.acc + j * d;
      for (int64_t c = 0; c < d; ++c) aj[c] += w * vr[c];
    }
  }
}

// q [B, KV, G, D] (already scaled), k/v [B, KV, S, D] (unit stride in D, equal strides), kpos [S]
// (read when padded: empty ring slots hold -1) -> [B, KV, G, D]
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& kpos, bool padded) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be 4-d");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "decode_attention: float32 only");
  const int64_t b = q.size(0), kv = q.size(1), g = q.size(2), d = q.size(3), s = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(1) == kv && k.size(3) == d && v.sizes() == k.sizes(),
              "decode_attention: shapes do not match");
  TORCH_CHECK(d % kLanes == 0 && g <= kMaxGroup && s > 0, "decode_attention: unsupported head shape");
  TORCH_CHECK(k.stride(3) == 1 && k.strides() == v.strides(), "decode_attention: unsupported layout");
  TORCH_CHECK(!padded || kpos.numel() == s, "decode_attention: kpos must have one entry per key");
  const at::Tensor qc = q.contiguous();
  const at::Tensor pos = padded ? kpos.to(at::kLong).contiguous() : at::Tensor();
  const int64_t heads = b * kv;
  const int64_t threads = at::get_num_threads();
  // at least two spans per thread over all heads, none shorter than 64 keys
  int64_t spans = std::max<int64_t>(1, std::min<int64_t>((2 * threads + heads - 1) / heads, s / 64));
  const int64_t per = (s + spans - 1) / spans;
  spans = (s + per - 1) / per;
  const int64_t tasks = heads * spans;
  std::vector<float> ms(tasks * g), ls(tasks * g), accs(tasks * g * d);
  const float* qd = qc.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  const int64_t* pd = padded ? pos.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t head = i / spans, bi = head / kv, h = head % kv;
      const int64_t t0 = (i % spans) * per, t1 = std::min(s, t0 + per);
      attend_span(qd + head * g * d, g, d, kd + bi * k.stride(0) + h * k.stride(1),
                  vd + bi * v.stride(0) + h * v.stride(1), k.stride(2), pd, t0, t1,
                  Partial{&ms[i * g], &ls[i * g], &accs[i * g * d]});
    }
  });
  at::Tensor out = at::empty({b, kv, g, d}, q.options());
  float* od = out.data_ptr<float>();
  for (int64_t head = 0; head < heads; ++head) {
    for (int64_t j = 0; j < g; ++j) {
      float m = -FLT_MAX;
      for (int64_t r = 0; r < spans; ++r) {
        const int64_t i = head * spans + r;
        if (ls[i * g + j] > 0) m = std::max(m, ms[i * g + j]);
      }
      float* o = od + (head * g + j) * d;
      std::fill(o, o + d, 0.f);
      float l = 0;
      for (int64_t r = 0; r < spans; ++r) {
        const int64_t i = head * spans + r;
        if (!(ls[i * g + j] > 0)) continue;  // a span of empty slots only
        const float w = std::exp(ms[i * g + j] - m);
        l += w * ls[i * g + j];
        const float* a = &accs[(i * g + j) * d];
        for (int64_t c = 0; c < d; ++c) o[c] += w * a[c];
      }
      const float inv = l > 0 ? 1.f / l : 0.f;
      for (int64_t c = 0; c < d; ++c) o[c] *= inv;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(tinytitan, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor kpos, bool padded) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinytitan, CPU, m) { m.impl("decode_attention", &decode_attention); }
