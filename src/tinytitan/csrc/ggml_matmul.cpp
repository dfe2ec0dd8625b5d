// Matrices stored as GGML blocks (the bytes of a GGUF file) multiplied without a float copy of the weights:
// the runtime of a model as shipped (tinytitan.quant.ggml_kernel).
//
// Each output row is a dot product of the input with one row of blocks: a block is decoded into float32
// on the stack (the same values, in the same order of operations, as gguf-py's and our numpy dequantizers:
// d * q for the symmetric formats, d * q + m or (d * sc) * q - (dmin * m) for the affine ones) and
// multiplied with float32 inputs, so a matrix gives what its float32 dequantization gives, up to the order
// of the sums. Rows are split across torch's threads. Reading one byte per weight (Q8_0) or less, this is
// what a decode step needs; prefill dequantizes slices of rows (ggml_dequant) for a GEMM. Built at run time
// by tinytitan.quant.ggml_kernel, with the compiler free to reassociate the sums (vectorised dots) but not to
// fuse a multiply into an add (the decoded values stay those of the float32 reference).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// gguf's type ids
enum : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

inline float f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);  // one instruction; the same value as the conversion below
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// One block -> its values (32, or 256 for the k-quants) in float32.
inline void dq_q8_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int l = 0; l < 32; ++l) y[l] = static_cast<float>(q[l]) * d;
}

inline void dq_q4_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  const uint8_t* qs = b + 2;
  for (int l = 0; l < 16; ++l) {
    y[l] = static_cast<float>(static_cast<int>(qs[l] & 15) - 8) * d;
    y[l + 16] = static_cast<float>(static_cast<int>(qs[l] >> 4) - 8) * d;
  }
}

inline void dq_q4_1(const uint8_t* b, float* y) {
  const float d = f16(b), m = f16(b + 2);
  const uint8_t* qs = b + 4;
  for (int l = 0; l < 16; ++l) {
    y[l] = static_cast<float>(qs[l] & 15) * d + m;
    y[l + 16] = static_cast<float>(qs[l] >> 4) * d + m;
  }
}

inline void dq_q5_0(const uint8_t* b, float* y) {
  const float d = f16(b);
  const uint32_t qh = u32(b + 2);
  const uint8_t* qs = b + 6;
  for (int l = 0; l < 16; ++l) {
    const int lo = (qs[l] & 15) | (((qh >> l) & 1) << 4);
    const int hi = (qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4);
    y[l] = static_cast<float>(lo - 16) * d;
    y[l + 16] = static_cast<float>(hi - 16) * d;
  }
}

inline void dq_q5_1(const uint8_t* b, float* y) {
  const float d = f16(b), m = f16(b + 2);
  const uint32_t qh = u32(b + 4);
  const uint8_t* qs = b + 8;
  for (int l = 0; l < 16; ++l) {
    const int lo = (qs[l] & 15) | (((qh >> l) & 1) << 4);
    const int hi = (qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4);
    y[l] = static_cast<float>(lo) * d + m;
    y[l + 16] = static_cast<float>(hi) * d + m;
  }
}

// Q4_K / Q5_K: eight 6-bit scales and mins in 12 bytes
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K / Q5_K: sub-blocks 2c and 2c + 1 share 32 bytes of codes; their scales d * sc and minimums dmin * m
struct PairScales {
  float d1, n1, d2, n2;
};

inline PairScales k4_pair(const uint8_t* b, int c) {
  const float d = f16(b), dmin = f16(b + 2);
  int sc1, m1, sc2, m2;
  scale_min_k4(2 * c, b + 4, &sc1, &m1);
  scale_min_k4(2 * c + 1, b + 4, &sc2, &m2);
  return {d * static_cast<float>(sc1), dmin * static_cast<float>(m1), d * static_cast<float>(sc2),
          dmin * static_cast<float>(m2)};
}

inline void dq_q4_k(const uint8_t* b, float* y) {
  const uint8_t* qs = b + 16;
  for (int c = 0; c < 4; ++c) {
    const auto [d1, n1, d2, n2] = k4_pair(b, c);
    const uint8_t* q = qs + 32 * c;
    float* o = y + 64 * c;
    for (int l = 0; l < 32; ++l) {
      o[l] = d1 * static_cast<float>(q[l] & 15) - n1;
      o[l + 32] = d2 * static_cast<float>(q[l] >> 4) - n2;
    }
  }
}

inline void dq_q5_k(const uint8_t* b, float* y) {
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int c = 0; c < 4; ++c) {
    const auto [d1, n1, d2, n2] = k4_pair(b, c);
    const uint8_t* q = qs + 32 * c;
    float* o = y + 64 * c;
    for (int l = 0; l < 32; ++l) {
      const int lo = (q[l] & 15) | (((qh[l] >> (2 * c)) & 1) << 4);
      const int hi = (q[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
      o[l] = d1 * static_cast<float>(lo) - n1;
      o[l + 32] = d2 * static_cast<float>(hi) - n2;
    }
  }
}

inline void dq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16(b + 208);
  for (int h = 0; h < 2; ++h) {
    float* o = y + 128 * h;
    const uint8_t* l0 = ql + 64 * h;
    const uint8_t* hb = qh + 32 * h;
    const int8_t* s = sc + 8 * h;
    for (int half = 0; half < 2; ++half) {
      const float s1 = d * static_cast<float>(s[half]), s2 = d * static_cast<float>(s[half + 2]);
      const float s3 = d * static_cast<float>(s[half + 4]), s4 = d * static_cast<float>(s[half + 6]);
      for (int j = 0; j < 16; ++j) {
        const int l = 16 * half + j;
        const int q1 = ((l0[l] & 15) | (((hb[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((l0[l + 32] & 15) | (((hb[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((l0[l] >> 4) | (((hb[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((l0[l + 32] >> 4) | (((hb[l] >> 6) & 3) << 4)) - 32;
        o[l] = s1 * static_cast<float>(q1);
        o[l + 32] = s2 * static_cast<float>(q2);
        o[l + 64] = s3 * static_cast<float>(q3);
        o[l + 96] = s4 * static_cast<float>(q4);
      }
    }
  }
}

struct Format {
  int64_t values;  // per block
  int64_t bytes;
  void (*decode)(const uint8_t*, float*);
};

Format format_of(int64_t type) {
  switch (type) {
    case Q8_0: return {32, 34, dq_q8_0};
    case Q4_0: return {32, 18, dq_q4_0};
    case Q4_1: return {32, 20, dq_q4_1};
    case Q5_0: return {32, 22, dq_q5_0};
    case Q5_1: return {32, 24, dq_q5_1};
    case Q4_K: return {256, 144, dq_q4_k};
    case Q5_K: return {256, 176, dq_q5_k};
    case Q6_K: return {256, 210, dq_q6_k};
    default: TORCH_CHECK(false, "ggml_matmul: unsupported GGML type ", type);
  }
}

constexpr int64_t kRows = 4;  // input rows per pass over a weight row (their sums stay in registers)
constexpr int64_t kLane = 32;  // elementwise partial sums per input row, added up once per output

// Rows [r0, r1) of x [m, k] @ W^T: each weight block decoded once per pass of up to kRows input rows, its
// products added elementwise into kLane partial sums (no horizontal sum per block).
template <void (*Decode)(const uint8_t*, float*), int64_t Values>
void rows_dot(const uint8_t* w, int64_t row_bytes, int64_t nb, const float* x, int64_t m, int64_t k,
              float* y, int64_t n, int64_t r0, int64_t r1) {
  alignas(64) float buf[Values];
  alignas(64) float acc[kRows][kLane];
  const int64_t block_bytes = row_bytes / nb;
  if (m == 1) {  // decode: one input row, its partial sums in registers
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w + r * row_bytes;
      float a[kLane] = {};
      for (int64_t blk = 0; blk < nb; ++blk) {
        Decode(row + blk * block_bytes, buf);
        const float* xb = x + blk * Values;
        for (int64_t c = 0; c < Values; c += kLane)
#pragma omp simd
          for (int64_t l = 0; l < kLane; ++l) a[l] += buf[c + l] * xb[c + l];
      }
      float s = 0.f;
      for (int64_t l = 0; l < kLane; ++l) s += a[l];
      y[r] = s;
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    for (int64_t i0 = 0; i0 < m; i0 += kRows) {
      const int64_t rows = std::min(kRows, m - i0);
      for (int64_t i = 0; i < kRows; ++i)
        for (int64_t l = 0; l < kLane; ++l) acc[i][l] = 0.f;
      for (int64_t blk = 0; blk < nb; ++blk) {
        Decode(row + blk * block_bytes, buf);
        for (int64_t i = 0; i < rows; ++i) {
          const float* xi = x + (i0 + i) * k + blk * Values;
          for (int64_t c = 0; c < Values; c += kLane)
#pragma omp simd
            for (int64_t l = 0; l < kLane; ++l) acc[i][l] += buf[c + l] * xi[c + l];
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        float s = 0.f;
        for (int64_t l = 0; l < kLane; ++l) s += acc[i][l];
        y[(i0 + i) * n + r] = s;
      }
    }
  }
}

template <void (*Decode)(const uint8_t*, float*), int64_t Values>
void run_matmul(const uint8_t* w, int64_t row_bytes, const float* x, int64_t m, int64_t k, float* y,
                int64_t n) {
  const int64_t nb = k / Values;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    rows_dot<Decode, Values>(w, row_bytes, nb, x, m, k, y, n, r0, r1);
  });
}

#if defined(__AVX2__)
// ---------------------------------------------------------------------------------------------------------
// The fast path on x86 (AVX2 and up): inputs rounded to int8 per 32 values (a float16 scale, round to
// nearest even, llama.cpp's rounding of inputs for these blocks), weight codes multiplied with them as
// integers, one float multiply-add per 32 weights. Not the reference's float32 products: the price of
// reading the weights at memory speed, and what llama.cpp's CPU backend does too.
// ---------------------------------------------------------------------------------------------------------

struct QuantInput {
  std::vector<int8_t> q;  // [m, k]
  std::vector<float> d;   // [m, k / 32] scale of each 32 values
  std::vector<float> s;   // [m, k / 32] d * the sum of their codes (the affine formats' minimum term)
};

QuantInput quantize_input(const float* x, int64_t m, int64_t k) {
  const int64_t nb = k / 32;
  QuantInput out{std::vector<int8_t>(m * k), std::vector<float>(m * nb), std::vector<float>(m * nb)};
  for (int64_t i = 0; i < m * nb; ++i) {
    const float* v = x + i * 32;
    float amax = 0.f;
    for (int l = 0; l < 32; ++l) amax = std::max(amax, std::fabs(v[l]));
    const float d = static_cast<float>(c10::Half(amax / 127.f));
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int l = 0; l < 32; ++l) {
      const int q = static_cast<int>(std::nearbyint(v[l] * id));
      out.q[i * 32 + l] = static_cast<int8_t>(q);
      sum += q;
    }
    out.d[i] = d;
    out.s[i] = d * static_cast<float>(sum);
  }
  return out;
}

inline __m256i nibbles_lo(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
inline __m256i nibbles_hi(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }

// 16 bytes of nibbles -> 32 codes: value j (low nibble of byte j) then value j + 16 (its high nibble)
inline __m256i split_nibbles(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// 32 bits -> 32 bytes, byte j = 16 where bit j is set
inline __m256i bits_to_16s(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
                       3, 3));
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_and_si256(set, _mm256_set1_epi8(16));
}

// 8 int32 partial sums of 32 products: signed codes (sign moved onto the input), or codes of 0..63
// The int32 sums of each 4 products. With AVX-512 VNNI one instruction (vpdpbusd) does what maddubs and
// madd do in two; the sums are the same integers (the pairs maddubs adds never saturate here: codes are
// at most 128 in magnitude and inputs at most 127), so both paths give the same result.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline __m256i dot_signed(__m256i w, __m256i x) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}
inline __m256i dot_unsigned(__m256i w, __m256i x) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
}
#else
inline __m256i dot_signed(__m256i w, __m256i x) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
inline __m256i dot_unsigned(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
#endif

// Each format hands its blocks over as chunks of 32 codes: chunk(c, codes, scale per int32 lane, minimum)
struct F_Q8_0 {
  static constexpr int64_t values = 32, bytes = 34;
  static constexpr bool is_signed = true, affine = false;
  template <class Chunk> static void each(const uint8_t* b, Chunk&& chunk) {
    chunk(0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)), _mm256_set1_ps(f16(b)), 0.f);
  }
};
struct F_Q4_0 {
  static constexpr int64_t values = 32, bytes = 18;
  static constexpr bool is_signed = true, affine = false;
  template <class Chunk> static void each(const uint8_t* b, Chunk&& chunk) {
    chunk(0, _mm256_sub_epi8(split_nibbles(b + 2), _mm256_set1_epi8(8)), _mm256_set1_ps(f16(b)), 0.f);
  }
};
struct F_Q4_1 {
  static constexpr int64_t values = 32, bytes = 20;
  static constexpr bool is_signed = false, affine = true;
  template <class Chunk> static void each(const uint8_t* b, Chunk&& chunk) {
    chunk(0, split_nibbles(b + 4), _mm256_set1_ps(f16(b)), f16(b + 2));
  }
};
struct F_Q5_0 {
  static constexpr int64_t values = 32, bytes = 22;
  static constexpr bool is_signed = true, affine = false;
  template <class Chunk> static void each(const uint8_t* b, Chunk&& chunk) {
    const __m256i q = _mm256_or_si256(split_nibbles(b + 6), bits_to_16s(u32(b + 2)));
    chunk(0, _mm256_sub_epi8(q, _mm256_set1_epi8(16)), _mm256_set1_ps(f16(b)), 0.f);
  }
};
struct F_Q5_1 {
  static constexpr int64_t values = 32, bytes = 24;
  static constexpr bool is_signed = false, affine = true;
  template <class Chunk> static void each(const uint8_t* b, Chunk&& chunk) {
    const __m256i q = _mm256_or_si256(split_nibbles(b + 8), bits_to_16s(u32(b + 4)));
    chunk(0, q, _mm256_set1_ps(f16(b)), f16(b + 2));
  }
};
struct F_Q4_K {
  static constexpr int64_t values = 256, bytes = 144;
  static constexpr bool is_signed = false, affine = true;
  template <class Chunk> static void each(const uint8_t* b, Chunk&& chunk) {
    for (int c = 0; c < 4; ++c) {
      const auto [d1, n1, d2, n2] = k4_pair(b, c);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * c));
      chunk(2 * c, nibbles_lo(q), _mm256_set1_ps(d1), -n1);
      chunk(2 * c + 1, nibbles_hi(q), _mm256_set1_ps(d2), -n2);
    }
  }
};
struct F_Q5_K {
  static constexpr int64_t values = 256, bytes = 176;
  static constexpr bool is_signed = false, affine = true;
  template <class Chunk> static void each(const uint8_t* b, Chunk&& chunk) {
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    const __m256i one = _mm256_set1_epi8(1);
    for (int c = 0; c < 4; ++c) {
      const auto [d1, n1, d2, n2] = k4_pair(b, c);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 48 + 32 * c));
      const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c)), one), 4);
      const __m256i h2 =
          _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c + 1)), one), 4);
      chunk(2 * c, _mm256_or_si256(nibbles_lo(q), h1), _mm256_set1_ps(d1), -n1);
      chunk(2 * c + 1, _mm256_or_si256(nibbles_hi(q), h2), _mm256_set1_ps(d2), -n2);
    }
  }
};
struct F_Q6_K {
  static constexpr int64_t values = 256, bytes = 210;
  static constexpr bool is_signed = true, affine = false;
  template <class Chunk> static void each(const uint8_t* b, Chunk&& chunk) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    const __m256i three = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; ++h) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
      for (int c = 0; c < 4; ++c) {
        const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32 * (c & 1)));
        const __m256i lo = c < 2 ? nibbles_lo(ql) : nibbles_hi(ql);
        const __m256i hb =
            _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c)), three), 4);
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, hb), _mm256_set1_epi8(32));
        // values 0-15 of the chunk (int32 lanes 0-3) and 16-31 (lanes 4-7) have scales of their own
        const float s1 = d * static_cast<float>(sc[8 * h + 2 * c]), s2 = d * static_cast<float>(sc[8 * h + 2 * c + 1]);
        chunk(4 * h + c, q, _mm256_setr_ps(s1, s1, s1, s1, s2, s2, s2, s2), 0.f);
      }
    }
  }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class F>
void run_int8(const uint8_t* w, int64_t row_bytes, const QuantInput& xq, int64_t m, int64_t k, float* y,
              int64_t n) {
  const int64_t nb = k / F::values, nbx = k / 32;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    if (m == 1) {  // decode: the sums in registers
      const int8_t* xqd = xq.q.data();
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = w + r * row_bytes;
        __m256 acc = _mm256_setzero_ps();
        float bias = 0.f;
        for (int64_t blk = 0; blk < nb; ++blk) {
          F::each(row + blk * F::bytes, [&](int c, __m256i codes, __m256 scale, float mn) {
            const int64_t xb = blk * (F::values / 32) + c;
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xqd + xb * 32));
            const __m256i dot = F::is_signed ? dot_signed(codes, xv) : dot_unsigned(codes, xv);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scale, _mm256_set1_ps(xq.d[xb])), acc);
            if constexpr (F::affine) bias = std::fma(mn, xq.s[xb], bias);  // one rounding, as below
          });
        }
        y[r] = hsum(acc) + bias;
      }
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w + r * row_bytes;
      for (int64_t i0 = 0; i0 < m; i0 += kRows) {
        const int64_t rows = std::min(kRows, m - i0);
        __m256 acc[kRows];
        float bias[kRows] = {};
        for (int64_t i = 0; i < kRows; ++i) acc[i] = _mm256_setzero_ps();
        for (int64_t blk = 0; blk < nb; ++blk) {
          F::each(row + blk * F::bytes, [&](int c, __m256i codes, __m256 scale, float mn) {
            const int64_t xb = blk * (F::values / 32) + c;
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t at = (i0 + i) * nbx + xb;
              const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + at * 32));
              const __m256i dot = F::is_signed ? dot_signed(codes, xv) : dot_unsigned(codes, xv);
              acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scale, _mm256_set1_ps(xq.d[at])),
                                       acc[i]);
              if constexpr (F::affine) bias[i] = std::fma(mn, xq.s[at], bias[i]);  // = the one-row sum
            }
          });
        }
        for (int64_t i = 0; i < rows; ++i) y[(i0 + i) * n + r] = hsum(acc[i]) + bias[i];
      }
    }
  });
}
#endif

void check(const at::Tensor& raw, int64_t type, int64_t k, const Format& f) {
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.dim() == 2,
              "ggml_matmul: blocks must be a 2-D uint8 CPU tensor");
  TORCH_CHECK(k % f.values == 0 && raw.size(1) == k / f.values * f.bytes,
              "ggml_matmul: ", raw.size(1), " bytes per row do not hold ", k, " values of type ", type);
  TORCH_CHECK(raw.stride(1) == 1 && raw.stride(0) == raw.size(1), "ggml_matmul: blocks must be contiguous");
}

at::Tensor ggml_matmul(const at::Tensor& x, const at::Tensor& raw, int64_t type, int64_t k, bool exact) {
  const Format f = format_of(type);
  check(raw, type, k, f);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == k,
              "ggml_matmul: the input must be float32 [rows, ", k, "]");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), n = raw.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  const uint8_t* w = raw.const_data_ptr<uint8_t>();
  const float* xd = xc.const_data_ptr<float>();
  float* yd = y.data_ptr<float>();
  const int64_t rb = raw.size(1);
#if defined(__AVX2__)
  if (!exact) {
    const QuantInput xq = quantize_input(xd, m, k);
    switch (type) {
      case Q8_0: run_int8<F_Q8_0>(w, rb, xq, m, k, yd, n); break;
      case Q4_0: run_int8<F_Q4_0>(w, rb, xq, m, k, yd, n); break;
      case Q4_1: run_int8<F_Q4_1>(w, rb, xq, m, k, yd, n); break;
      case Q5_0: run_int8<F_Q5_0>(w, rb, xq, m, k, yd, n); break;
      case Q5_1: run_int8<F_Q5_1>(w, rb, xq, m, k, yd, n); break;
      case Q4_K: run_int8<F_Q4_K>(w, rb, xq, m, k, yd, n); break;
      case Q5_K: run_int8<F_Q5_K>(w, rb, xq, m, k, yd, n); break;
      case Q6_K: run_int8<F_Q6_K>(w, rb, xq, m, k, yd, n); break;
      default: break;
    }
    return y;
  }
#endif
  switch (type) {
    case Q8_0: run_matmul<dq_q8_0, 32>(w, rb, xd, m, k, yd, n); break;
    case Q4_0: run_matmul<dq_q4_0, 32>(w, rb, xd, m, k, yd, n); break;
    case Q4_1: run_matmul<dq_q4_1, 32>(w, rb, xd, m, k, yd, n); break;
    case Q5_0: run_matmul<dq_q5_0, 32>(w, rb, xd, m, k, yd, n); break;
    case Q5_1: run_matmul<dq_q5_1, 32>(w, rb, xd, m, k, yd, n); break;
    case Q4_K: run_matmul<dq_q4_k, 256>(w, rb, xd, m, k, yd, n); break;
    case Q5_K: run_matmul<dq_q5_k, 256>(w, rb, xd, m, k, yd, n); break;
    case Q6_K: run_matmul<dq_q6_k, 256>(w, rb, xd, m, k, yd, n); break;
    default: break;
  }
  return y;
}

// The rows of blocks as float32 [rows, k] (embedding lookups, and prefill's slices of weights for a GEMM).
at::Tensor ggml_dequant(const at::Tensor& raw, int64_t type, int64_t k) {
  const Format f = format_of(type);
  check(raw, type, k, f);
  const int64_t n = raw.size(0), nb = k / f.values;
  at::Tensor y = at::empty({n, k}, raw.options().dtype(at::kFloat));
  const uint8_t* w = raw.const_data_ptr<uint8_t>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t blk = 0; blk < nb; ++blk)
        f.decode(w + r * raw.size(1) + blk * f.bytes, yd + r * k + blk * f.values);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(tinytitan_ggml, m) {
  m.def("matmul(Tensor x, Tensor blocks, int type, int k, bool exact) -> Tensor");
  m.def("dequant(Tensor blocks, int type, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinytitan_ggml, CPU, m) {
  m.impl("matmul", &ggml_matmul);
  m.impl("dequant", &ggml_dequant);
}
