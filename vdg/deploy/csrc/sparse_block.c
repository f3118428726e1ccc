/* The per-sample path of one gated BasicBlock in one call (vdg/deploy/native.py binds it; docs/deploy.md has the
 * measurements): the eval-mode gate, conv1 only for each sample's active output channels (BN folded, + bias,
 * ReLU), conv2 reading only those channels, the shortcut, + bias, ReLU.
 *
 * Why hand-written: PyTorch has no matrix product that reads an indexed subset of a weight matrix's rows.
 * Gathering the active rows into a copy and multiplying the copy with oneDNN copies the active weights twice per
 * call (the gather, then oneDNN's packing of a weight it has not seen); at batch 1 in a ResNet-18's last stages,
 * where a 3x3 convolution does only (pixels) multiply-adds per weight, those copies cost as much as the
 * multiplications skipped. These kernels read each active weight in place:
 *
 * - conv1, dot-product form: tile = 6 active output channels x 4 output pixels, vectors along the input
 *   channels of each 3x3 tap (weights [C, 3, 3, C_in] rows, input channels_last), 24 accumulators, horizontal
 *   sums at the end;
 * - conv2, outer-product form: tile = 6 (or 5) output pixels x 64 output channels (24 x 16 or 12 x 32 where a
 *   block has that few); for every active mid channel and tap one tile-wide run of the weight, blocked
 *   [C_out / tile, C, 9, tile] so that a tile's runs of one channel are contiguous, times a broadcast activation;
 *   the 1x1 downsample shortcut is C_in more rows of the same sum.
 *
 * Padding (1) is handled by pointing taps that fall outside the map at a zero vector; nothing is copied.
 * Float32 only. Summation order differs from oneDNN's: equal to the masked reference up to float round-off.
 * One build holds three variants of the tiles (no -march=native): AVX-512 and AVX2+FMA ones compiled per function
 * with __attribute__((target)), and portable C loops; vdg_sparse_block's `isa` argument picks one, and
 * vdg_sparse_kernel_cpu_isa() says which the CPU runs (__builtin_cpu_supports), so every variant is tested and
 * timed on any CPU that has it. AVX2 has 16 vector registers of 8 floats, against AVX-512's 32 of 16: its tiles
 * are the same work split into register-sized pieces (conv1 3 channels x 4 pixels, conv2 6 pixels x 16 channels).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#define VDG_X86 1
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx2,fma")))
#define AVX2 __attribute__((target("avx2,fma")))
#endif

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };  /* vdg/deploy/native.py's ISAS, in this order */

#define R1 6  /* conv1 tile: active output channels */
#define P1 4  /* conv1 tile: output pixels (6 x 4 ran 2-6% faster than 4 x 6, 8 x 3 and 3 x 8 over the network) */
#define PMAX 24  /* output pixels per tile, at most (P1, block_t.pt) */
#define PFJ 2 /* conv2: active channels prefetched ahead */
#ifndef TAP_OUTER_TILES
#define TAP_OUTER_TILES 32 /* conv2: maps of at least this many pixel tiles (17 x 17 and up) loop over taps outermost */
#endif
#ifndef TAP_OUTER_TILES_AVX2
#define TAP_OUTER_TILES_AVX2 TAP_OUTER_TILES
#endif
#define UNROLL _Pragma("GCC unroll 16")

typedef struct {
    const float *x;      /* [h, w, cin] one sample, channels_last */
    int64_t h, w, cin, stride, ho, wo;
    const float *w1;     /* [c, 9 * cin]: rows = output channels, columns (kh, kw, c_in) */
    const float *b1;     /* [c] */
    const float *w2;     /* [ceil(cout / 64), c, 9, 64], zero-padded (see w2_chunk) */
    const float *b2;     /* [cout] */
    const float *wd;     /* the 1x1 downsample [ceil(cout / 64), cin, 64], zero-padded; NULL: identity shortcut */
    int64_t c, cout;
    const int32_t *act;  /* [k] active mid channels */
    int64_t k;
    float *mid;          /* [ho * wo, k] */
    float *out;          /* [ho * wo, cout] */
    const float *zeros;  /* >= max(cin, k) zeros */
    int64_t pt;          /* output pixels per conv2 tile: 24 x 16 channels, 12 x 32, or 6 x 64 (5 on 5 x 5 maps) */
    int64_t to;          /* output channels per conv2 tile: 16, 32 or 64 (params_t.tile_out) */
} block_t;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* pointers of the 9 taps of output pixel p into a [rows, cols, depth] map (stride s, padding 1) */
static inline void tap_pointers(const float *map, int64_t rows, int64_t cols, int64_t depth, int64_t s,
                                int64_t wo, int64_t p, const float *zeros, const float **taps) {
    int64_t oy = p / wo, ox = p % wo;
    for (int t = 0; t < 9; ++t) {
        int64_t iy = oy * s + t / 3 - 1, ix = ox * s + t % 3 - 1;
        taps[t] = (iy >= 0 && iy < rows && ix >= 0 && ix < cols) ? map + (iy * cols + ix) * depth : zeros;
    }
}

/* ---------------------------------------------------------------- conv1: mid[p, j] = relu(b1 + <w1[act[j]], x-patch(p)>) */
static void conv1_tile_portable(const block_t *b, int64_t j0, int64_t p0) {
    int64_t np = min64(P1, b->ho * b->wo - p0), nr = min64(R1, b->k - j0);
    for (int64_t pi = 0; pi < np; ++pi) {
        const float *taps[9];
        tap_pointers(b->x, b->h, b->w, b->cin, b->stride, b->wo, p0 + pi, b->zeros, taps);
        for (int64_t ri = 0; ri < nr; ++ri) {
            int64_t ch = b->act[j0 + ri];
            const float *wr = b->w1 + ch * 9 * b->cin;
            float sum = 0.f;
            for (int t = 0; t < 9; ++t)
                for (int64_t c = 0; c < b->cin; ++c) sum += wr[t * b->cin + c] * taps[t][c];
            sum += b->b1[ch];
            b->mid[(p0 + pi) * b->k + j0 + ri] = sum > 0.f ? sum : 0.f;
        }
    }
}

#ifdef VDG_X86
/* jn: the first active channel of the tile this thread runs next (-1: none). While it runs the pixel tiles of one
 * group of rows, it prefetches the next group's rows, one row per pixel tile, so that the weights arrive from
 * memory while it computes (in the last stages at batch 1 the kernel waits on weights otherwise). */
AVX512 static void conv1_tile_avx512(const block_t *b, int64_t j0, int64_t p0, int64_t jn) {
    int64_t np = min64(P1, b->ho * b->wo - p0), nr = min64(R1, b->k - j0);
    const float *taps[PMAX][9];
    UNROLL for (int pi = 0; pi < P1; ++pi)  /* missing pixels repeat the last one; their sums are dropped */
        tap_pointers(b->x, b->h, b->w, b->cin, b->stride, b->wo, p0 + min64(pi, np - 1), b->zeros, taps[pi]);
    const float *rows[R1];
    UNROLL for (int ri = 0; ri < R1; ++ri) rows[ri] = b->w1 + (int64_t)b->act[j0 + min64(ri, nr - 1)] * 9 * b->cin;
    __m512 acc[R1][PMAX];
    UNROLL for (int ri = 0; ri < R1; ++ri)
        UNROLL for (int pi = 0; pi < P1; ++pi) acc[ri][pi] = _mm512_setzero_ps();
    const int64_t cin = b->cin, q = p0 / P1;
    const char *pf = NULL;
    if (jn >= 0 && q < R1 && jn + q < b->k) pf = (const char *)(b->w1 + (int64_t)b->act[jn + q] * 9 * cin);
    for (int t = 0; t < 9; ++t) {
        for (int64_t c = 0; c < cin; c += 16) {
            __mmask16 m = cin - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cin - c)) - 1);
            if (pf) _mm_prefetch(pf + 4 * (t * cin + c), _MM_HINT_T1);
            __m512 wv[R1];
            UNROLL for (int ri = 0; ri < R1; ++ri) wv[ri] = _mm512_maskz_loadu_ps(m, rows[ri] + t * cin + c);
            UNROLL for (int pi = 0; pi < P1; ++pi) {
                __m512 xv = _mm512_maskz_loadu_ps(m, taps[pi][t] + c);
                UNROLL for (int ri = 0; ri < R1; ++ri) acc[ri][pi] = _mm512_fmadd_ps(wv[ri], xv, acc[ri][pi]);
            }
        }
    }
    /* constant trip counts: GCC keeps `acc` in registers only if no loop indexes it with a runtime bound */
    UNROLL for (int ri = 0; ri < R1; ++ri) {
        UNROLL for (int pi = 0; pi < P1; ++pi) {
            if (ri < nr && pi < np) {
                float sum = _mm512_reduce_add_ps(acc[ri][pi]) + b->b1[b->act[j0 + ri]];
                b->mid[(p0 + pi) * b->k + j0 + ri] = sum > 0.f ? sum : 0.f;
            }
        }
    }
}
#endif

/* ---------------------------------------------------------------- conv2: out[p, o] = relu(b2 + res + sum_{t,j} mid[p+t, j] w2[o, act[j], t]) */
/* w2 is blocked by output tiles, [cout_pad / 64, c, 9, 64]: what one output tile reads of one active channel is one
 * contiguous 2304-byte run. (With the weight as [9, c, cout] the same reads were 9 runs of 256 bytes scattered
 * over the matrix, which ran at half the memory bandwidth the dense convolution gets.) */
static inline const float *w2_chunk(const block_t *b, int64_t o0, int64_t ch) {
    return b->w2 + ((o0 / b->to) * b->c + ch) * 9 * b->to;
}

static void conv2_tile_portable(const block_t *b, int64_t o0, int64_t p0) {
    int64_t np = min64(b->pt, b->ho * b->wo - p0), no = min64(b->to, b->cout - o0);
    for (int64_t pi = 0; pi < np; ++pi) {
        const float *taps[9];
        int64_t p = p0 + pi;
        tap_pointers(b->mid, b->ho, b->wo, b->k, 1, b->wo, p, b->zeros, taps);
        float acc[64];
        for (int64_t o = 0; o < no; ++o) acc[o] = 0.f;
        for (int64_t j = 0; j < b->k; ++j) {
            const float *wc = w2_chunk(b, o0, b->act[j]);
            for (int t = 0; t < 9; ++t) {
                float a = taps[t][j];
                for (int64_t o = 0; o < no; ++o) acc[o] += a * wc[t * b->to + o];
            }
        }
        if (b->wd) {
            const float *xs = b->x + ((p / b->wo) * b->stride * b->w + (p % b->wo) * b->stride) * b->cin;
            const float *wdt = b->wd + (o0 / b->to) * b->cin * b->to;
            for (int64_t ch = 0; ch < b->cin; ++ch)
                for (int64_t o = 0; o < no; ++o) acc[o] += xs[ch] * wdt[ch * b->to + o];
        } else {
            for (int64_t o = 0; o < no; ++o) acc[o] += b->x[p * b->cin + o0 + o];
        }
        for (int64_t o = 0; o < no; ++o) {
            float v = acc[o] + b->b2[o0 + o];
            b->out[p * b->cout + o0 + o] = v > 0.f ? v : 0.f;
        }
    }
}

#ifdef VDG_X86
/* on: the first output channel of the tile this thread runs next (-1: none). The first pixel tile of an output
 * tile prefetches its own runs PFJ channels ahead (the runs are a gather, which hardware prefetchers do not
 * follow); pixel tiles 1-4 prefetch the next output tile's runs, a quarter each. */
AVX512 static inline __attribute__((always_inline)) void conv2_tile_avx512(const block_t *b, int64_t o0, int64_t p0,
                                                                           int64_t on, const int P2, const int V2) {
    const int O2 = 16 * V2;
    int64_t np = min64(P2, b->ho * b->wo - p0);
    const float *taps[PMAX][9];
    UNROLL for (int pi = 0; pi < P2; ++pi)
        tap_pointers(b->mid, b->ho, b->wo, b->k, 1, b->wo, p0 + min64(pi, np - 1), b->zeros, taps[pi]);
    __m512 acc[PMAX][4];
    UNROLL for (int pi = 0; pi < P2; ++pi)
        UNROLL for (int v = 0; v < V2; ++v) acc[pi][v] = _mm512_setzero_ps();
    const int64_t q = p0 / P2;
    if (b->ho * b->wo >= P2 * TAP_OUTER_TILES) {
        /* Many pixel tiles: the output tile's runs stay in L2 from the first pixel tile on. Taps outer, so that the
         * six pixels' tap pointers stay in registers over the channels. */
        for (int t = 0; t < 9; ++t) {
            const float *tp[PMAX];
            UNROLL for (int pi = 0; pi < P2; ++pi) tp[pi] = taps[pi][t];
            for (int64_t j = 0; j < b->k; ++j) {
                const float *wc = w2_chunk(b, o0, b->act[j]) + t * O2;
                __m512 wv[4];
                UNROLL for (int v = 0; v < V2; ++v) wv[v] = _mm512_loadu_ps(wc + 16 * v);
                UNROLL for (int pi = 0; pi < P2; ++pi) {
                    __m512 a = _mm512_set1_ps(tp[pi][j]);
                    UNROLL for (int v = 0; v < V2; ++v) acc[pi][v] = _mm512_fmadd_ps(a, wv[v], acc[pi][v]);
                }
            }
        }
    } else for (int64_t j = 0; j < b->k; ++j) {
        const float *wc = w2_chunk(b, o0, b->act[j]);
        const char *pf = NULL;
        int64_t pf_line = 0, pf_lines = 0;
        if (q == 0 && j + PFJ < b->k) {
            pf = (const char *)w2_chunk(b, o0, b->act[j + PFJ]), pf_lines = V2;
        } else if (q >= 1 && q <= V2 && on >= 0) {
            pf = (const char *)w2_chunk(b, on, b->act[j]), pf_line = (q - 1) * 9, pf_lines = 1;
        }
        UNROLL for (int t = 0; t < 9; ++t) {
            if (pf) {
                for (int64_t l = 0; l < pf_lines; ++l) _mm_prefetch(pf + 64 * (pf_line + t * pf_lines + l), _MM_HINT_T0);
            }
            __m512 wv[4];
            UNROLL for (int v = 0; v < V2; ++v) wv[v] = _mm512_loadu_ps(wc + t * O2 + 16 * v);
            UNROLL for (int pi = 0; pi < P2; ++pi) {
                __m512 a = _mm512_set1_ps(taps[pi][t][j]);
                UNROLL for (int v = 0; v < V2; ++v) acc[pi][v] = _mm512_fmadd_ps(a, wv[v], acc[pi][v]);
            }
        }
    }
    if (b->wd) {  /* the downsample shortcut: C_in more rows of the same product, read at the strided pixels */
        const float *xs[PMAX];
        UNROLL for (int pi = 0; pi < P2; ++pi) {
            int64_t p = p0 + min64(pi, np - 1);
            xs[pi] = b->x + ((p / b->wo) * b->stride * b->w + (p % b->wo) * b->stride) * b->cin;
        }
        const float *wdt = b->wd + (o0 / O2) * b->cin * O2;
        for (int64_t ch = 0; ch < b->cin; ++ch) {
            __m512 wv[4];
            UNROLL for (int v = 0; v < V2; ++v) wv[v] = _mm512_loadu_ps(wdt + ch * O2 + 16 * v);
            UNROLL for (int pi = 0; pi < P2; ++pi) {
                __m512 a = _mm512_set1_ps(xs[pi][ch]);
                UNROLL for (int v = 0; v < V2; ++v) acc[pi][v] = _mm512_fmadd_ps(a, wv[v], acc[pi][v]);
            }
        }
    }
    __mmask16 m[4];
    UNROLL for (int v = 0; v < V2; ++v) {
        int64_t left = b->cout - o0 - 16 * v;
        m[v] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
    }
    const __m512 zero = _mm512_setzero_ps();
    UNROLL for (int pi = 0; pi < P2; ++pi) {
        if (pi < np) {
            int64_t row = (p0 + pi) * b->cout + o0;
            UNROLL for (int v = 0; v < V2; ++v) {
                __m512 r = _mm512_add_ps(acc[pi][v], _mm512_maskz_loadu_ps(m[v], b->b2 + o0 + 16 * v));
                if (!b->wd) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m[v], b->x + (p0 + pi) * b->cin + o0 + 16 * v));
                _mm512_mask_storeu_ps(b->out + row + 16 * v, m[v], _mm512_max_ps(r, zero));
            }
        }
    }
}

AVX512 static void conv2_tile_avx512_any(const block_t *b, int64_t o0, int64_t p0, int64_t on) {
    switch (b->to) {  /* one specialisation per tile shape, so that the accumulators stay in registers */
    case 16: conv2_tile_avx512(b, o0, p0, on, 24, 1); break;
    case 32: conv2_tile_avx512(b, o0, p0, on, 12, 2); break;
    default:
        if (b->pt == 5) conv2_tile_avx512(b, o0, p0, on, 5, 4); else conv2_tile_avx512(b, o0, p0, on, 6, 4);
    }
}

/* ---------------------------------------------------------------- AVX2 + FMA: 16 registers of 8 floats */
/* lanes < n of an 8-lane mask for maskload / maskstore */
AVX2 static inline __m256i lanes8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 0 ? 0 : n > 8 ? 8 : n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* conv1's inner product of 3 weight rows with 4 pixels' taps over n floats (a multiple of 8): 12 accumulators,
 * 3 weight vectors and one input vector are AVX2's 16 registers. */
AVX2 static inline __attribute__((always_inline)) void conv1_dot_avx2(const float *w0, const float *w1,
                                                                     const float *w2, const float *const *xs,
                                                                     int64_t n, __m256 acc[3][P1]) {
    const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
    for (int64_t c = 0; c < n; c += 8) {
        __m256 a = _mm256_loadu_ps(w0 + c), b = _mm256_loadu_ps(w1 + c), d = _mm256_loadu_ps(w2 + c), xv;
        xv = _mm256_loadu_ps(x0 + c);
        acc[0][0] = _mm256_fmadd_ps(a, xv, acc[0][0]), acc[1][0] = _mm256_fmadd_ps(b, xv, acc[1][0]);
        acc[2][0] = _mm256_fmadd_ps(d, xv, acc[2][0]);
        xv = _mm256_loadu_ps(x1 + c);
        acc[0][1] = _mm256_fmadd_ps(a, xv, acc[0][1]), acc[1][1] = _mm256_fmadd_ps(b, xv, acc[1][1]);
        acc[2][1] = _mm256_fmadd_ps(d, xv, acc[2][1]);
        xv = _mm256_loadu_ps(x2 + c);
        acc[0][2] = _mm256_fmadd_ps(a, xv, acc[0][2]), acc[1][2] = _mm256_fmadd_ps(b, xv, acc[1][2]);
        acc[2][2] = _mm256_fmadd_ps(d, xv, acc[2][2]);
        xv = _mm256_loadu_ps(x3 + c);
        acc[0][3] = _mm256_fmadd_ps(a, xv, acc[0][3]), acc[1][3] = _mm256_fmadd_ps(b, xv, acc[1][3]);
        acc[2][3] = _mm256_fmadd_ps(d, xv, acc[2][3]);
    }
}

/* conv1 in the AVX-512 tile's place (R1 x P1 = 6 channels x 4 pixels), as two register tiles of 3 channels x 4
 * pixels. Input channels past the last multiple of 8 are copied, zero-padded, to 8-float buffers and run through
 * the same inner product (a masked load would need a 17th register). Same prefetch as AVX-512, once per tap. */
AVX2 static void conv1_tile_avx2(const block_t *b, int64_t j0, int64_t p0, int64_t jn) {
    int64_t np = min64(P1, b->ho * b->wo - p0), nr = min64(R1, b->k - j0);
    const float *taps[P1][9];
    UNROLL for (int pi = 0; pi < P1; ++pi)
        tap_pointers(b->x, b->h, b->w, b->cin, b->stride, b->wo, p0 + min64(pi, np - 1), b->zeros, taps[pi]);
    const int64_t cin = b->cin, q = p0 / P1, body = cin & ~(int64_t)7, tail = cin - body;
    const char *pf = NULL;
    if (jn >= 0 && q < R1 && jn + q < b->k) pf = (const char *)(b->w1 + (int64_t)b->act[jn + q] * 9 * cin);
    float wtail[3][8] __attribute__((aligned(32))), xtail[P1][8] __attribute__((aligned(32)));
    for (int64_t g = 0; g < nr; g += 3) {
        const float *rows[3];
        UNROLL for (int ri = 0; ri < 3; ++ri) rows[ri] = b->w1 + (int64_t)b->act[j0 + min64(g + ri, nr - 1)] * 9 * cin;
        __m256 acc[3][P1];
        UNROLL for (int ri = 0; ri < 3; ++ri)
            UNROLL for (int pi = 0; pi < P1; ++pi) acc[ri][pi] = _mm256_setzero_ps();
        for (int t = 0; t < 9; ++t) {
            if (pf && g == 0)
                for (int64_t l = 0; l < 4 * cin; l += 64) _mm_prefetch(pf + 4 * t * cin + l, _MM_HINT_T1);
            const float *xs[P1];
            UNROLL for (int pi = 0; pi < P1; ++pi) xs[pi] = taps[pi][t];
            conv1_dot_avx2(rows[0] + t * cin, rows[1] + t * cin, rows[2] + t * cin, xs, body, acc);
            if (tail) {
                UNROLL for (int ri = 0; ri < 3; ++ri)
                    for (int i = 0; i < 8; ++i) wtail[ri][i] = i < tail ? rows[ri][t * cin + body + i] : 0.f;
                const float *xt[P1];
                UNROLL for (int pi = 0; pi < P1; ++pi) {
                    for (int i = 0; i < 8; ++i) xtail[pi][i] = i < tail ? xs[pi][body + i] : 0.f;
                    xt[pi] = xtail[pi];
                }
                conv1_dot_avx2(wtail[0], wtail[1], wtail[2], xt, 8, acc);
            }
        }
        UNROLL for (int ri = 0; ri < 3; ++ri) {
            UNROLL for (int pi = 0; pi < P1; ++pi) {
                if (g + ri < nr && pi < np) {
                    float sum = hsum8(acc[ri][pi]) + b->b1[b->act[j0 + g + ri]];
                    b->mid[(p0 + pi) * b->k + j0 + g + ri] = sum > 0.f ? sum : 0.f;
                }
            }
        }
    }
}

/* conv2 register tile: P2 (6, or 5 on 5 x 5 maps) output pixels from p0 x 16 output channels from o0 + os (o0: the
 * output tile, blocked by b->to; os: 0, 16, 32 or 48 within it): 12 accumulators + 2 weight vectors + 1
 * broadcast. Prefetch, per active channel j, the cache lines [pf_first, pf_first + pf_count) of the run of
 * channel act[j + pf_ahead] in output tile pf_tile (-1: none): as AVX-512 does, the first pixel tile of an output
 * tile fetches its own runs PFJ channels ahead, the next ones the next output tile's runs, 9 lines each. */
AVX2 static inline __attribute__((always_inline)) void conv2_micro_avx2(const block_t *b, int64_t o0, int64_t os,
                                                                       int64_t p0, int64_t pf_tile, int64_t pf_ahead,
                                                                       int64_t pf_first, int64_t pf_count,
                                                                       const int P2) {
    const int64_t to = b->to, np = min64(P2, b->ho * b->wo - p0);
    const float *taps[6][9];
    UNROLL for (int pi = 0; pi < P2; ++pi)
        tap_pointers(b->mid, b->ho, b->wo, b->k, 1, b->wo, p0 + min64(pi, np - 1), b->zeros, taps[pi]);
    __m256 acc[6][2];
    UNROLL for (int pi = 0; pi < P2; ++pi) acc[pi][0] = acc[pi][1] = _mm256_setzero_ps();
    if (b->ho * b->wo >= P2 * TAP_OUTER_TILES_AVX2) {  /* as in AVX-512: taps outer on large maps */
        for (int t = 0; t < 9; ++t) {
            const float *tp[6];
            UNROLL for (int pi = 0; pi < P2; ++pi) tp[pi] = taps[pi][t];
            for (int64_t j = 0; j < b->k; ++j) {
                const float *wc = w2_chunk(b, o0, b->act[j]) + t * to + os;
                __m256 w0 = _mm256_loadu_ps(wc), w1 = _mm256_loadu_ps(wc + 8);
                UNROLL for (int pi = 0; pi < P2; ++pi) {
                    __m256 a = _mm256_broadcast_ss(tp[pi] + j);
                    acc[pi][0] = _mm256_fmadd_ps(a, w0, acc[pi][0]);
                    acc[pi][1] = _mm256_fmadd_ps(a, w1, acc[pi][1]);
                }
            }
        }
    } else for (int64_t j = 0; j < b->k; ++j) {
        const float *wc = w2_chunk(b, o0, b->act[j]) + os;
        if (pf_tile >= 0 && j + pf_ahead < b->k) {
            const char *next = (const char *)w2_chunk(b, pf_tile, b->act[j + pf_ahead]) + 64 * pf_first;
            for (int64_t l = 0; l < pf_count; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
        }
        UNROLL for (int t = 0; t < 9; ++t) {
            __m256 w0 = _mm256_loadu_ps(wc + t * to), w1 = _mm256_loadu_ps(wc + t * to + 8);
            UNROLL for (int pi = 0; pi < P2; ++pi) {
                __m256 a = _mm256_broadcast_ss(taps[pi][t] + j);
                acc[pi][0] = _mm256_fmadd_ps(a, w0, acc[pi][0]);
                acc[pi][1] = _mm256_fmadd_ps(a, w1, acc[pi][1]);
            }
        }
    }
    if (b->wd) {  /* the downsample shortcut: C_in more rows of the same product, read at the strided pixels */
        const float *xs[6];
        UNROLL for (int pi = 0; pi < P2; ++pi) {
            int64_t p = p0 + min64(pi, np - 1);
            xs[pi] = b->x + ((p / b->wo) * b->stride * b->w + (p % b->wo) * b->stride) * b->cin;
        }
        const float *wdt = b->wd + (o0 / to) * b->cin * to + os;
        for (int64_t ch = 0; ch < b->cin; ++ch) {
            __m256 w0 = _mm256_loadu_ps(wdt + ch * to), w1 = _mm256_loadu_ps(wdt + ch * to + 8);
            UNROLL for (int pi = 0; pi < P2; ++pi) {
                __m256 a = _mm256_broadcast_ss(xs[pi] + ch);
                acc[pi][0] = _mm256_fmadd_ps(a, w0, acc[pi][0]);
                acc[pi][1] = _mm256_fmadd_ps(a, w1, acc[pi][1]);
            }
        }
    }
    const int64_t first = o0 + os, left = b->cout - first;
    const __m256i m0 = lanes8(left), m1 = lanes8(left - 8);
    const __m256 zero = _mm256_setzero_ps();
    const __m256 bias0 = _mm256_maskload_ps(b->b2 + first, m0), bias1 = _mm256_maskload_ps(b->b2 + first + 8, m1);
    UNROLL for (int pi = 0; pi < P2; ++pi) {
        if (pi < np) {
            float *row = b->out + (p0 + pi) * b->cout + first;
            __m256 r0 = _mm256_add_ps(acc[pi][0], bias0), r1 = _mm256_add_ps(acc[pi][1], bias1);
            if (!b->wd) {
                const float *res = b->x + (p0 + pi) * b->cin + first;
                r0 = _mm256_add_ps(r0, _mm256_maskload_ps(res, m0));
                r1 = _mm256_add_ps(r1, _mm256_maskload_ps(res + 8, m1));
            }
            _mm256_maskstore_ps(row, m0, _mm256_max_ps(r0, zero));
            _mm256_maskstore_ps(row + 8, m1, _mm256_max_ps(r1, zero));
        }
    }
}

/* One conv2 tile (b->pt pixels x b->to channels, as the other variants) as register tiles of 6 (5) x 16. on: the
 * next output tile this thread runs (-1: none), for the prefetch. */
AVX2 static void conv2_tile_avx2(const block_t *b, int64_t o0, int64_t p0, int64_t on) {
    const int64_t pixels = b->ho * b->wo, q = p0 / b->pt, lines = 9 * b->to / 16;
    int64_t pf_tile = -1, pf_ahead = 0, pf_first = 0, pf_count = 0;
    if (q == 0) pf_tile = o0, pf_ahead = PFJ, pf_count = lines;
    else if (on >= 0 && (q - 1) * 9 < lines) pf_tile = on, pf_first = (q - 1) * 9, pf_count = min64(9, lines - pf_first);
    for (int64_t os = 0; os < b->to && o0 + os < b->cout; os += 16)
        for (int64_t ps = 0; ps < b->pt && p0 + ps < pixels; ps += 6) {
            int64_t t = os == 0 && ps == 0 ? pf_tile : -1;  /* the first register tile prefetches for the others */
            if (b->pt == 5) conv2_micro_avx2(b, o0, os, p0 + ps, t, pf_ahead, pf_first, pf_count, 5);
            else conv2_micro_avx2(b, o0, os, p0 + ps, t, pf_ahead, pf_first, pf_count, 6);
        }
}
#endif

static void conv1_tile(const block_t *b, int64_t j0, int64_t p0, int64_t jn, int isa) {
#ifdef VDG_X86
    if (isa == ISA_AVX512) { conv1_tile_avx512(b, j0, p0, jn); return; }
    if (isa == ISA_AVX2) { conv1_tile_avx2(b, j0, p0, jn); return; }
#endif
    (void)isa, (void)jn;
    conv1_tile_portable(b, j0, p0);
}

static void conv2_tile(const block_t *b, int64_t o0, int64_t p0, int64_t on, int isa) {
#ifdef VDG_X86
    if (isa == ISA_AVX512) { conv2_tile_avx512_any(b, o0, p0, on); return; }
    if (isa == ISA_AVX2) { conv2_tile_avx2(b, o0, p0, on); return; }
#endif
    (void)isa, (void)on;
    conv2_tile_portable(b, o0, p0);
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Both convolutions of one sample on the calling thread. */
static void run_serial(const block_t *b, int isa) {
    int64_t pixels = b->ho * b->wo;
    for (int64_t j0 = 0; j0 < b->k; j0 += R1)
        for (int64_t p0 = 0; p0 < pixels; p0 += P1)
            conv1_tile(b, j0, p0, j0 + R1 < b->k ? j0 + R1 : -1, isa);
    for (int64_t o0 = 0; o0 < b->cout; o0 += b->to)
        for (int64_t p0 = 0; p0 < pixels; p0 += b->pt)
            conv2_tile(b, o0, p0, o0 + b->to < b->cout ? o0 + b->to : -1, isa);
}

int vdg_sparse_kernel_version(void) { return 7; }

/* The widest variant this CPU runs: ISA_AVX512, ISA_AVX2 (with FMA) or ISA_PORTABLE. */
int vdg_sparse_kernel_cpu_isa(void) {
#ifdef VDG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

/* One block's weights (set once by vdg/deploy/native.py's NativeBlock). */
typedef struct {
    int64_t c, cin, cout, stride;
    int64_t tile_out;    /* output channels per conv2 tile, the blocking of w2 and wd: 16, 32 or 64 */
    int64_t hidden;      /* gate: hidden units (0: no gate) */
    const float *wr;     /* gate reduce, transposed: [cin, hidden], BN folded */
    const float *br;     /* [hidden] */
    const float *we;     /* gate expand, transposed: [hidden, c] */
    const float *be;     /* [c] */
    const float *w1, *b1, *w2, *b2;  /* conv1 rows, conv2 blocked (with the downsample's bias in b2) */
    const float *wd;     /* the 1x1 downsample shortcut, blocked; NULL: identity (cin == cout, stride 1) */
} params_t;

/* The eval-mode gate of one sample, `FoldedGate.mask`: mask[o] = 1[be + We relu(br + Wr mean_p(x)) >= 0].
 * The weights come transposed (wr: [cin, hidden], we: [hidden, c]) so that every loop below runs along
 * independent outputs and vectorises without reassociating a sum. work: >= cin + hidden floats. */
static void gate_mask(const params_t *g, const float *x, int64_t pixels, int64_t cin, int64_t c, float *work,
                      uint8_t *mask) {
    float *z = work, *hid = work + cin;
    const int64_t hidden = g->hidden;
    for (int64_t ch = 0; ch < cin; ++ch) z[ch] = 0.f;
    for (int64_t p = 0; p < pixels; ++p)
        for (int64_t ch = 0; ch < cin; ++ch) z[ch] += x[p * cin + ch];
    for (int64_t ch = 0; ch < cin; ++ch) z[ch] /= (float)pixels;
    for (int64_t j = 0; j < hidden; ++j) hid[j] = g->br[j];
    for (int64_t ch = 0; ch < cin; ++ch)
        for (int64_t j = 0; j < hidden; ++j) hid[j] += g->wr[ch * hidden + j] * z[ch];
    for (int64_t j = 0; j < hidden; ++j) hid[j] = hid[j] > 0.f ? hid[j] : 0.f;
    for (int64_t o0 = 0; o0 < c; o0 += 256) {
        float l[256];
        int64_t no = c - o0 < 256 ? c - o0 : 256;
        for (int64_t o = 0; o < no; ++o) l[o] = g->be[o0 + o];
        for (int64_t j = 0; j < hidden; ++j)
            for (int64_t o = 0; o < no; ++o) l[o] += g->we[j * c + o0 + o] * hid[j];
        for (int64_t o = 0; o < no; ++o) mask[o0 + o] = l[o] >= 0.f;
    }
}

/* The block for a batch x [n, h, w, cin] (channels_last, contiguous). mask [n, c] (1 = channel kept): written
 * from the gate when use_gate (the block has one), else read. out: [n, ho, wo, cout]; scratch: >= threads * ho *
 * wo * c floats. n == 1: the sample's tiles are shared out over `threads` threads; n > 1: the samples are, each
 * running on one thread (one sample's kernels are too small to share out). Returns 0, or -1 if a buffer could
 * not be allocated, -2 if use_gate is asked of a block without a gate, -3 for a tile size with no code, -4 for an
 * `isa` (ISA_*) this CPU does not run. */
int vdg_sparse_block(const params_t *prm, const float *x, int64_t n, int64_t h, int64_t w, uint8_t *mask,
                     int use_gate, float *out, float *scratch, int64_t threads, int isa) {
    const int64_t c = prm->c, cin = prm->cin, cout = prm->cout, stride = prm->stride;
    const float *w1 = prm->w1, *b1 = prm->b1, *w2 = prm->w2, *b2 = prm->b2, *wd = prm->wd;
    const int64_t gate_hidden = use_gate ? prm->hidden : 0;
    const int64_t pixels_ = ((h - 1) / stride + 1) * ((w - 1) / stride + 1);
    const int64_t to = prm->tile_out;
    if (to != 16 && to != 32 && to != 64) return -3;
    const int64_t tile = to == 16 ? 24 : to == 32 ? 12 : ceil_div(pixels_, 5) * 5 < ceil_div(pixels_, 6) * 6 ? 5 : 6;
    if (use_gate && prm->hidden <= 0) return -2;
    if (isa < ISA_PORTABLE || isa > vdg_sparse_kernel_cpu_isa()) return -4;
    int64_t ho = (h - 1) / stride + 1, wo = (w - 1) / stride + 1, pixels = ho * wo;
    if (threads < 1) threads = 1;
    int64_t zeros_len = (cin > c ? cin : c) + 16, work_len = cin + gate_hidden + 16;
    float *zeros = (float *)calloc((size_t)zeros_len, sizeof(float));
    float *work = (float *)malloc(sizeof(float) * (size_t)(work_len * threads));
    int32_t *act = (int32_t *)malloc(sizeof(int32_t) * (size_t)(c * threads + 1));
    if (!zeros || !work || !act) { free(zeros); free(work); free(act); return -1; }
    if (n == 1) {
        block_t b = {x, h, w, cin, stride, ho, wo, w1, b1, w2, b2, wd, c, cout, act, 0, scratch, out, zeros, tile, to};
        if (gate_hidden > 0) gate_mask(prm, x, h * w, cin, c, work, mask);
        for (int64_t ch = 0; ch < c; ++ch)
            if (mask[ch]) act[b.k++] = (int32_t)ch;
        {
            int64_t rt = ceil_div(b.k, R1), pt1 = ceil_div(pixels, P1);
            int64_t ot = ceil_div(cout, to), pt2 = ceil_div(pixels, b.pt);
#pragma omp parallel num_threads((int)threads) if (threads > 1)
            {
#pragma omp for schedule(static)
                for (int64_t i = 0; i < rt * pt1; ++i) {
                    int64_t r = i / pt1;
                    conv1_tile(&b, r * R1, (i % pt1) * P1, r + 1 < rt ? (r + 1) * R1 : -1, isa);
                }
#pragma omp for schedule(static)
                for (int64_t i = 0; i < ot * pt2; ++i) {
                    int64_t o = i / pt2;
                    conv2_tile(&b, o * to, (i % pt2) * b.pt, o + 1 < ot ? (o + 1) * to : -1, isa);
                }
            }
        }
    } else {
#pragma omp parallel num_threads((int)threads) if (threads > 1)
        {
            int tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            int32_t *my_act = act + (int64_t)tid * c;
            float *my_mid = scratch + (int64_t)tid * pixels * c, *my_work = work + (int64_t)tid * work_len;
#pragma omp for schedule(dynamic, 1)
            for (int64_t s = 0; s < n; ++s) {
                const float *xs = x + s * h * w * cin;
                block_t b = {xs, h, w, cin, stride, ho, wo, w1, b1, w2, b2,
                             wd, c, cout, my_act, 0, my_mid, out + s * pixels * cout, zeros, tile, to};
                uint8_t *ms = mask + s * c;
                if (gate_hidden > 0) gate_mask(prm, xs, h * w, cin, c, my_work, ms);
                for (int64_t ch = 0; ch < c; ++ch)
                    if (ms[ch]) my_act[b.k++] = (int32_t)ch;
                run_serial(&b, isa);
            }
        }
    }
    free(zeros);
    free(work);
    free(act);
    return 0;
}
