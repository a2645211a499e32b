/* Hearth's native CPU kernels: llama.cpp's Q4_0 / Q4_1 blocks read in place, float32 activations.
 *
 * Built on first use by kernels/cpu_native.py with the system C compiler (-O3 -march=native
 * -fopenmp) and loaded with ctypes; no Python or torch headers. The OpenMP runtime is the one
 * torch already loaded (same soname), so both share one thread pool.
 *
 * Block layout (llama.cpp, ggml-common.h), 32 weights a block:
 *   Q4_0: f16 d, u8 qs[16]           w = (q - 8) d
 *   Q4_1: f16 d, f16 m, u8 qs[16]    w = q d + m
 *   element j (0..15) is qs[j] & 15, element j + 16 is qs[j] >> 4.
 * Both are computed as w = q d + m (m = -8 d for Q4_0), so a row's dot product with x is
 *   sum over blocks b of d_b (q_b . x_b) + m_b sum(x_b).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define HEARTH_AVX2 1
#endif
#if defined(HEARTH_AVX2) || defined(__F16C__)
#include <immintrin.h>
#endif

#define QK 32

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

static int block_bytes(int qtype) { return qtype == 0 ? 18 : 20; }

/* d and m of one block; qs points at its 16 bytes of nibbles */
static const uint8_t *block_scales(int qtype, const uint8_t *blk, float *d, float *m) {
    *d = f16_to_f32(blk);
    if (qtype == 0) {
        *m = -8.0f * *d;
        return blk + 2;
    }
    *m = f16_to_f32(blk + 2);
    return blk + 4;
}

int hearth_native_version(void) { return 1; }

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
static inline __m256 f32_block(int qtype, const uint8_t *blk, const float *xb, float xs,
                               __m256 acc, float *accm) {
    float d, mn;
    const uint8_t *qs = block_scales(qtype, blk, &d, &mn);
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(raw, low4);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
    __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xb));
    __m256 p2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                              _mm256_loadu_ps(xb + 8));
    p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xb + 16), p);
    p2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                         _mm256_loadu_ps(xb + 24), p2);
    *accm += mn * xs;
    return _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_add_ps(p, p2), acc);
}
#endif


/* y (m, n) = x (m, k) @ W^T, W (n, k) in Q4 blocks, rows of k / 32 blocks. k % 32 == 0.
 * Rows of x go four at a time past each block, which is unpacked once for them. */
#define ROWS_A_PASS 4
void hearth_q4_matmul(int qtype, const uint8_t *w, int64_t n, int64_t k, const float *x,
                      int64_t m, float *y) {
    const int64_t nb = k / QK;
    const int bs = block_bytes(qtype);
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(m * nb));
    for (int64_t i = 0; i < m * nb; i++) {
        float s = 0.0f;
        for (int j = 0; j < QK; j++) s += x[i * QK + j];
        xsum[i] = s;
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = w + r * nb * bs;
        for (int64_t i0 = 0; i0 < m; i0 += ROWS_A_PASS) {
            const int mt = (int)(m - i0 < ROWS_A_PASS ? m - i0 : ROWS_A_PASS);
            /* rows past the end read row i0 again and are not stored */
            const int64_t r1 = mt > 1 ? i0 + 1 : i0, r2 = mt > 2 ? i0 + 2 : i0,
                          r3 = mt > 3 ? i0 + 3 : i0;
            float out[ROWS_A_PASS];
#ifdef HEARTH_AVX2
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            float m0 = 0.0f, m1 = 0.0f, m2 = 0.0f, m3 = 0.0f;
            const __m128i low4 = _mm_set1_epi8(0x0f);
            for (int64_t b = 0; b < nb; b++) {
                float d, mn;
                const uint8_t *qs = block_scales(qtype, row + b * bs, &d, &mn);
                const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
                const __m128i lo = _mm_and_si128(raw, low4);
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
                const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                const __m256 vd = _mm256_set1_ps(d);
#define HEARTH_ROW(acc, accm, ri)                                                              \
    do {                                                                                       \
        const float *xb = x + (ri) * k + b * QK;                                               \
        __m256 p = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));                                     \
        __m256 p2 = _mm256_mul_ps(w1, _mm256_loadu_ps(xb + 8));                                \
        p = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), p);                                  \
        p2 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), p2);                                \
        acc = _mm256_fmadd_ps(vd, _mm256_add_ps(p, p2), acc);                                  \
        accm += mn * xsum[(ri) * nb + b];                                                      \
    } while (0)
                HEARTH_ROW(a0, m0, i0);
                HEARTH_ROW(a1, m1, r1);
                HEARTH_ROW(a2, m2, r2);
                HEARTH_ROW(a3, m3, r3);
#undef HEARTH_ROW
            }
            out[0] = hsum(a0) + m0;
            out[1] = hsum(a1) + m1;
            out[2] = hsum(a2) + m2;
            out[3] = hsum(a3) + m3;
#else
            const int64_t rows[ROWS_A_PASS] = {i0, r1, r2, r3};
            for (int i = 0; i < ROWS_A_PASS; i++) {
                float acc = 0.0f, accm = 0.0f;
                for (int64_t b = 0; b < nb; b++) {
                    float d, mn;
                    const uint8_t *qs = block_scales(qtype, row + b * bs, &d, &mn);
                    const float *xb = x + rows[i] * k + b * QK;
                    float p = 0.0f;
                    for (int j = 0; j < 16; j++)
                        p += (float)(qs[j] & 15) * xb[j] + (float)(qs[j] >> 4) * xb[j + 16];
                    acc += d * p;
                    accm += mn * xsum[rows[i] * nb + b];
                }
                out[i] = acc + accm;
            }
#endif
            for (int i = 0; i < mt; i++) y[(i0 + i) * n + r] = out[i];
        }
    }
    free(xsum);
}

/* W (n, k) in float32 from its Q4 blocks, rounded as gguf_blocks.dequantize computes it:
 * Q4_0 (q - 8) d, Q4_1 q d + m. */
void hearth_q4_dequantize(int qtype, const uint8_t *w, int64_t n, int64_t k, float *out) {
    const int64_t nb = k / QK;
    const int bs = block_bytes(qtype);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        for (int64_t b = 0; b < nb; b++) {
            float d, mn;
            const uint8_t *qs = block_scales(qtype, w + (r * nb + b) * bs, &d, &mn);
            float *o = out + r * k + b * QK;
            if (qtype == 0) {
                for (int j = 0; j < 16; j++) {
                    o[j] = (float)((qs[j] & 15) - 8) * d;
                    o[j + 16] = (float)((qs[j] >> 4) - 8) * d;
                }
            } else {
                for (int j = 0; j < 16; j++) {
                    o[j] = (float)(qs[j] & 15) * d + mn;
                    o[j + 16] = (float)(qs[j] >> 4) * d + mn;
                }
            }
        }
    }
}



/* ---- One decode token through a Llama-family decoder (batch 1) ----
 * The whole forward in one call: no per-op dispatch. Per layer, as engine/models/llama.py
 * computes it: h = rmsnorm(res); q, k, v = qkv(h); rotary (neox halves) on q, k; k, v into the
 * paged cache at position pos; attention over positions 0..pos; res += o(attn);
 * h = rmsnorm(res); res += down(silu(gate) * up). Finally out = rmsnorm(res) with the last norm. */

typedef struct {
    const uint8_t *qkv, *o, *gate_up, *down; /* raw Q4 rows */
    int qkv_type, o_type, gate_up_type, down_type; /* 0: Q4_0, 1: Q4_1 */
    const float *input_norm, *post_norm; /* (hidden,) */
    float *k_cache, *v_cache; /* (num_blocks, block_size, kv_heads, head_dim) */
} hearth_layer;

typedef struct {
    int64_t hidden, intermediate, num_heads, num_kv_heads, head_dim, block_size;
    float eps, scale;
} hearth_dims;

/* a . b over n floats (vectorised: the compiler may not reorder a float sum by itself) */
static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#ifdef HEARTH_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    s = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    const float s = dot(x, x, n);
    const float r = 1.0f / sqrtf(s / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
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

/* Called by every thread of a parallel region: the block sums once, then the rows shared. */
static void gemv(int qtype, const uint8_t *w, int64_t n, int64_t k, const float *x, float *y,
                 float *xsum) {
    const int64_t nb = k / QK;
    const int bs = block_bytes(qtype);
#pragma omp single
    for (int64_t b = 0; b < nb; b++) {
        float s = 0.0f;
        for (int j = 0; j < QK; j++) s += x[b * QK + j];
        xsum[b] = s;
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = w + r * nb * bs;
#ifdef HEARTH_AVX2
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        float m0 = 0.0f, m1 = 0.0f;
        int64_t b = 0;
        for (; b + 1 < nb; b += 2) {
            a0 = f32_block(qtype, row + b * bs, x + b * QK, xsum[b], a0, &m0);
            a1 = f32_block(qtype, row + (b + 1) * bs, x + (b + 1) * QK, xsum[b + 1], a1, &m1);
        }
        if (b < nb) a0 = f32_block(qtype, row + b * bs, x + b * QK, xsum[b], a0, &m0);
        y[r] = hsum(_mm256_add_ps(a0, a1)) + m0 + m1;
#else
        float acc = 0.0f, accm = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            float d, mn;
            const uint8_t *qs = block_scales(qtype, row + b * bs, &d, &mn);
            const float *xb = x + b * QK;
            float p = 0.0f;
            for (int j = 0; j < 16; j++)
                p += (float)(qs[j] & 15) * xb[j] + (float)(qs[j] >> 4) * xb[j + 16];
            acc += d * p;
            accm += mn * xsum[b];
        }
        y[r] = acc + accm;
#endif
    }
}

/* y (n,) = W x for one row of x: hearth_q4_matmul's decode case, two accumulators a row. */
void hearth_q4_gemv_f32(int qtype, const uint8_t *w, int64_t n, int64_t k, const float *x,
                        float *y) {
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(k / QK));
#pragma omp parallel
    gemv(qtype, w, n, k, x, y, xsum);
    free(xsum);
}

/* x[i] = exp(x[i] - m), returning their sum. AVX2: a Cephes-style polynomial (within 2 ulp
 * of expf), eight at a time; the tail with expf. */
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

/* Attention of one decode token, split as flash-decoding does: task (kv head, chunk of keys)
 * scores the GQA group's query heads against each key it loads once, and leaves each head's
 * running max, sum of exp and unnormalised output in `part`; `combine` merges the chunks. */
static void attend_chunk(const float *q, const float *k_cache, const float *v_cache,
                         const int32_t *table, int64_t t0, int64_t t1, int64_t kv_head,
                         int64_t group, const hearth_dims *dm, float *scores, float *part) {
    const int64_t dim = dm->head_dim, bsz = dm->block_size, kvh = dm->num_kv_heads;
    const int64_t n = t1 - t0, row = kvh * dim; /* floats from one key's row to the next */
    float *mx = part, *sum = part + group, *acc = part + 2 * group; /* acc: (group, dim) */
    for (int64_t j = 0; j < group; j++) {
        mx[j] = -INFINITY;
        sum[j] = 0.0f;
    }
    for (int64_t i = 0; i < group * dim; i++) acc[i] = 0.0f;
    /* keys block by block: t0..t1 in runs of consecutive slots */
    for (int64_t t = t0; t < t1;) {
        const int64_t off = t % bsz, run = (bsz - off < t1 - t ? bsz - off : t1 - t);
        const float *kv = k_cache + ((int64_t)table[t / bsz] * bsz + off) * row + kv_head * dim;
        for (int64_t u = 0; u < run; u++, kv += row)
            for (int64_t j = 0; j < group; j++) {
                const float sc = dot(q + j * dim, kv, dim) * dm->scale;
                scores[j * n + (t - t0) + u] = sc;
                mx[j] = sc > mx[j] ? sc : mx[j];
            }
        t += run;
    }
    for (int64_t j = 0; j < group; j++) sum[j] = exp_sub_sum(scores + j * n, n, mx[j]);
    for (int64_t t = t0; t < t1;) {
        const int64_t off = t % bsz, run = (bsz - off < t1 - t ? bsz - off : t1 - t);
        const float *vv = v_cache + ((int64_t)table[t / bsz] * bsz + off) * row + kv_head * dim;
        for (int64_t u = 0; u < run; u++, vv += row)
            for (int64_t j = 0; j < group; j++) {
                const float p = scores[j * n + (t - t0) + u];
                float *o = acc + j * dim;
                for (int64_t i = 0; i < dim; i++) o[i] += p * vv[i];
            }
        t += run;
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

/* res (hidden,): in, the token's embedding; out, the final norm's output.
 * len: the context after this token (its position is len - 1). Returns 0. */
int hearth_decode_one(const hearth_layer *layers, int64_t num_layers, const hearth_dims *dm,
                      const float *final_norm, float *res, const float *cos, const float *sin,
                      const int32_t *table, int64_t len) {
    const int64_t hd = dm->hidden, inter = dm->intermediate, dim = dm->head_dim;
    const int64_t nh = dm->num_heads, kvh = dm->num_kv_heads, group = nh / kvh;
    const int64_t qsz = nh * dim, kvsz = kvh * dim;
    const int64_t big = (2 * inter > qsz + 2 * kvsz ? 2 * inter : qsz + 2 * kvsz);
    float *h = (float *)malloc(sizeof(float) * (size_t)(hd > inter ? hd : inter));
    float *buf = (float *)malloc(sizeof(float) * (size_t)big);
    float *attn = (float *)malloc(sizeof(float) * (size_t)qsz);
    float *tmp = (float *)malloc(sizeof(float) * (size_t)hd);
    float *xsum = (float *)malloc(sizeof(float) * (size_t)((inter > hd ? inter : hd) / QK + 1));
    float *scores = (float *)malloc(sizeof(float) * (size_t)(nh * len));
#ifdef _OPENMP
    const int64_t threads = omp_get_max_threads();
#else
    const int64_t threads = 1;
#endif
    /* key chunks a KV head: enough tasks for every thread twice over, none shorter than 32 keys */
    int64_t chunks = (2 * threads + kvh - 1) / kvh;
    if (chunks > (len + 31) / 32) chunks = (len + 31) / 32;
    const int64_t span = (len + chunks - 1) / chunks;
    float *parts = (float *)malloc(sizeof(float) * (size_t)(kvh * chunks * group * (dim + 2)));
    const int64_t pos = len - 1;
    const int64_t slot = (int64_t)table[pos / dm->block_size] * dm->block_size +
                         pos % dm->block_size;
#pragma omp parallel
    {
        for (int64_t l = 0; l < num_layers; l++) {
            const hearth_layer *L = &layers[l];
#pragma omp single
            rms_norm(res, L->input_norm, dm->eps, hd, h);
            gemv(L->qkv_type, L->qkv, qsz + 2 * kvsz, hd, h, buf, xsum);
#pragma omp single
            {
                rotate(buf, nh + kvh, dim, cos, sin); /* q and k heads are adjacent */
                memcpy(L->k_cache + slot * kvsz, buf + qsz, sizeof(float) * (size_t)kvsz);
                memcpy(L->v_cache + slot * kvsz, buf + qsz + kvsz, sizeof(float) * (size_t)kvsz);
            }
#pragma omp for schedule(static)
            for (int64_t task = 0; task < kvh * chunks; task++) {
                const int64_t kv_head = task / chunks, c = task % chunks;
                const int64_t t0 = c * span, t1 = (c + 1) * span < len ? (c + 1) * span : len;
                attend_chunk(buf + kv_head * group * dim, L->k_cache, L->v_cache, table, t0,
                             t1 > t0 ? t1 : t0, kv_head, group, dm, scores + kv_head * group * len
                             + group * t0, parts + task * group * (dim + 2));
            }
#pragma omp for schedule(static)
            for (int64_t head = 0; head < nh; head++)
                combine(parts + (head / group) * chunks * group * (dim + 2), chunks, group,
                        head % group, dim, attn + head * dim);
            gemv(L->o_type, L->o, hd, qsz, attn, tmp, xsum);
#pragma omp single
            {
                for (int64_t i = 0; i < hd; i++) res[i] += tmp[i];
                rms_norm(res, L->post_norm, dm->eps, hd, h);
            }
            gemv(L->gate_up_type, L->gate_up, 2 * inter, hd, h, buf, xsum);
#pragma omp single
            for (int64_t i = 0; i < inter; i++) {
                const float g = buf[i];
                h[i] = g / (1.0f + expf(-g)) * buf[inter + i];
            }
            gemv(L->down_type, L->down, hd, inter, h, tmp, xsum);
#pragma omp single
            for (int64_t i = 0; i < hd; i++) res[i] += tmp[i];
        }
    }
    rms_norm(res, final_norm, dm->eps, hd, tmp);
    memcpy(res, tmp, sizeof(float) * (size_t)hd);
    free(h);
    free(buf);
    free(attn);
    free(tmp);
    free(xsum);
    free(scores);
    free(parts);
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
