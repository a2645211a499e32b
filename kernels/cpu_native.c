/* Hearth's native CPU kernels: llama.cpp's Q4_0 / Q4_1 weights (repacked once at load), and a
 * whole decode step of a Llama-family decoder in one call (engine/models/native_decode.py).
 *
 * Built on first use by kernels/cpu_native.py with the system C compiler (-O3 -march=native
 * -fopenmp -ffp-contract=off) and loaded with ctypes; no Python or torch headers. The OpenMP
 * runtime is the one torch already loaded (same soname), so both share one thread pool.
 *
 * Block layout (llama.cpp, ggml-common.h), 32 weights a block:
 *   Q4_0: f16 d, u8 qs[16]           w = (q - 8) d
 *   Q4_1: f16 d, f16 m, u8 qs[16]    w = q d + m
 *   element j (0..15) is qs[j] & 15, element j + 16 is qs[j] >> 4.
 * Both are computed as w = q d + m (m = -8 d for Q4_0), so a row's dot product with x is
 *   sum over blocks b of d_b (q_b . x_b) + m_b sum(x_b).
 *
 * Activations: each block of 32 inputs is rounded to int16 (absmax / 32767, a relative error
 * below 2e-5, against bf16's 4e-3), so q_b . x_b is an exact integer (byte multiply-adds, see
 * "GEMV input") instead of int-to-float conversions and float multiplies; the sums of x and the
 * scales stay float32. Held-out perplexity of the default model: 16.9265 against float32's
 * 16.9263 (docs/benchmarks.md). int8 activations (llama.cpp's Q8) cost +3.7%.
 *
 * The decode step's KV cache is float16 (llama.cpp's default; model_builder.NATIVE_KV_DTYPE) or
 * float32: written rounded to nearest even, converted to float32 as attention reads it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HEARTH_AVX2 1
#endif
#if defined(__SSE__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define QK 32
#define KEY_CHUNK 128 /* keys an attention task (see hearth_decode) */

static inline float f16_to_f32(const uint8_t *p) {
#if defined(__F16C__)
    uint16_t hv;
    memcpy(&hv, p, 2);
    return _cvtsh_ss(hv);
#endif
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* x as float16 bits, rounded to nearest even (as torch's .half() and vcvtps2ph round) */
static uint16_t f32_to_f16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    const uint32_t sign = (bits >> 16) & 0x8000, ax = bits & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* rounds to 65520 or more: inf */
    if (ax < 0x33000000) return (uint16_t)sign; /* below 2^-25: zero */
    uint32_t h, rem, half;
    if (ax < 0x38800000) { /* below 2^-14: a subnormal float16, k 2^-24 */
        const uint32_t shift = 126 - (ax >> 23), m = (ax & 0x7fffff) | 0x800000;
        h = m >> shift;
        rem = m & ((1u << shift) - 1);
        half = 1u << (shift - 1);
    } else { /* rebias the exponent; a carry out of the mantissa moves it up, as it should */
        h = (ax - 0x38000000) >> 13;
        rem = ax & 0x1fff;
        half = 0x1000;
    }
    if (rem > half || (rem == half && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

/* x as float16 bits where x is exactly a float16 value (Q4_0's m = -8 d, with d a float16);
 * -1 where it is not (|x| > 65504: d > 8188, weights of ~1e5 no model has). */
static int32_t f32_to_f16_exact(float x) {
    const uint16_t h = f32_to_f16(x);
    return f16_to_f32((const uint8_t *)&h) == x ? (int32_t)h : -1;
}

static int block_bytes(int qtype) { return qtype == 0 ? 18 : 20; }

/* the sha256 of this file a prebuilt library was compiled from (kernels/cpu_native.py passes it;
 * empty in the builds made on the user's machine, which the cache keys by source instead) */
#ifndef HEARTH_SOURCE_SHA256
#define HEARTH_SOURCE_SHA256 ""
#endif
const char *hearth_native_source(void) { return HEARTH_SOURCE_SHA256; }

int hearth_native_avx2(void) {
#ifdef HEARTH_AVX2
    return 1;
#else
    return 0;
#endif
}

void hearth_set_threads(int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

#ifdef HEARTH_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Denormals flushed to zero in this thread (MXCSR FTZ + DAZ) until restore_denormals: softmax
 * weights of far-off keys are tiny, and products with them turn subnormal, each costing a
 * microcode assist of ~100 cycles (the decode's attention ran 4x slower on real activations).
 * Values below 1e-38 change no float32 sum they are added to. */
static unsigned int flush_denormals(void) {
#if defined(__SSE__)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
    return csr;
#else
    return 0;
#endif
}

static void restore_denormals(unsigned int csr) {
#if defined(__SSE__)
    _mm_setcsr(csr);
#else
    (void)csr;
#endif
}

#ifdef HEARTH_AVX2
/* 8 values at element e of float32 or float16 data (half: a constant at each call), as floats */
static inline __attribute__((always_inline)) __m256 load8(const void *base, int64_t e, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + e)))
                : _mm256_loadu_ps((const float *)base + e);
}
#endif

/* a value of float32 or float16 data, as a float */
static inline float value_at(const void *base, int64_t e, int half) {
    return half ? f16_to_f32((const uint8_t *)((const uint16_t *)base + e))
                : ((const float *)base)[e];
}

/* a . b over n floats, a float32 or float16 (vectorised: the compiler may not reorder a float
 * sum by itself); the same operations in the same order for either */
static inline __attribute__((always_inline)) float dot_of(const void *a, int half,
                                                          const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#ifdef HEARTH_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(load8(a, i, half), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(load8(a, i + 8, half), _mm256_loadu_ps(b + i + 8), acc1);
    }
    s = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += value_at(a, i, half) * b[i];
    return s;
}

static inline float dot(const float *a, const float *b, int64_t n) { return dot_of(a, 0, b, n); }

static inline float dot_h(const uint16_t *a, const float *b, int64_t n) {
    return dot_of(a, 1, b, n);
}

/* ---- GEMV input: a row of x prepared once for every weight row ----
 * Each block of 32 inputs is rounded to int16 (absmax / 32767), and each int16 value split into
 * bytes, x = 256 hi + lo (hi signed, lo unsigned), so a block's integer dot product with the
 * nibbles is 256 (q . hi) + (q . lo): four vpmaddubsw a pair of blocks, the same integer as the
 * int16 product, ~25% fewer cycles than widening the nibbles to int16 for vpmaddwd (the GEMV is
 * compute-bound at one token: 2 ns a block of 32 on a Zen 3 core).
 * The bytes go by pairs of blocks (b, b + 1), as one 32-byte load of a row's nibbles holds
 * them: [elements 0..15 of b | 0..15 of b + 1] then [16..31 of b | 16..31 of b + 1], 64 bytes of
 * hi and 64 of lo a pair; an odd last block pairs with zeros. */

typedef struct {
    int8_t *hi;
    uint8_t *lo; /* (pairs * 64,) */
    float *scale, *sum; /* (2 pairs,): each block's int16 scale and float sum */
} q_input;

static int64_t pairs_of(int64_t k) { return (k / QK + 1) / 2; }

static q_input input_alloc(int64_t k) {
    const size_t pairs = (size_t)pairs_of(k);
    q_input in;
    in.hi = (int8_t *)malloc(pairs * 64);
    in.lo = (uint8_t *)malloc(pairs * 64);
    in.scale = (float *)malloc(sizeof(float) * pairs * 2);
    in.sum = (float *)malloc(sizeof(float) * pairs * 2);
    return in;
}

static void input_free(q_input *in) {
    free(in->hi);
    free(in->lo);
    free(in->scale);
    free(in->sum);
}

/* block xb's 32 inputs as int16 (q[0..31], rounded to nearest even, as lrintf); returns the int16
 * scale d and sets *s to the block's float sum */
static float block_round(const float *xb, int16_t *q, float *s) {
#ifdef HEARTH_AVX2
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    const __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0),
                                                  _mm256_andnot_ps(sign, v1)),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v2),
                                                  _mm256_andnot_ps(sign, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    *s = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
    const float d = amax / 32767.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    /* packs interleaves 128-bit lanes, permute restores */
    const __m256i q01 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)),
                                           _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid)));
    const __m256i q23 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)),
                                           _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid)));
    _mm256_storeu_si256((__m256i *)q, _mm256_permute4x64_epi64(q01, 0xd8));
    _mm256_storeu_si256((__m256i *)(q + 16), _mm256_permute4x64_epi64(q23, 0xd8));
#else
    float amax = 0.0f, sum = 0.0f;
    for (int j = 0; j < QK; j++) {
        amax = fabsf(xb[j]) > amax ? fabsf(xb[j]) : amax;
        sum += xb[j];
    }
    *s = sum;
    const float d = amax / 32767.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < QK; j++) q[j] = (int16_t)lrintf(xb[j] * id);
#endif
    return d;
}

static void input_prepare(const float *x, int64_t k, q_input *in) {
    const int64_t nb = k / QK;
    for (int64_t p = 0; p < pairs_of(k); p++) {
        int16_t q[2][QK] = {{0}};
        float d[2] = {0.0f, 0.0f}, s[2] = {0.0f, 0.0f};
        for (int64_t u = 0; u < 2 && 2 * p + u < nb; u++)
            d[u] = block_round(x + (2 * p + u) * QK, q[u], &s[u]);
        for (int u = 0; u < 2; u++) {
            in->scale[2 * p + u] = d[u];
            in->sum[2 * p + u] = s[u];
        }
        int8_t *hi = in->hi + p * 64;
        uint8_t *lo = in->lo + p * 64;
#ifdef HEARTH_AVX2
        const __m256i mask = _mm256_set1_epi16(0xff);
        for (int h = 0; h < 2; h++) { /* elements 0..15, then 16..31 */
            const __m256i a = _mm256_loadu_si256((const __m256i *)(q[0] + 16 * h));
            const __m256i b = _mm256_loadu_si256((const __m256i *)(q[1] + 16 * h));
            _mm256_storeu_si256((__m256i *)(hi + 32 * h), _mm256_permute4x64_epi64(
                _mm256_packs_epi16(_mm256_srai_epi16(a, 8), _mm256_srai_epi16(b, 8)), 0xd8));
            _mm256_storeu_si256((__m256i *)(lo + 32 * h), _mm256_permute4x64_epi64(
                _mm256_packus_epi16(_mm256_and_si256(a, mask), _mm256_and_si256(b, mask)),
                0xd8));
        }
#else
        for (int h = 0; h < 2; h++)
            for (int u = 0; u < 2; u++)
                for (int j = 0; j < 16; j++) {
                    const int16_t v = q[u][16 * h + j];
                    hi[32 * h + 16 * u + j] = (int8_t)(v >> 8);
                    lo[32 * h + 16 * u + j] = (uint8_t)(v & 0xff);
                }
#endif
    }
}

/* ---- Native rows: a Q4_0 / Q4_1 row repacked once at load ----
 * float16 d[nb], float16 m[nb], u8 qs[nb][16] (20 bytes a block, Q4_1's size): eight scales
 * converted by one instruction, the m_b sum(x_b) term a vector dot product, and one format for
 * both types (Q4_0: m = -8 d, exactly: q d - 8 d and (q - 8) d are the same float). The GEMV
 * reads fewer bytes than with float32 scales (24 bytes a block; 8% slower). */
#define ROW_BYTES(nb) ((nb) * 20)

/* ds[b] = d[b] * (x's int16 scale of block b): each block's factor on its integer dot; ds[nb]
 * = 0 (an odd last block's partner) */
static void block_factors(const uint16_t *d, const float *xs, int64_t nb, float *ds) {
    int64_t b = 0;
#ifdef HEARTH_AVX2
    for (; b + 8 <= nb; b += 8)
        _mm256_storeu_ps(ds + b, _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b))), _mm256_loadu_ps(xs + b)));
#endif
    for (; b < nb; b++) ds[b] = f16_to_f32((const uint8_t *)(d + b)) * xs[b];
    ds[nb] = 0.0f;
}

/* Returns the number of Q4_0 blocks whose m = -8 d is not a float16 (none in a real model). */
int64_t hearth_q4_repack(int qtype, const uint8_t *w, int64_t n, int64_t k, uint8_t *out) {
    const int64_t nb = k / QK;
    const int bs = block_bytes(qtype);
    int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
    for (int64_t r = 0; r < n; r++) {
        uint8_t *d = out + r * ROW_BYTES(nb), *m = d + 2 * nb, *qs = m + 2 * nb;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + (r * nb + b) * bs;
            memcpy(d + 2 * b, blk, 2);
            if (qtype == 0) {
                const int32_t h = f32_to_f16_exact(-8.0f * f16_to_f32(blk));
                bad += h < 0;
                const uint16_t hv = (uint16_t)(h < 0 ? 0 : h);
                memcpy(m + 2 * b, &hv, 2);
                memcpy(qs + b * 16, blk + 2, 16);
            } else {
                memcpy(m + 2 * b, blk + 2, 2);
                memcpy(qs + b * 16, blk + 4, 16);
            }
        }
    }
    return bad;
}

#ifdef HEARTH_AVX2
/* The nibbles of blocks (b, b + 1) of a row: lo4 holds elements 0..15 of each (128-bit lane 0:
 * b), hi4 elements 16..31. A last odd block: zeros for its partner, read no further than the
 * row. */
static inline void load_pair(const uint8_t *qs, int64_t b, int64_t nb, __m256i *lo4,
                             __m256i *hi4) {
    const __m256i raw = b + 1 < nb ? _mm256_loadu_si256((const __m256i *)(qs + b * 16))
                                   : _mm256_inserti128_si256(_mm256_setzero_si256(),
                                         _mm_loadu_si128((const __m128i *)(qs + b * 16)), 0);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    *lo4 = _mm256_and_si256(raw, low4);
    *hi4 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
}

/* blocks (b, b + 1) of a row against one prepared input: their integer dots (block b's in
 * lanes 0..3, b + 1's in 4..7) times ds, into *acc */
static inline __attribute__((always_inline)) void pair_dot(__m256i lo4, __m256i hi4,
                                                           const float *ds, const q_input *in,
                                                           int64_t b, __m256 *acc) {
    const __m256i *xh = (const __m256i *)(in->hi + b * 32);
    const __m256i *xl = (const __m256i *)(in->lo + b * 32);
    const __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(lo4, _mm256_loadu_si256(xh)),
                                        _mm256_maddubs_epi16(hi4, _mm256_loadu_si256(xh + 1)));
    const __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256(xl), lo4),
                                        _mm256_maddubs_epi16(_mm256_loadu_si256(xl + 1), hi4));
    const __m256i t = _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(256)),
                                       _mm256_madd_epi16(pl, _mm256_set1_epi16(1)));
    const __m256 f = _mm256_permutevar8x32_ps(
        _mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(ds + b)))),
        _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    *acc = _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(t), *acc);
}
#endif

/* one native row (nb blocks) against a prepared input: the dot product */
static float row_dot(const uint8_t *row, int64_t nb, const q_input *in) {
    const uint16_t *d = (const uint16_t *)row, *m = d + nb;
    const uint8_t *qs = (const uint8_t *)(m + nb);
    float ds[nb + 1];
    block_factors(d, in->scale, nb, ds);
    const float mterm = dot_h(m, in->sum, nb);
#ifdef HEARTH_AVX2
    __m256 acc = _mm256_setzero_ps(); /* one chain: a pair's work hides the FMA's latency */
    __m256i lo4, hi4;
    for (int64_t b = 0; b < nb; b += 2) {
        load_pair(qs, b, nb, &lo4, &hi4);
        pair_dot(lo4, hi4, ds, in, b, &acc);
    }
    return hsum(acc) + mterm;
#else
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = qs + b * 16;
        const int8_t *hi = in->hi + (b / 2) * 64 + (b % 2) * 16;
        const uint8_t *lo = in->lo + (b / 2) * 64 + (b % 2) * 16;
        int32_t p = 0;
        for (int j = 0; j < 16; j++)
            p += (q[j] & 15) * (hi[j] * 256 + lo[j]) +
                 (q[j] >> 4) * (hi[j + 32] * 256 + lo[j + 32]);
        acc += ds[b] * (float)p;
    }
    return acc + mterm;
#endif
}

#ifdef HEARTH_AVX2
/* row_dot for four prepared inputs at once, each pair of blocks unpacked once for all four: the
 * same operations in the same order for each input as row_dot, so the same bits. */
static void row_dot4(const uint8_t *row, int64_t nb, const q_input *in, float *out) {
    const uint16_t *d = (const uint16_t *)row, *m = d + nb;
    const uint8_t *qs = (const uint8_t *)(m + nb);
    float ds[4][nb + 1], mterm[4];
    __m256 acc[4];
    for (int i = 0; i < 4; i++) {
        block_factors(d, in[i].scale, nb, ds[i]);
        mterm[i] = dot_h(m, in[i].sum, nb);
        acc[i] = _mm256_setzero_ps();
    }
    __m256i lo4, hi4;
    for (int64_t b = 0; b < nb; b += 2) {
        load_pair(qs, b, nb, &lo4, &hi4);
        for (int i = 0; i < 4; i++) pair_dot(lo4, hi4, ds[i], &in[i], b, &acc[i]);
    }
    for (int i = 0; i < 4; i++) out[i] = hsum(acc[i]) + mterm[i];
}
#endif

/* y (m, n), row stride ldy = W (n, k, native rows) @ the m prepared inputs, inside a parallel
 * region: the weight rows shared among the threads; each row of y is what row_dot gives it
 * alone. */
static void mgemv_rows(const uint8_t *w, int64_t n, int64_t k, float *y, int64_t ldy,
                       const q_input *in, int64_t m) {
    const int64_t nb = k / QK, stride = ROW_BYTES(nb);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        int64_t i = 0;
#ifdef HEARTH_AVX2
        for (; i + 4 <= m; i += 4) {
            float out[4];
            row_dot4(w + r * stride, nb, in + i, out);
            for (int j = 0; j < 4; j++) y[(i + j) * ldy + r] = out[j];
        }
#endif
        for (; i < m; i++) y[i * ldy + r] = row_dot(w + r * stride, nb, &in[i]);
    }
}

/* ---- Entry points for the engine's linears (GGUFLinear.native_rows) ---- */

/* y (m, n) = x (m, k) @ W^T, W (n, k) in native rows (k % 32 == 0). Each row of x is prepared
 * once; every weight row then meets all of them, and each row's result is the one it gets alone
 * (decode, verification and small batches give the same numbers for the same row). */
void hearth_q4_matmul(const uint8_t *w, int64_t n, int64_t k, const float *x, int64_t m,
                      float *y) {
    q_input *in = (q_input *)malloc(sizeof(q_input) * (size_t)m);
    for (int64_t i = 0; i < m; i++) in[i] = input_alloc(k);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) input_prepare(x + i * k, k, &in[i]);
        mgemv_rows(w, n, k, y, n, in, m);
    }
    for (int64_t i = 0; i < m; i++) input_free(&in[i]);
    free(in);
}

/* W (n, k) in float32 from native rows: q d + m, as gguf_blocks.dequantize rounds the file's
 * blocks (prompts multiply the layer dequantized). */
void hearth_q4_dequantize(const uint8_t *w, int64_t n, int64_t k, float *out) {
    const int64_t nb = k / QK;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *d = w + r * ROW_BYTES(nb), *m = d + 2 * nb, *qs = m + 2 * nb;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = qs + b * 16;
            const float db = f16_to_f32(d + 2 * b), mb = f16_to_f32(m + 2 * b);
            float *o = out + r * k + b * QK;
#ifdef HEARTH_AVX2
            /* the same q d + m (a multiply, then an add: no FMA), 8 at a time */
            const __m128i raw = _mm_loadu_si128((const __m128i *)q);
            const __m128i low4 = _mm_set1_epi8(0x0f);
            const __m128i nib[2] = {_mm_and_si128(raw, low4),
                                    _mm_and_si128(_mm_srli_epi16(raw, 4), low4)};
            const __m256 vd = _mm256_set1_ps(db), vm = _mm256_set1_ps(mb);
            for (int h = 0; h < 2; h++) { /* elements 0..15 (low nibbles), then 16..31 */
                const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nib[h]));
                const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                    _mm_srli_si128(nib[h], 8)));
                _mm256_storeu_ps(o + 16 * h, _mm256_add_ps(_mm256_mul_ps(q0, vd), vm));
                _mm256_storeu_ps(o + 16 * h + 8, _mm256_add_ps(_mm256_mul_ps(q1, vd), vm));
            }
            continue;
#endif
            for (int j = 0; j < 16; j++) {
                o[j] = (float)(q[j] & 15) * db + mb;
                o[j + 16] = (float)(q[j] >> 4) * db + mb;
            }
        }
    }
}

/* ---- Decode tokens through a Llama-family decoder, one for each of m sequences ----
 * The whole forward in one call: no per-op dispatch. Per layer, as engine/models/llama.py
 * computes it: h = rmsnorm(res); q, k, v = qkv(h); rotary (neox halves) on q, k; k, v into the
 * paged cache; attention over the sequence's positions 0..len-1; res += o(attn);
 * h = rmsnorm(res); res += down(silu(gate) * up). Finally out = rmsnorm(res) with the last norm. */

typedef struct {
    const uint8_t *qkv, *o, *gate_up, *down; /* native rows (hearth_q4_repack) */
    const float *input_norm, *post_norm; /* (hidden,) */
    void *k_cache, *v_cache; /* (num_blocks, block_size, kv_heads, head_dim), float32 or 16 */
} hearth_layer;

typedef struct {
    int64_t hidden, intermediate, num_heads, num_kv_heads, head_dim, block_size;
    int64_t kv_half; /* 1: the caches hold float16 (llama.cpp's default), 0: float32 */
    float eps, scale;
} hearth_dims;

/* n floats into float16 (round to nearest even) */
static void store_half(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
#ifdef HEARTH_AVX2
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) out[i] = f32_to_f16(x[i]);
}

/* store_half for the tests (the K/V writes' rounding against torch's) */
void hearth_f32_to_f16(const float *x, int64_t n, uint16_t *out) { store_half(x, n, out); }

static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    const float s = dot(x, x, n);
    const float r = 1.0f / sqrtf(s / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* x += y over n floats */
static void add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* x (heads, head_dim) rotated in place: x * cos + rotate_half(x) * sin, cos/sin (head_dim,) */
static void rotate(float *x, int64_t heads, int64_t dim, const float *cos, const float *sin) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * dim;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

#ifdef HEARTH_AVX2
static inline __m256 exp256(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504019f);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

static inline float exp_sub_sum(float *x, int64_t n, float m) {
    int64_t i = 0;
    float s = 0.0f;
#ifdef HEARTH_AVX2
    __m256 acc = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    s = hsum(acc);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    return s;
}

/* out = silu(gate) * up = gate / (1 + exp(-gate)) * up over n floats */
static void silu_mul(const float *gate, const float *up, int64_t n, float *out) {
    int64_t i = 0;
#ifdef HEARTH_AVX2
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp256(_mm256_xor_ps(g, sign));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)),
                                                _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#ifdef HEARTH_AVX2
/* Scores of 4 keys (element offsets at[0..3] in the cache) against jn (1..3) query heads of a
 * GQA group: 4 jn independent accumulator chains, each key's 8 values loaded (and converted)
 * once for the jn heads. q holds the heads' queries (jn, dim); out[j * ostride + u] =
 * scale * q_j . k_u. Called with constant jn and half, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void scores4(const float *q, int64_t dim,
                                                          const void *k, const int64_t *at,
                                                          int half, int jn, float scale,
                                                          float *out, int64_t ostride) {
    __m256 a[3][4];
    for (int j = 0; j < jn; j++)
        for (int u = 0; u < 4; u++) a[j][u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += 8) {
        const __m256 k0 = load8(k, at[0] + d, half), k1 = load8(k, at[1] + d, half);
        const __m256 k2 = load8(k, at[2] + d, half), k3 = load8(k, at[3] + d, half);
        for (int j = 0; j < jn; j++) {
            const __m256 qv = _mm256_loadu_ps(q + j * dim + d);
            a[j][0] = _mm256_fmadd_ps(qv, k0, a[j][0]);
            a[j][1] = _mm256_fmadd_ps(qv, k1, a[j][1]);
            a[j][2] = _mm256_fmadd_ps(qv, k2, a[j][2]);
            a[j][3] = _mm256_fmadd_ps(qv, k3, a[j][3]);
        }
    }
    for (int j = 0; j < jn; j++) { /* the four horizontal sums at once */
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[j][0], a[j][1]),
                                        _mm256_hadd_ps(a[j][2], a[j][3]));
        const __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(out + j * ostride, _mm_mul_ps(s, _mm_set1_ps(scale)));
    }
}

/* o_j[d0 : d0 + 32] = sum over the n keys of p_j[u] v_u[d0 : d0 + 32], for jn (1..3) heads of a
 * group at once: each value row read (and converted) once for the group, 4 jn accumulators in
 * registers (constant jn and half). p_j = p + j * n, o_j = o + j * dim. */
static inline __attribute__((always_inline)) void values32(const float *p, const void *v,
                                                           const int64_t *at, int64_t n,
                                                           int64_t d0, int half, int jn,
                                                           float *o, int64_t dim) {
    __m256 a[3][4];
    for (int j = 0; j < jn; j++)
        for (int i = 0; i < 4; i++) a[j][i] = _mm256_setzero_ps();
    for (int64_t u = 0; u < n; u++) {
        const int64_t e = at[u] + d0;
        const __m256 v0 = load8(v, e, half), v1 = load8(v, e + 8, half);
        const __m256 v2 = load8(v, e + 16, half), v3 = load8(v, e + 24, half);
        for (int j = 0; j < jn; j++) {
            const __m256 w = _mm256_broadcast_ss(p + j * n + u);
            a[j][0] = _mm256_fmadd_ps(w, v0, a[j][0]);
            a[j][1] = _mm256_fmadd_ps(w, v1, a[j][1]);
            a[j][2] = _mm256_fmadd_ps(w, v2, a[j][2]);
            a[j][3] = _mm256_fmadd_ps(w, v3, a[j][3]);
        }
    }
    for (int j = 0; j < jn; j++)
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + j * dim + d0 + 8 * i, a[j][i]);
}

/* the same for 8 values at d0 and one head (head dims that are not a multiple of 32) */
static inline __attribute__((always_inline)) void values8(const float *p, const void *v,
                                                          const int64_t *at, int64_t n,
                                                          int64_t d0, int half, float *o) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t u = 0; u < n; u++)
        a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + u), load8(v, at[u] + d0, half), a);
    _mm256_storeu_ps(o + d0, a);
}

static inline float max_of(const float *x, int64_t n) {
    int64_t i = 0;
    float m = -INFINITY;
    if (n >= 8) {
        __m256 v = _mm256_loadu_ps(x);
        for (i = 8; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
        __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        s = _mm_max_ss(s, _mm_movehdup_ps(s));
        m = _mm_cvtss_f32(s);
    }
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* the scores of a chunk: every 4 keys through scores4 (constant jn and half) */
static inline __attribute__((always_inline)) void chunk_scores(const float *q, const void *k,
                                                               const int64_t *at, int64_t n4,
                                                               int64_t n, int64_t group,
                                                               int64_t dim, int half,
                                                               float scale, float *scores) {
    for (int64_t u = 0; u < n4; u += 4)
        for (int64_t j = 0; j < group; j += 3) {
            const int left = (int)(group - j);
            float *out = scores + j * n + u;
            if (left >= 3) scores4(q + j * dim, dim, k, at + u, half, 3, scale, out, n);
            else if (left == 2) scores4(q + j * dim, dim, k, at + u, half, 2, scale, out, n);
            else scores4(q + j * dim, dim, k, at + u, half, 1, scale, out, n);
        }
}

/* the weighted values of a chunk: 32 dims at a time for up to 3 heads, then 8 (constants) */
static inline __attribute__((always_inline)) void chunk_values(const float *p, const void *v,
                                                               const int64_t *at, int64_t n,
                                                               int64_t group, int64_t dim,
                                                               int half, float *acc) {
    for (int64_t j = 0; j < group; j += 3) {
        const int left = (int)(group - j);
        const float *pj = p + j * n;
        float *oj = acc + j * dim;
        int64_t d = 0;
        for (; d + 32 <= dim; d += 32) {
            if (left >= 3) values32(pj, v, at, n, d, half, 3, oj, dim);
            else if (left == 2) values32(pj, v, at, n, d, half, 2, oj, dim);
            else values32(pj, v, at, n, d, half, 1, oj, dim);
        }
        for (; d < dim; d += 8)
            for (int jj = 0; jj < (left < 3 ? left : 3); jj++)
                values8(pj + jj * n, v, at, n, d, half, oj + jj * dim);
    }
}
#endif

/* Attention of one decode token, split as flash-decoding does: task (kv head, chunk of keys)
 * scores the GQA group's query heads against each key it loads, and leaves each head's
 * running max, sum of exp and unnormalised output in `part`; `combine` merges the chunks.
 * The cache holds float32 or float16 (dm->kv_half), converted as it is read. A token's scores
 * depend on its own context length only (the 4-key groups start at t0), so its output is the
 * same bits alone, in a batch, or as a verified speculative token. */
static void attend_chunk(const float *q, const void *k_cache, const void *v_cache,
                         const int32_t *table, int64_t t0, int64_t t1, int64_t kv_head,
                         int64_t group, const hearth_dims *dm, float *scores, float *part) {
    const int64_t dim = dm->head_dim, bsz = dm->block_size, kvh = dm->num_kv_heads;
    const int64_t n = t1 - t0, row = kvh * dim; /* elements from one key's row to the next */
    const int half = (int)dm->kv_half;
    float *mx = part, *sum = part + group, *acc = part + 2 * group; /* acc: (group, dim) */
    /* each key's element offset in the caches, walking the block table a block at a time (a
     * division a key cost as much as the key's dot products) */
    int64_t at[KEY_CHUNK];
    for (int64_t t = t0; t < t1;) {
        const int64_t off = t % bsz, run = (bsz - off < t1 - t ? bsz - off : t1 - t);
        const int64_t base = ((int64_t)table[t / bsz] * bsz + off) * row + kv_head * dim;
        for (int64_t u = 0; u < run; u++) at[t - t0 + u] = base + u * row;
        t += run;
    }
    int64_t u = 0;
#ifdef HEARTH_AVX2
    const int vec = dim % 8 == 0 && dim <= 256;
    if (vec) {
        u = n / 4 * 4;
        if (half) chunk_scores(q, k_cache, at, u, n, group, dim, 1, dm->scale, scores);
        else chunk_scores(q, k_cache, at, u, n, group, dim, 0, dm->scale, scores);
    }
#else
    const int vec = 0;
#endif
    for (; u < n; u++) /* the last keys of a context (and other CPUs): one at a time */
        for (int64_t j = 0; j < group; j++) {
            float s = 0.0f;
            for (int64_t i = 0; i < dim; i++)
                s += q[j * dim + i] * value_at(k_cache, at[u] + i, half);
            scores[j * n + u] = s * dm->scale;
        }
    for (int64_t j = 0; j < group; j++) {
#ifdef HEARTH_AVX2
        mx[j] = max_of(scores + j * n, n);
#else
        mx[j] = -INFINITY;
        for (int64_t i = 0; i < n; i++) mx[j] = fmaxf(mx[j], scores[j * n + i]);
#endif
    }
    for (int64_t j = 0; j < group; j++) sum[j] = exp_sub_sum(scores + j * n, n, mx[j]);
#ifdef HEARTH_AVX2
    if (vec) {
        if (half) chunk_values(scores, v_cache, at, n, group, dim, 1, acc);
        else chunk_values(scores, v_cache, at, n, group, dim, 0, acc);
        return;
    }
#endif
    (void)vec;
    for (int64_t j = 0; j < group; j++) {
        float *o = acc + j * dim;
        const float *p = scores + j * n;
        for (int64_t i = 0; i < dim; i++) o[i] = 0.0f;
        for (int64_t w = 0; w < n; w++)
            for (int64_t i = 0; i < dim; i++) o[i] += p[w] * value_at(v_cache, at[w] + i, half);
    }
}

/* out (dim,) of query head j of a group from its chunks' partials */
static void combine(const float *parts, int64_t chunks, int64_t group, int64_t j, int64_t dim,
                    float *out) {
    const int64_t stride = group * (dim + 2);
    float m = -INFINITY, total = 0.0f;
    for (int64_t c = 0; c < chunks; c++) m = parts[c * stride + j] > m ? parts[c * stride + j] : m;
    for (int64_t i = 0; i < dim; i++) out[i] = 0.0f;
    for (int64_t c = 0; c < chunks; c++) {
        const float *p = parts + c * stride;
        if (p[group + j] == 0.0f) continue; /* an empty chunk */
        const float w = expf(p[j] - m);
        total += w * p[group + j];
        for (int64_t i = 0; i < dim; i++) out[i] += w * p[2 * group + j * dim + i];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < dim; i++) out[i] *= inv;
}

/* m decode tokens, one for each of m sequences. res (m, hidden): in, the tokens' embeddings;
 * out, the final norm's outputs. cos/sin (m, head_dim): each token's rotary row. Sequence i's
 * block table is tables[i * table_stride ...], its context after this token lens[i] (the token
 * sits at position lens[i] - 1) and its K/V go to cache slot slots[i]. Returns 0. */
int hearth_decode(const hearth_layer *layers, int64_t num_layers, const hearth_dims *dm,
                  const float *final_norm, float *res, const float *cos, const float *sin,
                  const int32_t *tables, int64_t table_stride, const int64_t *lens,
                  const int64_t *slots, int64_t m) {
    const int64_t hd = dm->hidden, inter = dm->intermediate, dim = dm->head_dim;
    const int64_t nh = dm->num_heads, kvh = dm->num_kv_heads, group = nh / kvh;
    const int64_t qsz = nh * dim, kvsz = kvh * dim, wide = hd > inter ? hd : inter;
    const int64_t big = (2 * inter > qsz + 2 * kvsz ? 2 * inter : qsz + 2 * kvsz);
    /* attention tasks: (token, KV head, chunk of KEY_CHUNK keys). The chunks depend on the
     * context length only, never on the thread count or the other tokens of the step: a token's
     * output is the same bits alone, in a batch, or as a verified speculative token. */
    int64_t *chunks = (int64_t *)malloc(sizeof(int64_t) * (size_t)m);
    int64_t *first_task = (int64_t *)malloc(sizeof(int64_t) * (size_t)(m + 1));
    int64_t *score_at = (int64_t *)malloc(sizeof(int64_t) * (size_t)(m + 1));
    first_task[0] = score_at[0] = 0;
    for (int64_t i = 0; i < m; i++) {
        chunks[i] = lens[i] > 0 ? (lens[i] + KEY_CHUNK - 1) / KEY_CHUNK : 1;
        first_task[i + 1] = first_task[i] + kvh * chunks[i];
        score_at[i + 1] = score_at[i] + nh * lens[i];
    }
    const int64_t tasks = first_task[m];
    float *h = (float *)malloc(sizeof(float) * (size_t)(m * wide));
    float *buf = (float *)malloc(sizeof(float) * (size_t)(m * big));
    float *attn = (float *)malloc(sizeof(float) * (size_t)(m * qsz));
    float *tmp = (float *)malloc(sizeof(float) * (size_t)(m * hd));
    float *scores = (float *)malloc(sizeof(float) * (size_t)score_at[m]);
    float *parts = (float *)malloc(sizeof(float) * (size_t)(tasks * group * (dim + 2)));
    q_input *in = (q_input *)malloc(sizeof(q_input) * (size_t)m);
    for (int64_t i = 0; i < m; i++) in[i] = input_alloc(wide);
#pragma omp parallel
    {
        const unsigned int csr = flush_denormals();
        for (int64_t l = 0; l < num_layers; l++) {
            const hearth_layer *L = &layers[l];
            /* each loop over the m tokens ends in the input the next GEMV reads (one barrier) */
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; i++) {
                if (l > 0) add(res + i * hd, tmp + i * hd, hd); /* the last layer's MLP */
                rms_norm(res + i * hd, L->input_norm, dm->eps, hd, h + i * wide);
                input_prepare(h + i * wide, hd, &in[i]);
            }
            mgemv_rows(L->qkv, qsz + 2 * kvsz, hd, buf, big, in, m);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; i++) {
                float *row = buf + i * big;
                rotate(row, nh + kvh, dim, cos + i * dim, sin + i * dim); /* q, k heads adjacent */
                if (dm->kv_half) {
                    store_half(row + qsz, kvsz, (uint16_t *)L->k_cache + slots[i] * kvsz);
                    store_half(row + qsz + kvsz, kvsz, (uint16_t *)L->v_cache + slots[i] * kvsz);
                } else {
                    memcpy((float *)L->k_cache + slots[i] * kvsz, row + qsz,
                           sizeof(float) * (size_t)kvsz);
                    memcpy((float *)L->v_cache + slots[i] * kvsz, row + qsz + kvsz,
                           sizeof(float) * (size_t)kvsz);
                }
            }
#pragma omp for schedule(dynamic)
            for (int64_t task = 0; task < tasks; task++) {
                int64_t i = 0;
                while (first_task[i + 1] <= task) i++;
                const int64_t local = task - first_task[i], len = lens[i], nc = chunks[i];
                const int64_t kv_head = local / nc, c = local % nc;
                const int64_t t0 = c * KEY_CHUNK < len ? c * KEY_CHUNK : len;
                const int64_t t1 = (c + 1) * KEY_CHUNK < len ? (c + 1) * KEY_CHUNK : len;
                attend_chunk(buf + i * big + kv_head * group * dim, L->k_cache, L->v_cache,
                             tables + i * table_stride, t0, t1, kv_head, group, dm,
                             scores + score_at[i] + kv_head * group * len + group * t0,
                             parts + task * group * (dim + 2));
            }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; i++) {
                for (int64_t head = 0; head < nh; head++)
                    combine(parts + (first_task[i] + (head / group) * chunks[i]) * group *
                            (dim + 2), chunks[i], group, head % group, dim,
                            attn + i * qsz + head * dim);
                input_prepare(attn + i * qsz, qsz, &in[i]);
            }
            mgemv_rows(L->o, hd, qsz, tmp, hd, in, m);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; i++) {
                add(res + i * hd, tmp + i * hd, hd);
                rms_norm(res + i * hd, L->post_norm, dm->eps, hd, h + i * wide);
                input_prepare(h + i * wide, hd, &in[i]);
            }
            mgemv_rows(L->gate_up, 2 * inter, hd, buf, big, in, m);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < m; i++) {
                silu_mul(buf + i * big, buf + i * big + inter, inter, h + i * wide);
                input_prepare(h + i * wide, inter, &in[i]);
            }
            mgemv_rows(L->down, hd, inter, tmp, hd, in, m);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            add(res + i * hd, tmp + i * hd, hd); /* the last layer's MLP */
            rms_norm(res + i * hd, final_norm, dm->eps, hd, tmp + i * hd);
            memcpy(res + i * hd, tmp + i * hd, sizeof(float) * (size_t)hd);
        }
        restore_denormals(csr);
    }
    for (int64_t i = 0; i < m; i++) input_free(&in[i]);
    free(in);
    free(h);
    free(buf);
    free(attn);
    free(tmp);
    free(scores);
    free(parts);
    free(chunks);
    free(first_task);
    free(score_at);
    return 0;
}

/* ---- int8 rows (the LM head, engine/quantization/cpu_int8.py) ----
 * y (m, n) = x (m, k) @ (W * scale[:, None])^T with W (n, k) int8 and x rounded to int8 per
 * block of 32 (absmax / 127, as llama.cpp's Q8_0 activations): integer dot products a block.
 * The caller refines each row's top logits in float32, so this rounding never picks a token. */
static void quantize_q8(const float *x, int64_t count, int8_t *xq, float *xd) {
    for (int64_t b = 0; b < count / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fabsf(xb[j]) > amax ? fabsf(xb[j]) : amax;
        const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < QK; j++) xq[b * QK + j] = (int8_t)lrintf(xb[j] * id);
        xd[b] = d;
    }
}

void hearth_i8_matmul(const int8_t *w, const float *scales, int64_t n, int64_t k, const float *x,
                      int64_t m, float *y) {
    const int64_t nb = k / QK;
    int8_t *xq = (int8_t *)malloc((size_t)(m * k));
    float *xd = (float *)malloc(sizeof(float) * (size_t)(m * nb));
    quantize_q8(x, m * k, xq, xd);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const int8_t *row = w + r * k;
        for (int64_t i = 0; i < m; i++) {
            const int8_t *xi = xq + i * k;
            const float *di = xd + i * nb;
#ifdef HEARTH_AVX2
            __m256 acc = _mm256_setzero_ps();
            const __m256i ones = _mm256_set1_epi16(1);
            for (int64_t b = 0; b < nb; b++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(row + b * QK));
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xi + b * QK));
                /* |w| * (x with w's sign): maddubs takes unsigned x signed */
                const __m256i p = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(di[b]), _mm256_cvtepi32_ps(p), acc);
            }
            y[i * n + r] = hsum(acc) * scales[r];
#else
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t p = 0;
                for (int j = 0; j < QK; j++) p += (int32_t)row[b * QK + j] * xi[b * QK + j];
                acc += di[b] * (float)p;
            }
            y[i * n + r] = acc * scales[r];
#endif
        }
    }
    free(xq);
    free(xd);
}

/* The LM head's logits: hearth_i8_matmul's, then each row's top `refined` (at most 16)
 * recomputed in float32 from the same int8 rows and scales, as cpu_int8.logits does with torch
 * ops: greedy choices and the top of the distribution carry float32 precision. */
void hearth_i8_logits(const int8_t *w, const float *scales, int64_t n, int64_t k, const float *x,
                      int64_t m, float *y, int64_t refined) {
    hearth_i8_matmul(w, scales, n, k, x, m, y);
    if (refined > 16) refined = 16;
    if (refined > n) refined = n;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < m; i++) {
        float *yi = y + i * n;
        int64_t idx[16];
        float val[16];
        for (int64_t r = 0; r < refined; r++) {
            idx[r] = -1;
            val[r] = -INFINITY;
        }
        for (int64_t r = 0; r < n; r++) { /* the top `refined`, ties to the lower index */
            const float v = yi[r];
            if (!(v > val[refined - 1])) continue;
            int64_t at = refined - 1;
            while (at > 0 && v > val[at - 1]) {
                val[at] = val[at - 1];
                idx[at] = idx[at - 1];
                at--;
            }
            val[at] = v;
            idx[at] = r;
        }
        for (int64_t r = 0; r < refined; r++) {
            if (idx[r] < 0) continue;
            const int8_t *row = w + idx[r] * k;
            float s = 0.0f;
            for (int64_t j = 0; j < k; j++) s += (float)row[j] * x[i * k + j];
            yi[idx[r]] = s * scales[idx[r]];
        }
    }
}
