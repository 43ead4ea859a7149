/* Halo attention forward, fp32, CPU: one fused pass per (image, head, query block).
 *
 * Built on first use by ops/_native.py (cc -O3 -march=native -fopenmp) and called through ctypes
 * from ops/halo/cpu.py; see there for the contract. Per task the window's in-map keys are gathered
 * once, transposed and pre-scaled, beside the relative-position tables, so that one register-blocked
 * product gives every query's q.k logits *and* its row/column relative logits; the bias add, the
 * softmax (with timm's zero border keys in closed form: border_blocks) and the product with the values
 * follow while the tile is still in L1. GCC vector extensions: AVX-512 / AVX2 / NEON as -march gives.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "../_vec.h"

/* Timm's zero border keys, in closed form. A key outside the map is a zero vector: value 0, logit
 * lh[r] + lw[c], the query's relative logits to its window row r and column c. The window rows [r0,
 * r1) and columns [c0, c1) lie inside the map; the out-of-map keys are the pairs (r, c) of (rows out,
 * columns in), (rows out, columns out), (rows in, columns out). Each of these three blocks of pairs
 * factorises: its weights sum to RS * CS * exp(RM + CM - m), RM / RS the maximum of its rows' lh and
 * the sum of exp(lh - RM) over them (CM / CS the same for its columns), and RM + CM is the block's
 * largest logit. Returned as lanes 0-2 of *bmax (RM + CM) and *bsum (RS CS); an empty group has
 * maximum -inf and sum 0, so its blocks are -inf / 0, as are lanes 3-15.
 * Each group has its own maximum (its sum is >= 1), and the row's maximum takes the blocks' exact
 * largest logits. At large logits both matter: with one maximum for a window's in-map and out-of-map
 * rows, out-of-map rows whose lh lie ~87 below the in-map ones' underflow to 0 although their keys
 * may dominate the softmax (the q . k terms very negative); and max(lh) + max(lw) over the whole
 * window, the bound used before, need not be any key's logit: when it lies ~87 above all of them
 * every weight underflows. (Output errors of O(1) at logits of std ~64; now as `reference`'s.) */
static inline void border_blocks(vf m, vf e, vf *bmax, vf *bsum) {
    /* m, e: lanes 0-3 / 4-7 / 8-11 / 12-15 the maximum / sum of rows in, rows out, columns in, columns out */
    const lmask three = lanes_below(3);
    *bmax = vsel(three, __builtin_shufflevector(m, m, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0) +
                            __builtin_shufflevector(m, m, 8, 12, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                 vsplat(-INFINITY));
    *bsum = vsel(three, __builtin_shufflevector(e, e, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0) *
                            __builtin_shufflevector(e, e, 8, 12, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                 (vf){0});
}

/* The group maxima and sums from lh and lw (win <= VL entries each; the vectors read past them:
 * masked), all four groups in one shuffle network per reduction. */
static void border(const float *lh, const float *lw, int win, int r0, int r1, int c0, int c1, vf *bmax, vf *bsum) {
    const lmask inwin = lanes_below(win), rin = lanes_in(r0, r1), rout = inwin & ~rin, cin = lanes_in(c0, c1),
                cout = inwin & ~cin;
    const vf h = vload(lh), w = vload(lw), ninf = vsplat(-INFINITY), zero = {0};
    const vf m = REDUCE4(vsel(rin, h, ninf), vsel(rout, h, ninf), vsel(cin, w, ninf), vsel(cout, w, ninf), vmax);
    /* lanes outside a group (or subtracting an empty group's -inf) are masked below */
    const vf eh = vexp(h - vsel(rin, vsplat(m[0]), vsplat(m[4])));
    const vf ew = vexp(w - vsel(cin, vsplat(m[8]), vsplat(m[12])));
    const vf e = REDUCE4(vsel(rin, eh, zero), vsel(rout, eh, zero), vsel(cin, ew, zero), vsel(cout, ew, zero), vsum);
    border_blocks(m, e, bmax, bsum);
}

/* The same for any win, one element at a time. */
static void border_scalar(const float *lh, const float *lw, int win, int r0, int r1, int c0, int c1, vf *bmax,
                          vf *bsum) {
    float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, sum[4] = {0};
    for (int p = 0; p < 2; p++) {
        const float *x = p ? lw : lh;
        const int lo = p ? c0 : r0, hi = p ? c1 : r1;
        for (int w = 0; w < win; w++) {
            const int g = 2 * p + !(w >= lo && w < hi);
            mx[g] = x[w] > mx[g] ? x[w] : mx[g];
        }
        for (int w = 0; w < win; w++) {
            const int g = 2 * p + !(w >= lo && w < hi);
            sum[g] += expf(x[w] - mx[g]);
        }
    }
    vf m, e;
    for (int l = 0; l < VL; l++) m[l] = mx[l / 4], e[l] = sum[l / 4];
    border_blocks(m, e, bmax, bsum);
}

typedef struct { const float *p; long s[5]; } view5;   /* (B, heads, D, H, W) strides, in elements */

static inline const float *at(const view5 *t, int b, int h, int d, int y, int x) {
    return t->p + b * t->s[0] + h * t->s[1] + d * t->s[2] + y * t->s[3] + x * t->s[4];
}

/* dst[i] = src[i * stride], i < n */
static inline void gather(float *restrict dst, const float *restrict src, long stride, int n) {
    if (stride == 1)
        memcpy(dst, src, sizeof(float) * n);
    else
        for (int i = 0; i < n; i++) dst[i] = src[i * stride];
}

/* Returns 0, or 1 when a buffer could not be allocated. rel_h / rel_w: contiguous (2 win - 1, D) or
 * NULL; out: written through its (B, heads, Dv, Hq, Wq) strides. */
int mz_halo_forward(const float *q, const long *qs, const float *k, const long *ks, const float *v,
                    const long *vs, float *out, const long *os, const float *rel_h, const float *rel_w,
                    int B, int heads, int D, int Dv, int H, int W, int Hq, int Wq, int block, int halo,
                    float scale, int zero_pad, int n_threads) {
    const int stride = (H + Hq - 1) / Hq, bq = block / stride, win = block + 2 * halo;
    const int nbh = (H + block - 1) / block, nbw = (W + block - 1) / block, nq = bq * bq;
    const int T = rel_h ? 2 * win - 1 : 0, TP = round_up(2 * T), Dvp = round_up(Dv);
    const int ld_max = round_up(win * win) + TP;
    view5 Q = {.p = q}, K = {.p = k}, V = {.p = v}, O = {.p = out};
    for (int i = 0; i < 5; i++) { Q.s[i] = qs[i]; K.s[i] = ks[i]; V.s[i] = vs[i]; O.s[i] = os[i]; }

    /* relative tables transposed beside the keys: [d][t] = rel_h[t][d], [d][T + t] = rel_w[t][d] */
    float *relT = NULL;
    if (T) {
        relT = aligned_alloc(64, sizeof(float) * D * TP);
        if (!relT) return 1;
        memset(relT, 0, sizeof(float) * D * TP);
        for (int t = 0; t < T; t++)
            for (int d = 0; d < D; d++) {
                relT[d * TP + t] = rel_h[t * D + d];
                relT[d * TP + T + t] = rel_w[t * D + d];
            }
    }
    /* per thread; S rows get VL spare floats (the masked vector reads / writes of the bias add) */
    const size_t n_qt = (size_t)round_up(nq * D), n_kt = (size_t)D * ld_max, n_vt = (size_t)win * win * Dvp,
                 n_s = (size_t)nq * ld_max + VL, n_o = (size_t)nq * Dvp;
    const size_t per_thread = n_qt + n_kt + n_vt + round_up(n_s) + n_o + round_up(nq);
    const long n_tasks = (long)B * heads * nbh * nbw;
    int failed = 0;

#pragma omp parallel num_threads(n_threads)
    {
        float *buf = zalloc(sizeof(float) * per_thread);
        const int ok = all_allocated(buf != NULL, &failed);
        float *qt = buf, *kt = qt + n_qt, *vt = kt + n_kt, *S = vt + n_vt, *ob = S + round_up(n_s),
              *inv = ob + n_o;
        int qa[nq], qb[nq];

#pragma omp for schedule(static)
        for (long task = 0; task < n_tasks; task++) {
            if (!ok) continue;   /* (a thread without buffers: the call fails, every thread skips) */
            const int j = task % nbw, i = task / nbw % nbh, hd = task / ((long)nbw * nbh) % heads,
                      b = task / ((long)nbw * nbh * heads);
            /* the window's rows / columns inside the map, and their offsets in the window */
            const int y0 = i * block - halo, x0 = j * block - halo;
            const int r0 = y0 > 0 ? y0 : 0, r1 = y0 + win < H ? y0 + win : H;
            const int c0 = x0 > 0 ? x0 : 0, c1 = x0 + win < W ? x0 + win : W;
            const int nr = r1 - r0, nc = c1 - c0, dr = r0 - y0, dc = c0 - x0;
            const int nk = nr * nc, nkp = round_up(nk), ld = nkp + TP;
            const int n_out = zero_pad ? win * win - nk : 0;

            /* queries of this block inside the query map */
            int n = 0;
            for (int a = 0; a < bq; a++)
                for (int c = 0; c < bq; c++) {
                    const int y = i * bq + a, x = j * bq + c;
                    if (y >= Hq || x >= Wq) continue;
                    qa[n] = a, qb[n] = c;
                    gather(qt + n * D, at(&Q, b, hd, 0, y, x), Q.s[2], D);
                    n++;
                }
            /* keys transposed and scaled, then the relative tables: one product gives both (a
             * second product against relT in place splits the row into narrower tiles: 3% slower) */
            for (int r = 0; r < nr; r++)
                for (int c = 0; c < nc; c++) {
                    const float *src = at(&K, b, hd, 0, r0 + r, c0 + c);
                    float *dst = kt + r * nc + c;
                    for (int d = 0; d < D; d++) dst[(long)d * ld] = scale * src[d * K.s[2]];
                    gather(vt + (long)(r * nc + c) * Dvp, at(&V, b, hd, 0, r0 + r, c0 + c), V.s[2], Dv);
                }
            for (int d = 0; d < D; d++) {
                float *row = kt + (long)d * ld;
                for (int t = nk; t < nkp; t++) row[t] = 0;
                if (T) memcpy(row + nkp, relT + d * TP, sizeof(float) * TP);
            }
            gemm(n, ld, D, qt, D, kt, ld, S, ld);

            const lmask in_row = lanes_below(nc);
            for (int t = 0; t < n; t++) {
                float *s = S + (long)t * ld;
                /* lh[w] / lw[w]: the query's relative logit to window row / column w */
                const float *lh = s + nkp + (win - 1 - qa[t]), *lw = s + nkp + T + (win - 1 - qb[t]);
                if (T && nc <= VL) {
                    /* row r of the keys += lh[dr + r] + lw[dc:dc + nc]; lanes past the row add 0 */
                    const vf lwv = vload(lw + dc);
                    for (int r = 0; r < nr; r++)
                        vstore(s + r * nc, vload(s + r * nc) + vsel(in_row, lwv + lh[dr + r], (vf){0}));
                } else if (T) {
                    for (int r = 0; r < nr; r++)
                        for (int c = 0; c < nc; c++) s[r * nc + c] += lh[dr + r] + lw[dc + c];
                }
                /* zero keys outside the map (border_blocks): their blocks' largest logits enter the
                 * row's maximum, their weights its sum. Without relative terms: n_out keys of logit 0. */
                vf bmax = vsplat(-INFINITY), bsum = {0};
                if (n_out && T)
                    (win <= VL ? border : border_scalar)(lh, lw, win, dr, dr + nr, dc, dc + nc, &bmax, &bsum);
                else if (n_out)
                    bmax = vsel(lanes_below(1), (vf){0}, bmax), bsum = vsel(lanes_below(1), vsplat(n_out), bsum);
                const float m = max_row(s, nk, bmax);
                const float denom = exp_row(s, nk, m, bsum * vexp(bmax - m));   /* vexp(-inf) = e^-86: times 0 */
                inv[t] = 1.0f / denom;
            }
            gemm(n, Dvp, nk, S, ld, vt, Dvp, ob, Dvp);
            for (int t = 0; t < n; t++) {
                float *o = (float *)at(&O, b, hd, 0, i * bq + qa[t], j * bq + qb[t]);
                const float *src = ob + t * Dvp;
                const float w = inv[t];
                if (O.s[2] == 1)
                    for (int e = 0; e < Dv; e++) o[e] = src[e] * w;
                else
                    for (int e = 0; e < Dv; e++) o[e * O.s[2]] = src[e] * w;
            }
        }
        free(buf);
    }
    free(relT);
    return failed;
}
