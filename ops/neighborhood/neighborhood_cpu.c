/* Neighborhood attention forward, fp32, CPU inference: for every query the logits of its kernel x kernel window
 * (q . k * scale + relative-position bias) and, optionally, of extra keys shared by the whole map (TransNeXt's
 * pooled tokens, with their bias given by factors: table[head][index_h[y][i]][index_w[x][j]]), one softmax over
 * both, and the values weighted by it (window weights, TransNeXt's learnable tokens, added to the window slots'
 * probabilities), in one pass per block of queries while their windows are in cache.
 *
 * Built on first use by ops/_native.py and called through ctypes from ops/neighborhood/cpu.py. Why: the blocked
 * PyTorch path (NAT / DiNAT) computes four times the products it keeps (a tile's queries against its whole key
 * region) and gathers tiles, slots and probabilities around them (gathers, scatters, fills and copies: 27% of
 * NAT-T's batch-8 forward; its batched products, most of them discarded, another 16%); the extra-key path
 * (TransNeXt) is a dozen passes over (queries x slots) tensors. Here a query's window costs its k*k dot
 * products and k*k value rows; the extra keys of a block of queries are two register-blocked products.
 *
 * The window geometry comes from Python (ops/neighborhood/geometry.axis_windows, so both borders and any
 * dilation are the same as every other backend's): per map row / column the k key positions, whether each is
 * a window slot (``valid``) and its relative-position index into the (2k-1) x (2k-1) bias table. Strides are in
 * elements: (b, head, y, x) for q, k, v, out, (b, head, key) for the extra keys and values, (b, head, y, x, slot)
 * for the window weights; the head dimension is contiguous (stride 1).
 */
#include <math.h>
#include <stdlib.h>
#include <omp.h>

#include "../_vec.h"

#define RB 32   /* queries per block (along a row) */

/* q . key for four keys at once (one shuffle network for the four sums); D's tail as a masked vector */
static inline void dot4(const float *restrict qa, int D, const float *const *kp, float *dst) {
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (int d = 0; d < D; d += VL) {
        const int n = D - d;
        const vf x = n >= VL ? vload(qa + d) : vload_n(qa + d, n);
        if (n >= VL) {
            a0 += x * vload(kp[0] + d);
            a1 += x * vload(kp[1] + d);
            a2 += x * vload(kp[2] + d);
            a3 += x * vload(kp[3] + d);
        } else {
            a0 += x * vload_n(kp[0] + d, n);
            a1 += x * vload_n(kp[1] + d, n);
            a2 += x * vload_n(kp[2] + d, n);
            a3 += x * vload_n(kp[3] + d, n);
        }
    }
    const vf r = REDUCE4(a0, a1, a2, a3, vsum);
    for (int i = 0; i < 4; i++) dst[i] = r[4 * i];
}

typedef struct {          /* extra keys shared by the map (P = 0: none) */
    const float *k, *v;   /* (B, heads, P, D) / (B, heads, P, Dv), strides ks / vs */
    const long *ks, *vs;
    int P;
    const float *table;   /* bias table (1 | heads, Uh, Uw), contiguous, or NULL */
    int table_heads, Uh, Uw, ph, pw;
    const int *ih, *iw;   /* (H, ph) / (W, pw) indices into the table's rows / columns */
    const float *bias;    /* or the bias as a tensor (B, heads, H, W, P), strides bs (0: broadcast), or NULL */
    const long *bs;
} extra_t;

int mz_neighborhood_forward(const float *q, const long *qs, const float *k, const long *ks, const float *v,
                            const long *vs, const float *rpb, const float *ww, const long *ws, float *out,
                            const long *os, int B, int NH, int H, int W, int D, int Dv, int K, const int *rpos,
                            const int *rrel, const int *rvalid, const int *cpos, const int *crel, const int *cvalid,
                            const extra_t *ex, float scale, int n_threads) {
    const int K2 = K * K, K2p = round_up(K2 + 3), T = 2 * K - 1, P = ex->P, Pp = round_up(P), Dvp = round_up(Dv);
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        /* per query of a block: its window's logits, key / value rows and slot numbers; the block's queries,
         * extra-key logits and extra-value sums; the packed extra keys (transposed) and values of one image */
        float *s = zalloc((size_t)RB * K2p * sizeof(float)), *qa = zalloc((size_t)RB * D * sizeof(float));
        const float **kp = zalloc((size_t)(K2 + 3) * sizeof(float *));
        const float **vp = zalloc((size_t)RB * K2 * sizeof(float *));
        int *slot = zalloc((size_t)RB * K2 * sizeof(int)), *count = zalloc(RB * sizeof(int));
        float *bias = zalloc((size_t)K2 * sizeof(float)), *recip = zalloc(RB * sizeof(float));
        float *se = P ? zalloc((size_t)RB * Pp * sizeof(float)) : NULL;
        float *o = P ? zalloc((size_t)RB * Dvp * sizeof(float)) : NULL;
        float *kt = P ? zalloc((size_t)NH * D * Pp * sizeof(float)) : NULL;
        float *ve = P ? zalloc((size_t)NH * P * Dvp * sizeof(float)) : NULL;
        long packed = -1;   /* the image whose extra keys (every head's) kt / ve hold */
        if (all_allocated(s && qa && kp && vp && slot && count && bias && recip && (!P || (se && o && kt && ve)),
                          &failed)) {
#pragma omp for schedule(static)
            for (long task = 0; task < (long)B * NH * H; task++) {
                /* heads innermost: the heads of a token share its cache lines (q, k, v are views of one projection) */
                const int h = task % NH, y = task / NH % H, b = task / NH / H;
                const float *kb = k + b * ks[0] + h * ks[1], *vb = v + b * vs[0] + h * vs[1];
                const float *table = rpb ? rpb + (long)h * T * T : NULL;
                const int *rp = rpos + y * K, *rr = rrel + y * K, *rv = rvalid + y * K;
                if (P && packed != b) {   /* (kt's and ve's row tails stay 0 from zalloc) */
                    for (int g = 0; g < NH; g++) {
                        const float *ekb = ex->k + b * ex->ks[0] + g * ex->ks[1];
                        const float *evb = ex->v + b * ex->vs[0] + g * ex->vs[1];
                        pack_transposed(kt + (long)g * D * Pp, Pp, ekb, ex->ks[2], 1, P, D, 1.0f);
                        pack_rows(ve + (long)g * P * Dvp, Dvp, evb, ex->vs[2], 1, P, Dv);
                    }
                    packed = b;
                }
                const float *kth = P ? kt + (long)h * D * Pp : NULL, *veh = P ? ve + (long)h * P * Dvp : NULL;
                const float *etab = ex->table ? ex->table + (long)(ex->table_heads > 1 ? h : 0) * ex->Uh * ex->Uw
                                              : NULL;
                for (int x0 = 0; x0 < W; x0 += RB) {
                    const int rb = W - x0 < RB ? W - x0 : RB;
                    pack_rows(qa, D, q + b * qs[0] + h * qs[1] + y * qs[2] + x0 * qs[3], qs[3], 1, rb, D);
                    if (P) {   /* the block's extra-key logits, scaled, plus their bias */
                        gemm(rb, Pp, D, qa, D, kth, Pp, se, Pp);
                        for (int i = 0; i < rb; i++) {
                            float *row = se + (long)i * Pp;
                            const int *iwx = etab ? ex->iw + (long)(x0 + i) * ex->pw : NULL;
                            for (int e = 0; e < P; e++) row[e] *= scale;
                            if (ex->bias) {
                                const float *br = ex->bias + b * ex->bs[0] + h * ex->bs[1] + y * ex->bs[2]
                                                  + (x0 + i) * ex->bs[3];
                                for (int e = 0; e < P; e++) row[e] += br[e * ex->bs[4]];
                            } else if (etab)
                                for (int a = 0; a < ex->ph; a++) {
                                    const float *trow = etab + (long)ex->ih[(long)y * ex->ph + a] * ex->Uw;
                                    for (int c = 0; c < ex->pw; c++) row[a * ex->pw + c] += trow[iwx[c]];
                                }
                        }
                    }
                    for (int i = 0; i < rb; i++) {   /* window logits, then the softmax over window + extra keys */
                        const int x = x0 + i, *cp = cpos + x * K, *cr = crel + x * K, *cv = cvalid + x * K;
                        const float **vq = vp + (long)i * K2;
                        int *sq = slot + (long)i * K2, n = 0;
                        float *sw = s + (long)i * K2p;
                        for (int a = 0; a < K; a++) {
                            if (!rv[a]) continue;
                            for (int c = 0; c < K; c++) {
                                if (!cv[c]) continue;
                                kp[n] = kb + rp[a] * ks[2] + cp[c] * ks[3];
                                vq[n] = vb + rp[a] * vs[2] + cp[c] * vs[3];
                                sq[n] = a * K + c;
                                bias[n++] = table ? table[rr[a] * T + cr[c]] : 0.0f;
                            }
                        }
                        for (int j = n; j < n + 3; j++) kp[j] = kp[0];   /* (dot4's padding slots) */
                        for (int j = 0; j < n; j += 4) dot4(qa + i * D, D, kp + j, sw + j);
                        for (int j = 0; j < n; j++) sw[j] = sw[j] * scale + bias[j];
                        float m = max_row(sw, n, vsplat(-INFINITY)), sum;
                        if (P) {
                            float *row = se + (long)i * Pp;
                            m = max_row(row, P, vsplat(m));
                            sum = exp_row(sw, n, m, (vf){0}) + exp_row(row, P, m, (vf){0});
                        } else {
                            sum = exp_row(sw, n, m, (vf){0});
                        }
                        count[i] = n;
                        recip[i] = 1.0f / sum;
                    }
                    if (P) gemm(rb, Dvp, P, se, Pp, veh, Dvp, o, Dvp);   /* the extra values, unnormalised */
                    for (int i = 0; i < rb; i++) {   /* out = window (p + ww) . v + extra sums / sum */
                        const int n = count[i], *sq = slot + (long)i * K2;
                        const float **vq = vp + (long)i * K2, r = recip[i];
                        float *sw = s + (long)i * K2p;
                        const float *wq = ww ? ww + b * ws[0] + h * ws[1] + y * ws[2] + (x0 + i) * ws[3] : NULL;
                        for (int j = 0; j < n; j++) sw[j] = sw[j] * r + (wq ? wq[sq[j] * ws[4]] : 0.0f);
                        float *dst = out + b * os[0] + h * os[1] + y * os[2] + (x0 + i) * os[3];
                        const float *oi = P ? o + (long)i * Dvp : NULL;
                        for (int c = 0; c < Dv; c += VL) {
                            const int m = Dv - c;
                            vf acc = oi ? vload(oi + c) * r : (vf){0};   /* (o's rows are Dvp wide) */
                            if (m >= VL) {
                                for (int j = 0; j < n; j++) acc += vsplat(sw[j]) * vload(vq[j] + c);
                                vstore(dst + c, acc);
                            } else {
                                for (int j = 0; j < n; j++) acc += vsplat(sw[j]) * vload_n(vq[j] + c, m);
                                vstore_n(dst + c, acc, m);
                            }
                        }
                    }
                }
            }
        }
        free(s);
        free(qa);
        free(kp);
        free(vp);
        free(slot);
        free(count);
        free(bias);
        free(recip);
        free(se);
        free(o);
        free(kt);
        free(ve);
    }
    return failed;
}
