// chatsmith's int4 matmul for the decode and prefill steps: 4-bit weights in blocks of 32 with an
// fp16 scale and offset each (w = q * d + m, q in 0..15: llama.cpp Q4_1's grid and bytes),
// activations quantized to int8 per half-block of 16 on the fly, products summed in int32 with
// AVX512-VNNI (vpdpbusd: 64 u8 x s8 products per instruction), then scaled in fp32 per half-block.
// The weight-times-offset term uses the sum of each block's rounded activations.
//
// Half-blocks of 16 for the activations, where llama.cpp's Q8_1 takes blocks of 32: each int8 code
// then has the scale of the largest of 16 values instead of 32, which nearly halves the error of
// the rounding (mean KL to fp32 on Alpaca answers 0.0024 -> 0.0013 in a PyTorch simulation; llama.cpp
// Q4_1 measures 0.0024). It costs one more int-to-float conversion and multiply-add per block.
//
// Layout: one zmm lane per weight row. The output rows go in groups of 16 (the last group holds the
// n % 16 left over, if any). A group's bytes are, for each block of 32 inputs and each quad
// j = 0..3 of it, one line of 4 bytes per row of the group (64 bytes for a full group): byte t of a
// row holds element 8j + t in its low nibble and element 8j + 4 + t in its high nibble. The group's
// scales and offsets follow the same order: per block, one fp16 per row. So one 64-byte load holds
// 8 elements of 16 rows; a mask with 0x0F gives each lane (row) elements 8j..8j+3, a shift by 4
// and the mask elements 8j+4..8j+7, and a vpdpbusd against those four activations broadcast to
// every lane adds them into that row's block sum. After a block's 4 lines each lane holds its
// row's exact integer dot with each half-block (quads 0-1, then 2-3), scaled once per half-block:
// about 4 times less float work per product than a block spread over 8 lanes, and no horizontal sums. The activations stay in
// their natural order. (The same idea as llama.cpp's repacked Q4_0x8 GEMM, written from scratch.)
//
// One arithmetic for every batch: each (weight row, activation row) output is one fp32 lane whose
// sum runs over the blocks in order, three fused multiply-adds per block (the two half-blocks' scale
// terms, then the offset term), whatever the tile sizes, the number of activation rows or the threads. So a batched
// result equals each row alone bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

namespace chatsmith_q4 {

// Whether the matmuls split their rows over torch's intra-op threads at a few activation rows
// (q4_set_parallel). Splitting gains nothing where the threads share one core's vector units (some
// VMs' vCPUs), and then its start-up cost per call shows; int4.py measures both once and chooses.
static std::atomic<bool> g_parallel{true};
void set_parallel(bool on) { g_parallel = on; }

// body(g0, g1) over the groups of 16 weight rows. Prefill (many activation rows) is compute-bound
// and always splits.
template <typename F>
void for_groups(int64_t groups, int64_t M, const F& body) {
  if ((g_parallel || M >= 8) && at::get_num_threads() > 1) {
    at::parallel_for(0, groups, 2, body);
  } else {
    body(0, groups);
  }
}

bool supported() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define Q4_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c")))

// The four activation bytes at p, in every lane.
Q4_TARGET inline __m512i quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// acc += isum x (weight scale dw x activation scale of half-block h) for every group and row: the
// float step of both kernels, once per half-block. sx holds `halves` scales per activation row.
template <int NG, int R>
Q4_TARGET inline void add_half(__m512 (&acc)[NG][R], const __m512i (&isum)[NG][R], const __m512 (&dw)[NG],
                               const float* sx, int64_t halves, int64_t h) {
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < R; ++r) {
      const __m512 ds = _mm512_mul_ps(dw[g], _mm512_set1_ps(sx[r * halves + h]));
      acc[g][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g][r]), ds, acc[g][r]);
    }
}

// NG groups of 16 weight rows (or, with FULL false, one group of `rows` < 16) against R activation
// rows. w, d, m point at the first group; gw and gs are a full group's bytes and scales. xq, sx and
// xsum advance by K, K/16 (a scale per half-block) and K/32 per activation row; out by N per activation row. Each line of
// weights is unpacked once and used R times; the NG x R block sums are independent chains.
template <int NG, int R, bool FULL>
Q4_TARGET void tile4(const uint8_t* w, const uint16_t* d, const uint16_t* m, int64_t gw, int64_t gs, int rows,
                     int64_t K, const int8_t* xq, const float* sx, const float* xsum, float* out, int64_t N,
                     bool prefetch) {
  const int64_t blocks = K / 32;
  const int line = FULL ? 64 : 4 * rows;                 // bytes per (block, quad) line
  const int lanes = FULL ? 16 : rows;                    // scales per block
  const __mmask16 k = FULL ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[NG][R];
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < R; ++r) acc[g][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i isum[NG][R];
    __m512 dw[NG];
    for (int g = 0; g < NG; ++g) dw[g] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, d + g * gs + b * lanes));
    for (int j = 0; j < 4; ++j) {
      if (j % 2 == 0)
        for (int g = 0; g < NG; ++g)
          for (int r = 0; r < R; ++r) isum[g][r] = _mm512_setzero_si512();
      __m512i lo[NG], hi[NG];
      for (int g = 0; g < NG; ++g) {
        const uint8_t* p = w + g * gw + (4 * b + j) * line;
        // The next tiles' bytes, two tiles ahead: decode streams every weight once, from memory.
        if (FULL && prefetch) _mm_prefetch(reinterpret_cast<const char*>(p + 2 * NG * gw), _MM_HINT_T0);
        const __m512i v = FULL ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(k, p);
        lo[g] = _mm512_and_si512(v, low);
        hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* x = xq + r * K + 32 * b + 8 * j;
        const __m512i xl = quad(x), xh = quad(x + 4);
        for (int g = 0; g < NG; ++g) {
          isum[g][r] = _mm512_dpbusd_epi32(isum[g][r], lo[g], xl);
          isum[g][r] = _mm512_dpbusd_epi32(isum[g][r], hi[g], xh);
        }
      }
      if (j % 2 == 1)   // a half-block done: its exact integer sums, times the weights' and its own scale
        add_half<NG, R>(acc, isum, dw, sx, 2 * blocks, 2 * b + j / 2);
    }
    for (int g = 0; g < NG; ++g) {
      const __m512 mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + g * gs + b * lanes));
      for (int r = 0; r < R; ++r) acc[g][r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xsum[r * blocks + b]), acc[g][r]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * N + 16 * g, k, acc[g][r]);
}

// The int8 twin (llama.cpp's Q8_0: int8 weights in blocks of 32 with an fp16 scale, no offset) in
// the same lane-per-row layout, 8 lines of 4 bytes per row per block (line j: elements 4j..4j+3),
// stored as w + 128 so that vpdpbusd (u8 x s8) takes them: each half-block's sum then carries
// 128 * (sum of its activation codes), taken off exactly in int32. Activations per half-block of 16
// as in tile4 (lines 0-3, then 4-7).
template <int NG, int R, bool FULL>
Q4_TARGET void tile8(const uint8_t* w, const uint16_t* d, int64_t gw, int64_t gs, int rows, int64_t K,
                     const int8_t* xq, const float* sx, const int32_t* qsum, float* out, int64_t N, bool prefetch) {
  const int64_t blocks = K / 32;
  const int line = FULL ? 64 : 4 * rows;
  const int lanes = FULL ? 16 : rows;
  const __mmask16 k = FULL ? (__mmask16)0xFFFF : (__mmask16)((1u << rows) - 1);
  __m512 acc[NG][R];
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < R; ++r) acc[g][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i isum[NG][R];
    __m512 dw[NG];
    for (int g = 0; g < NG; ++g) dw[g] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, d + g * gs + b * lanes));
    for (int j = 0; j < 8; ++j) {
      if (j % 4 == 0)
        for (int g = 0; g < NG; ++g)
          for (int r = 0; r < R; ++r) isum[g][r] = _mm512_set1_epi32(-128 * qsum[r * 2 * blocks + 2 * b + j / 4]);
      __m512i v[NG];
      for (int g = 0; g < NG; ++g) {
        const uint8_t* p = w + g * gw + (8 * b + j) * line;
        if (FULL && prefetch) _mm_prefetch(reinterpret_cast<const char*>(p + 2 * NG * gw), _MM_HINT_T0);
        v[g] = FULL ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(k, p);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i x = quad(xq + r * K + 32 * b + 4 * j);
        for (int g = 0; g < NG; ++g) isum[g][r] = _mm512_dpbusd_epi32(isum[g][r], v[g], x);
      }
      if (j % 4 == 3) add_half<NG, R>(acc, isum, dw, sx, 2 * blocks, 2 * b + j / 4);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * N + 16 * g, k, acc[g][r]);
}
#else
template <int NG, int R, bool FULL>
void tile4(const uint8_t*, const uint16_t*, const uint16_t*, int64_t, int64_t, int, int64_t, const int8_t*,
           const float*, const float*, float*, int64_t, bool) {}
template <int NG, int R, bool FULL>
void tile8(const uint8_t*, const uint16_t*, int64_t, int64_t, int, int64_t, const int8_t*, const float*,
           const int32_t*, float*, int64_t, bool) {}
#endif

// x [M, K] fp32 -> int8 codes [M, K] (natural order), a scale per half-block of 16 (sx, qsum: K/16
// per row), the sums of the codes per half-block (qsum) and the blocks of 32's sums of the rounded
// activations (xsum: K/32 per row, each half's scale times its codes' sum).
// With `norm` (the RMSNorm weight [K]), each row is first normalised: x * w / sqrt(mean(x^2) + eps).
void quantize_rows(const at::Tensor& x, const float* norm, double eps, std::vector<int8_t>& xq, std::vector<float>& sx,
                   std::vector<float>& xsum, std::vector<int32_t>& qsum) {
  const int64_t M = x.size(0), K = x.size(1), blocks = K / 32, halves = K / 16;
  xq.resize(M * K);
  sx.resize(M * halves);
  xsum.resize(M * blocks);
  qsum.resize(M * halves);
  static thread_local std::vector<float> tmp;
  tmp.resize(K);
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    const float* row = xp + r * K;
    if (norm != nullptr) {
      double ss = 0.0;
      for (int64_t j = 0; j < K; ++j) ss += (double)row[j] * row[j];
      const float inv = (float)(1.0 / std::sqrt(ss / K + eps));
      for (int64_t j = 0; j < K; ++j) tmp[j] = row[j] * inv * norm[j];
      row = tmp.data();
    }
    int8_t* out = xq.data() + r * K;
    for (int64_t h = 0; h < halves; ++h) {
      float amax = 0.f;
      for (int64_t j = 0; j < 16; ++j) amax = std::max(amax, std::fabs(row[h * 16 + j]));
      const float scale = amax / 127.f;
      int32_t s = 0;
      for (int64_t j = 0; j < 16; ++j) {
        const int8_t q = scale > 0.f ? (int8_t)std::nearbyint(row[h * 16 + j] / scale) : (int8_t)0;
        out[h * 16 + j] = q;
        s += q;
      }
      sx[r * halves + h] = scale;
      qsum[r * halves + h] = s;
      // The offsets multiply the sum of the *rounded* activations (llama.cpp's Q8_1 `s`): then the
      // rounding errors meet the weights themselves, w = q d + m, which are centred, instead of
      // q d alone (all positive), and mostly cancel (perplexity +0.2% instead of +1% here).
      if (h % 2 == 0) xsum[r * blocks + h / 2] = scale * (float)s;
      else xsum[r * blocks + h / 2] += scale * (float)s;
    }
  }
}

// Runs tile(NG, R, FULL, group, rows, r0) over the groups [g0, g1) of N rows (the last one holding
// N % 16 rows if that is not 0) and all M activation rows: NG groups at a time, each against the
// activation rows 4 at a time, then the 1 to 3 left.
template <typename T>
void over_tiles(int64_t g0, int64_t g1, int64_t N, int64_t M, const T& tile) {
  const int64_t full = N / 16;
  auto rows_of = [&](auto ng, auto isfull, int64_t g, int rows) {
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) tile(ng, std::integral_constant<int, 4>{}, isfull, g, rows, r, r == 0);
    switch (M - r) {
      case 3: tile(ng, std::integral_constant<int, 3>{}, isfull, g, rows, r, r == 0); break;
      case 2: tile(ng, std::integral_constant<int, 2>{}, isfull, g, rows, r, r == 0); break;
      case 1: tile(ng, std::integral_constant<int, 1>{}, isfull, g, rows, r, r == 0); break;
      default: break;
    }
  };
  int64_t g = g0;
  const int64_t end = std::min(g1, full);
  for (; g + 2 <= end; g += 2) rows_of(std::integral_constant<int, 2>{}, std::true_type{}, g, 16);
  for (; g < end; ++g) rows_of(std::integral_constant<int, 1>{}, std::true_type{}, g, 16);
  if (g1 > full && N % 16) rows_of(std::integral_constant<int, 1>{}, std::false_type{}, full, (int)(N % 16));
}

// The activations of a call, quantized by quantize_rows into this thread's buffers (the workers
// get plain pointers: thread_local storage is the calling thread's, not theirs).
struct QuantizedRows {
  const int8_t* xq;
  const float* sx;
  const float* xsum;
  const int32_t* qsum;
};

QuantizedRows quantize_input(const at::Tensor& x, const c10::optional<at::Tensor>& norm, double eps) {
  at::Tensor nw;
  if (norm) nw = norm->contiguous().to(at::kFloat);
  static thread_local std::vector<int8_t> xq;
  static thread_local std::vector<float> sx, xsum;
  static thread_local std::vector<int32_t> qsum;
  quantize_rows(x, norm ? nw.data_ptr<float>() : nullptr, eps, xq, sx, xsum, qsum);
  return {xq.data(), sx.data(), xsum.data(), qsum.data()};
}

// y [M, N] = x [M, K] W^T (+ bias) for W given as packed codes w [N, K/2], fp16 scales d and offsets m
// [N, K/32], all three in the layout above; with `norm` (RMSNorm weight [K]) and eps, x is
// RMS-normalised first.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& d, const at::Tensor& m,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm, double eps) {
  auto x = x_in.contiguous().to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), blocks = K / 32;
  TORCH_CHECK(K % 64 == 0 && w.size(1) * 2 == K && d.size(1) == blocks && m.size(1) == blocks,
              "q4 linear: shapes do not match");
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf, "q4 linear: fp16 scales and offsets");
  TORCH_CHECK(w.is_contiguous() && d.is_contiguous() && m.is_contiguous(), "q4 linear: contiguous weights");
  const QuantizedRows q = quantize_input(x, norm, eps);
  auto y = at::empty({M, N}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  const int64_t gw = 16 * (K / 2), gs = 16 * blocks;
  for_groups((N + 15) / 16, M, [&](int64_t g0, int64_t g1) {
    over_tiles(g0, g1, N, M, [&](auto ng, auto r, auto full, int64_t g, int rows, int64_t r0, bool prefetch) {
      tile4<decltype(ng)::value, decltype(r)::value, decltype(full)::value>(
          wp + g * gw, dp + g * gs, mp + g * gs, gw, gs, rows, K, q.xq + r0 * K, q.sx + r0 * 2 * blocks,
          q.xsum + r0 * blocks, yp + r0 * N + 16 * g, N, prefetch);
    });
  });
  if (bias) y.add_(*bias);
  return y;
}

// y [M, N] = x [M, K] W^T (+ bias) for W as codes + 128 w [N, K] (uint8) and fp16 scales
// d [N, K/32] (Q8_0), both in the layout of tile8; with `norm` and eps, x is RMS-normalised first.
at::Tensor linear8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& d,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm, double eps) {
  auto x = x_in.contiguous().to(at::kFloat);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), blocks = K / 32;
  TORCH_CHECK(K % 64 == 0 && w.size(1) == K && d.size(1) == blocks && d.scalar_type() == at::kHalf &&
              w.scalar_type() == at::kByte && w.is_contiguous() && d.is_contiguous(),
              "q8 linear: shapes do not match");
  const QuantizedRows q = quantize_input(x, norm, eps);
  auto y = at::empty({M, N}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const int64_t gw = 16 * K, gs = 16 * blocks;
  for_groups((N + 15) / 16, M, [&](int64_t g0, int64_t g1) {
    over_tiles(g0, g1, N, M, [&](auto ng, auto r, auto full, int64_t g, int rows, int64_t r0, bool prefetch) {
      tile8<decltype(ng)::value, decltype(r)::value, decltype(full)::value>(
          wp + g * gw, dp + g * gs, gw, gs, rows, K, q.xq + r0 * K, q.sx + r0 * 2 * blocks, q.qsum + r0 * 2 * blocks,
          yp + r0 * N + 16 * g, N, prefetch);
    });
  });
  if (bias) y.add_(*bias);
  return y;
}

}  // namespace chatsmith_q4
