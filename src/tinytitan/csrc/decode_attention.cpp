// One query per head attending over a float32 or float16 KV cache: the attention of a CPU decode step.
//
// torch runs this as two batched matmuls and a softmax, ~100 us per layer for SmolLM2's or Gemma 3's cache
// of ~600 positions, about twice the time it takes to read the cache. Here each task reads a span of keys
// and values once (all query heads of a KV head share them), keeps a running max and sum (the
// online-softmax form), and the spans are merged at the end; spans split the keys so both threads work
// even with a single KV head. A float16 cache (half the bytes to read) is widened to float32 one row at a
// time. Built at run time by tinytitan.models.attention_kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;  // independent partial sums: the compiler keeps them in one vector register
constexpr int64_t kSpan = 128;  // keys per task (see decode_attention)
constexpr int64_t kMaxGroup = 16;

struct Partial {
  float* m;    // [g] max score over the span's visible keys (-FLT_MAX when none)
  float* l;    // [g] sum of exp(score - m)
  float* acc;  // [g, d] sum of exp(score - m) * value
};

#if !defined(__AVX512F__)
// d float16 values widened to float32 (d is a multiple of 16)
inline void widen(const at::Half* src, float* dst, int64_t d) {
#if defined(__F16C__)
  for (int64_t c = 0; c < d; c += 8)
    _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c))));
#else
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<float>(src[c]);
#endif
}

// Row t of a cache as float32: the row itself, or its float16 values widened into `buf`.
template <typename T>
inline const float* row(const T* base, int64_t t, int64_t stride, int64_t d, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return base + t * stride;
  } else {
    widen(base + t * stride, buf, d);
    return buf;
  }
}
#endif

#if defined(__AVX512F__)
// Sixteen keys' or values' elements as float32.
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// Scores of JN queries (rows q, d apart) against keys t0..t0+n: p[j * n + t]. The JN dot products of a
// key are independent chains, so they overlap instead of waiting on each other.
template <int JN, typename T>
void scores_block(const float* q, int64_t d, const T* k, int64_t stride, int64_t t0, int64_t n, float* p) {
  for (int64_t t = 0; t < n; ++t) {
    const T* kr = k + (t0 + t) * stride;
    __m512 a[JN];
    for (int j = 0; j < JN; ++j) a[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < d; c += 16) {
      const __m512 kv = load16(kr + c);
      for (int j = 0; j < JN; ++j) a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * d + c), kv, a[j]);
    }
    for (int j = 0; j < JN; ++j) p[j * n + t] = _mm512_reduce_add_ps(a[j]);
  }
}

// acc[j, c0 .. c0 + 16 CN] = sum over keys of p[j * n + t] * v[t, c0 ..] for JN queries: JN x CN
// accumulators stay in registers for the whole span.
template <int JN, int CN, typename T>
void values_block(const float* p, int64_t n, const T* v, int64_t stride, int64_t t0, int64_t c0, int64_t d,
                  float* acc) {
  __m512 a[JN][CN];
  for (int j = 0; j < JN; ++j)
    for (int c = 0; c < CN; ++c) a[j][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const T* vr = v + (t0 + t) * stride + c0;
    __m512 x[CN];
    for (int c = 0; c < CN; ++c) x[c] = load16(vr + 16 * c);
    for (int j = 0; j < JN; ++j) {
      const __m512 w = _mm512_set1_ps(p[j * n + t]);
      for (int c = 0; c < CN; ++c) a[j][c] = _mm512_fmadd_ps(w, x[c], a[j][c]);
    }
  }
  for (int j = 0; j < JN; ++j)
    for (int c = 0; c < CN; ++c) _mm512_storeu_ps(acc + j * d + c0 + 16 * c, a[j][c]);
}

// f(std::integral_constant<int, m>{}) for m = min(n, 4) >= 1: a block size chosen at run time, as a
// template argument.
template <typename F>
inline void up_to_4(int64_t n, F&& f) {
  switch (std::min<int64_t>(4, n)) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

template <typename T>
void scores(const float* q, int64_t g, int64_t d, const T* k, int64_t stride, int64_t t0, int64_t n,
            float* p) {
  for (int64_t j = 0; j < g; j += 4)
    up_to_4(g - j, [&](auto jn) {
      scores_block<decltype(jn)::value>(q + j * d, d, k, stride, t0, n, p + j * n);
    });
}

template <typename T>
void values(const float* p, int64_t g, int64_t n, const T* v, int64_t stride, int64_t t0, int64_t d,
            float* acc) {
  for (int64_t j = 0; j < g; j += 4)
    up_to_4(g - j, [&](auto jn) {
      for (int64_t c = 0; c < d; c += 64)
        up_to_4((d - c) / 16, [&](auto cn) {
          constexpr int JN = decltype(jn)::value, CN = decltype(cn)::value;
          values_block<JN, CN>(p + j * n, n, v, stride, t0, c, d, acc + j * d);
        });
    });
}
#else
// Without AVX-512: plain loops the compiler vectorises (a float16 row is widened into `buf` first).
template <typename T>
void scores(const float* q, int64_t g, int64_t d, const T* k, int64_t stride, int64_t t0, int64_t n,
            float* p) {
  std::vector<float> buf(static_cast<size_t>(d));
  for (int64_t t = 0; t < n; ++t) {
    const float* kr = row(k, t0 + t, stride, d, buf.data());
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
}

template <typename T>
void values(const float* p, int64_t g, int64_t n, const T* v, int64_t stride, int64_t t0, int64_t d,
            float* acc) {
  std::vector<float> buf(static_cast<size_t>(d));
  std::fill(acc, acc + g * d, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const float* vr = row(v, t0 + t, stride, d, buf.data());
    for (int64_t j = 0; j < g; ++j) {
      const float w = p[j * n + t];
      float* aj = acc + j * d;
      for (int64_t c = 0; c < d; ++c) aj[c] += w * vr[c];
    }
  }
}
#endif

// q [g, d]; k, v: rows t0..t1 of one KV head, `stride` elements apart; kpos null or positions (< 0: empty)
template <typename T>
void attend_span(const float* q, int64_t g, int64_t d, const T* k, const T* v, int64_t stride,
                 const int64_t* kpos, int64_t t0, int64_t t1, Partial out) {
  if (kpos != nullptr)  // empty slots at the span's end are not read (a row shorter than the buffer)
    while (t1 > t0 && kpos[t1 - 1] < 0) --t1;
  const int64_t n = t1 - t0;
  if (n == 0) {
    std::fill(out.m, out.m + g, -FLT_MAX);
    std::fill(out.l, out.l + g, 0.f);
    return;
  }
  std::vector<float> p(static_cast<size_t>(g * n));
  scores(q, g, d, k, stride, t0, n, p.data());
  for (int64_t j = 0; j < g; ++j) {
    float* pj = p.data() + j * n;
    float m = -FLT_MAX;
    for (int64_t t = 0; t < n; ++t)
      if (kpos == nullptr || kpos[t0 + t] >= 0) m = std::max(m, pj[t]);
    float l = 0;
    for (int64_t t = 0; t < n; ++t) {
      pj[t] = (kpos == nullptr || kpos[t0 + t] >= 0) ? std::exp(pj[t] - m) : 0.f;
      l += pj[t];
    }
    out.m[j] = m;
    out.l[j] = l;
  }
  values(p.data(), g, n, v, stride, t0, d, out.acc);
}

// q [B, KV, G, D] (already scaled), k/v [B, KV, S, D] (unit stride in D, equal strides), kpos [S] or
// [B, S] (each row's own; read when padded: empty slots hold -1) -> [B, KV, G, D]
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& kpos, bool padded) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be 4-d");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
              "decode_attention: float32 queries, float32 or float16 keys and values");
  const int64_t b = q.size(0), kv = q.size(1), g = q.size(2), d = q.size(3), s = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(1) == kv && k.size(3) == d && v.sizes() == k.sizes(),
              "decode_attention: shapes do not match");
  TORCH_CHECK(d % kLanes == 0 && g <= kMaxGroup && s > 0, "decode_attention: unsupported head shape");
  TORCH_CHECK(k.stride(3) == 1 && k.strides() == v.strides(), "decode_attention: unsupported layout");
  TORCH_CHECK(!padded || kpos.size(-1) == s, "decode_attention: kpos must have one entry per key");
  TORCH_CHECK(!padded || kpos.dim() == 1 || (kpos.dim() == 2 && kpos.size(0) == b),
              "decode_attention: kpos must be [S] or [B, S]");
  const int64_t row_pos = padded && kpos.dim() == 2 ? s : 0;  // kpos elements from one row to the next
  const at::Tensor qc = q.contiguous();
  const at::Tensor pos = padded ? kpos.to(at::kLong).contiguous() : at::Tensor();
  const int64_t heads = b * kv;
  // spans of a fixed length, whatever the batch, the threads or the buffer's size: a row's result is then
  // the same in a batch and alone, and in a buffer longer than its keys (the same sums in the same order)
  const int64_t per = kSpan;
  const int64_t spans = (s + per - 1) / per;
  const int64_t tasks = heads * spans;
  std::vector<float> ms(tasks * g), ls(tasks * g), accs(tasks * g * d);
  const float* qd = qc.data_ptr<float>();
  const int64_t* pd = padded ? pos.data_ptr<int64_t>() : nullptr;
  auto run = [&](auto* kd, auto* vd) {
    at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t head = i / spans, bi = head / kv, h = head % kv;
        const int64_t t0 = (i % spans) * per, t1 = std::min(s, t0 + per);
        attend_span(qd + head * g * d, g, d, kd + bi * k.stride(0) + h * k.stride(1),
                    vd + bi * v.stride(0) + h * v.stride(1), k.stride(2), pd ? pd + bi * row_pos : nullptr, t0, t1,
                    Partial{&ms[i * g], &ls[i * g], &accs[i * g * d]});
      }
    });
  };
  if (k.scalar_type() == at::kHalf)
    run(k.const_data_ptr<at::Half>(), v.const_data_ptr<at::Half>());
  else
    run(k.const_data_ptr<float>(), v.const_data_ptr<float>());
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
