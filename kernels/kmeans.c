/* k-means on the CPU: fused k-means++ steps and exact bounds-pruned Lloyd loops.
 *
 * Called from pccfast/kmeans.py (backend "native") through ctypes; one problem per batch
 * item, items spread over OpenMP threads. Points are float32 and already centred.
 *
 * Two layouts, chosen by the width D of the points:
 * - narrow (D <= NARROW_D, the refinement's (R, G, B, x, y) pixels): points transposed,
 *   (D, N) per item. Distances are computed for blocks of BLK points at once, vectorised
 *   over the points; Hamerly's bounds (one upper bound u on the distance to the own centre,
 *   one lower bound l on the distance to every other centre) skip the points that cannot
 *   move, and the remaining ones are gathered into a block.
 * - wide (the attention features, D = 632): points as rows, (N, D) per item. Distances are
 *   dot-like loops over D with several partial sums; Elkan's bounds (u, and one lower bound
 *   per point and centre) skip single point-centre distances.
 *
 * Exactness: every pruning test carries a relative margin (MARGIN) far above the rounding
 * of a computed distance or of a bound update, so a skipped distance is one that could not
 * have won: labels and centres equal those of plain Lloyd with the same distance arithmetic
 * (pruning off: prune = 0; tested). Cluster sums are kept in double and updated only for
 * points that move.
 *
 * Semantics as scikit-learn's Lloyd: an iteration is an E-step then an M-step; stop when the
 * labels did not change (strict), or the summed squared centre shift is <= tol_abs, or after
 * max_iter iterations; then a final E-step unless strict. Ties go to the lower centre index.
 * An empty cluster takes one of the points farthest from their centres (the j-th empty
 * cluster the j-th farthest), which leaves its old cluster.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define NARROW_D 16
#define BLK 256
#define MARGIN 1e-4f

#define W 16
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); } /* m ? a : b */

/* squared distance of two float rows of length D: two vector accumulators, a tree sum */
static inline float dist_row(const float *restrict x, const float *restrict c, int64_t D) {
    vf a0 = {0}, a1 = {0};
    int64_t d = 0;
    for (; d + 2 * W <= D; d += 2 * W) {
        vf x0, c0, x1, c1;
        memcpy(&x0, x + d, sizeof(vf));
        memcpy(&c0, c + d, sizeof(vf));
        memcpy(&x1, x + d + W, sizeof(vf));
        memcpy(&c1, c + d + W, sizeof(vf));
        vf t0 = x0 - c0, t1 = x1 - c1;
        a0 += t0 * t0;
        a1 += t1 * t1;
    }
    for (; d + W <= D; d += W) {
        vf x0, c0;
        memcpy(&x0, x + d, sizeof(vf));
        memcpy(&c0, c + d, sizeof(vf));
        vf t0 = x0 - c0;
        a0 += t0 * t0;
    }
    a0 += a1;
    float f[W];
    memcpy(f, &a0, sizeof f);
    for (int h = W / 2; h >= 1; h /= 2)
        for (int q = 0; q < h; ++q) f[q] += f[q + h];
    float acc = f[0];
    for (; d < D; ++d) {
        float t = x[d] - c[d];
        acc += t * t;
    }
    return acc;
}


/* ------------------------------------------------------------------ distances */

/* squared distances of one row x (D,) to T rows c (T, D) -> out (T,), x loaded once per
 * chunk for all T (T a compile-time constant after inlining: accumulators in registers) */
static inline __attribute__((always_inline)) void dist_multi_t(const float *restrict x, const float *restrict c,
                                                               const int T, int64_t D, float *restrict out) {
    vf acc[16];
    for (int t = 0; t < T; ++t) acc[t] = (vf){0};
    int64_t d = 0;
    for (; d + W <= D; d += W) {
        vf xv;
        memcpy(&xv, x + d, sizeof(vf));
        for (int t = 0; t < T; ++t) {
            vf cv;
            memcpy(&cv, c + t * D + d, sizeof(vf));
            vf diff = xv - cv;
            acc[t] += diff * diff;
        }
    }
    for (int t = 0; t < T; ++t) {
        float f[W];
        memcpy(f, &acc[t], sizeof f);
        for (int h = W / 2; h >= 1; h /= 2)
            for (int q = 0; q < h; ++q) f[q] += f[q + h];
        float a = f[0];
        for (int64_t e = d; e < D; ++e) {
            float diff = x[e] - c[t * D + e];
            a += diff * diff;
        }
        out[t] = a;
    }
}

#define MULTI_CASE(TT)                          \
    case TT:                                    \
        dist_multi_t(x, c, TT, D, out);         \
        break;

/* dist_multi_t for any T (rows past 12 one at a time) */
static void dist_multi(const float *restrict x, const float *restrict c, int64_t T, int64_t D, float *restrict out) {
    switch (T) {
        MULTI_CASE(1) MULTI_CASE(2) MULTI_CASE(3) MULTI_CASE(4) MULTI_CASE(5) MULTI_CASE(6)
        MULTI_CASE(7) MULTI_CASE(8) MULTI_CASE(9) MULTI_CASE(10) MULTI_CASE(11) MULTI_CASE(12)
    default:
        for (int64_t t = 0; t < T; ++t) out[t] = dist_row(x, c + t * D, D);
    }
}

/* squared distances of the n <= BLK points of a transposed block (D rows of stride `stride`)
 * to centre c (D,) -> out (n,) */
static inline void dist_block(const float *restrict xt, int64_t stride, int64_t D, int n, const float *restrict c,
                              float *restrict out) {
    {
        const float c0 = c[0];
#pragma omp simd
        for (int p = 0; p < n; ++p) {
            float t = xt[p] - c0;
            out[p] = t * t;
        }
    }
    for (int64_t d = 1; d < D; ++d) {
        const float cd = c[d];
        const float *restrict xr = xt + d * stride;
#pragma omp simd
        for (int p = 0; p < n; ++p) {
            float t = xr[p] - cd;
            out[p] += t * t;
        }
    }
}

/* nearest and second-nearest of k centres (k, D) for W points of a transposed block (D
 * rows of stride `stride`), D a compile-time constant after inlining so the coordinates and
 * running minima stay in registers: bi (n,) first index of the minimum, m1 (n,) its squared
 * distance, m2 (n,) the second (n <= W; lanes past n compute on zeros and are dropped) */
static inline __attribute__((always_inline)) void assign_w(const float *restrict xt, int64_t stride, const int D,
                                                          int n, const float *restrict cen, int64_t k,
                                                          int32_t *restrict bi, float *restrict m1,
                                                          float *restrict m2) {
    vf xv[NARROW_D];
    if (n == W) {
        for (int d = 0; d < D; ++d) memcpy(&xv[d], xt + d * stride, sizeof(vf));
    } else {
        for (int d = 0; d < D; ++d) {
            float tmp[W] = {0};
            for (int q = 0; q < n; ++q) tmp[q] = xt[d * stride + q];
            memcpy(&xv[d], tmp, sizeof(vf));
        }
    }
    const vf inf = (vf){0} + INFINITY;
    vf b1 = inf, b2 = inf;
    vi bj = (vi){0};
    for (int64_t j = 0; j < k; ++j) {
        const float *c = cen + j * D;
        vf t = xv[0] - c[0];
        vf dist = t * t;
        for (int d = 1; d < D; ++d) {
            t = xv[d] - c[d];
            dist += t * t;
        }
        /* branch-free: second = min(second, max(first, v)), first = min(first, v) */
        vi lt = dist < b1;
        vf hi = vsel(lt, b1, dist);
        b2 = vsel(hi < b2, hi, b2);
        b1 = vsel(lt, dist, b1);
        bj = (bj & ~lt) | (((vi){0} + (int32_t)j) & lt);
    }
    float f1[W], f2[W];
    int32_t fj[W];
    memcpy(f1, &b1, sizeof f1);
    memcpy(f2, &b2, sizeof f2);
    memcpy(fj, &bj, sizeof fj);
    for (int q = 0; q < n; ++q) {
        bi[q] = fj[q];
        m1[q] = f1[q];
        m2[q] = f2[q];
    }
}

#define ASSIGN_CASE(DD)                                                                 \
    case DD:                                                                            \
        for (int p = 0; p < n; p += W)                                                  \
            assign_w(xt + p, stride, DD, n - p < W ? n - p : W, cen, k, bi + p, m1 + p, m2 + p); \
        break;

/* assign_w over a block of n <= BLK points */
static void assign_block(const float *restrict xt, int64_t stride, int64_t D, int n, const float *restrict cen,
                         int64_t k, int32_t *restrict bi, float *restrict m1, float *restrict m2) {
    switch (D) {
        ASSIGN_CASE(1) ASSIGN_CASE(2) ASSIGN_CASE(3) ASSIGN_CASE(4) ASSIGN_CASE(5) ASSIGN_CASE(6)
        ASSIGN_CASE(7) ASSIGN_CASE(8) ASSIGN_CASE(9) ASSIGN_CASE(10) ASSIGN_CASE(11) ASSIGN_CASE(12)
        ASSIGN_CASE(13) ASSIGN_CASE(14) ASSIGN_CASE(15) ASSIGN_CASE(16)
    default:
        break; /* wide points never come here */
    }
}

/* ------------------------------------------------------------------ shared per-problem state */

typedef struct {
    int64_t N, D, k;
    const float *x;  /* narrow: (D, N) transposed; wide: (N, D) rows */
    int32_t *lab;    /* (N,) */
    int32_t *list;   /* narrow: (N,) points a pruned pass has to look at */
    float *u;        /* (N,) upper bound on the distance to the own centre */
    float *l;        /* narrow: (N,) lower bound to any other centre; wide: (N, k) per centre */
    double *sums;    /* (k, D) */
    int64_t *counts; /* (k,) */
    float *cen;      /* (k, D) current centres */
    float *shift;    /* (k,) last M-step's centre shifts (distances) */
    float *half;     /* (k,) half the distance to the nearest other centre */
    float *cc;       /* (k, k) half centre-centre distances (wide) */
    float max1, max2;
    int64_t arg1;
    int pending;     /* bounds not yet moved by the last M-step's shifts */
} prob_t;

static inline float coord(const prob_t *s, int64_t i, int64_t d) {
    return s->D <= NARROW_D ? s->x[d * s->N + i] : s->x[i * s->D + d];
}

static inline void move_point(prob_t *s, int64_t i, int32_t from, int32_t to) {
    double *sf = s->sums + (int64_t)from * s->D, *st = s->sums + (int64_t)to * s->D;
    for (int64_t d = 0; d < s->D; ++d) {
        float v = coord(s, i, d);
        sf[d] -= v;
        st[d] += v;
    }
    s->counts[from] -= 1;
    s->counts[to] += 1;
    s->lab[i] = to;
}

static inline int skip(float u, float bound) { return u * (1.0f + MARGIN) < bound * (1.0f - MARGIN); }

static void centre_gaps(prob_t *s) {
    const int64_t k = s->k, D = s->D;
    for (int64_t j = 0; j < k; ++j) s->half[j] = INFINITY;
    for (int64_t a = 0; a < k; ++a) {
        if (s->cc) s->cc[a * k + a] = 0.f;
        for (int64_t b = a + 1; b < k; ++b) {
            double acc = 0.0;
            for (int64_t d = 0; d < D; ++d) {
                double t = (double)s->cen[a * D + d] - (double)s->cen[b * D + d];
                acc += t * t;
            }
            float h = (float)(0.5 * sqrt(acc));
            if (s->cc) s->cc[a * k + b] = s->cc[b * k + a] = h;
            if (h < s->half[a]) s->half[a] = h;
            if (h < s->half[b]) s->half[b] = h;
        }
    }
}

/* ------------------------------------------------------------------ E-steps */

/* new labels and bounds of the cnt points idx[] from their assign_block results */
static int64_t settle_narrow(prob_t *s, const int32_t *idx, int cnt, const int32_t *bi, const float *m1,
                             const float *m2, int fresh) {
    int64_t changed = 0;
    for (int p = 0; p < cnt; ++p) {
        int64_t i = idx[p];
        s->u[i] = sqrtf(m1[p]);
        s->l[i] = sqrtf(m2[p]);
        if (fresh) {
            s->lab[i] = bi[p];
            for (int64_t d = 0; d < s->D; ++d) s->sums[(int64_t)bi[p] * s->D + d] += s->x[d * s->N + i];
            s->counts[bi[p]] += 1;
            ++changed;
        } else if (bi[p] != s->lab[i]) {
            move_point(s, i, s->lab[i], bi[p]);
            ++changed;
        }
    }
    return changed;
}

/* narrow points: Hamerly pass (prune) or full pass; fresh = first pass (labels unset).
 * Returns the number of points whose label changed. */
static int64_t estep_narrow(prob_t *s, int prune, int fresh) {
    const int64_t N = s->N, D = s->D, k = s->k;
    int64_t changed = 0;
    int32_t idx[BLK], bi[BLK];
    float m1[BLK], m2[BLK], g[NARROW_D * BLK];
    if (!prune || fresh) { /* every point, in contiguous blocks */
        for (int64_t start = 0; start < N; start += BLK) {
            int cnt = (int)(N - start < BLK ? N - start : BLK);
            for (int p = 0; p < cnt; ++p) idx[p] = (int32_t)(start + p);
            assign_block(s->x + start, N, D, cnt, s->cen, k, bi, m1, m2);
            changed += settle_narrow(s, idx, cnt, bi, m1, m2, fresh);
        }
        s->pending = 0;
        return changed;
    }
    /* move the bounds by the last shifts (an M-step always precedes a pruned pass) and list
     * the points they cannot settle, without branches */
    int32_t *list = s->list;
    int64_t m = 0;
    const float *shift = s->shift, *half = s->half;
    const float max1 = s->max1, max2 = s->max2;
    const int32_t arg1 = (int32_t)s->arg1;
    for (int64_t i = 0; i < N; ++i) {
        int32_t a = s->lab[i];
        float u = s->u[i] + shift[a];
        float l = s->l[i] - (a == arg1 ? max2 : max1);
        s->u[i] = u;
        s->l[i] = l;
        float bound = l > half[a] ? l : half[a];
        list[m] = (int32_t)i;
        m += !skip(u, bound);
    }
    for (int64_t start = 0; start < m; start += BLK) { /* gather the listed points into blocks */
        int n = (int)(m - start < BLK ? m - start : BLK);
        const int32_t *ids = list + start;
        for (int64_t d = 0; d < D; ++d)
            for (int p = 0; p < n; ++p) g[d * BLK + p] = s->x[d * N + ids[p]];
        assign_block(g, BLK, D, n, s->cen, k, bi, m1, m2);
        changed += settle_narrow(s, ids, n, bi, m1, m2, 0);
    }
    s->pending = 0;
    return changed;
}

/* wide points: Elkan pass (prune) or full pass. Returns the number of changed labels. */
static int64_t estep_wide(prob_t *s, int prune, int fresh) {
    const int64_t N = s->N, D = s->D, k = s->k;
    int64_t changed = 0;
    for (int64_t i = 0; i < N; ++i) {
        const float *xi = s->x + i * D;
        float *li = s->l + i * k;
        int32_t a = fresh ? 0 : s->lab[i];
        if (!prune || fresh) {
            float best = INFINITY;
            int32_t bj = 0;
            dist_multi(xi, s->cen, k, D, li);
            for (int64_t j = 0; j < k; ++j) {
                float v = sqrtf(li[j]);
                li[j] = v;
                if (v < best) {
                    best = v;
                    bj = (int32_t)j;
                }
            }
            s->u[i] = best;
            if (fresh) {
                s->lab[i] = bj;
                for (int64_t d = 0; d < D; ++d) s->sums[(int64_t)bj * D + d] += xi[d];
                s->counts[bj] += 1;
                ++changed;
            } else if (bj != a) {
                move_point(s, i, a, bj);
                ++changed;
            }
            continue;
        }
        if (s->pending) {
            s->u[i] += s->shift[a];
            for (int64_t j = 0; j < k; ++j) li[j] -= s->shift[j];
        }
        if (skip(s->u[i], s->half[a])) continue;
        int tight = 0;
        float u = s->u[i];
        int32_t cur = a;
        for (int64_t j = 0; j < k; ++j) {
            if (j == cur) continue;
            float gap = s->cc[cur * k + j];
            if (skip(u, li[j]) || skip(u, gap)) continue;
            if (!tight) { /* the exact distance to the own centre first */
                u = sqrtf(dist_row(xi, s->cen + (int64_t)cur * D, D));
                li[cur] = u;
                tight = 1;
                if (skip(u, li[j]) || skip(u, gap)) continue;
            }
            float v = sqrtf(dist_row(xi, s->cen + j * D, D));
            li[j] = v;
            if (v < u || (v == u && j < cur)) { /* first minimum, as plain argmin */
                cur = (int32_t)j;
                u = v;
            }
        }
        s->u[i] = u;
        if (cur != a) {
            move_point(s, i, a, cur);
            ++changed;
        }
    }
    s->pending = 0;
    return changed;
}

/* ------------------------------------------------------------------ Lloyd */

static inline float own_dist(const prob_t *s, int64_t i) {
    const int64_t D = s->D;
    const float *c = s->cen + (int64_t)s->lab[i] * D;
    if (D > NARROW_D) return dist_row(s->x + i * D, c, D);
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) {
        float t = s->x[d * s->N + i] - c[d];
        acc += t * t;
    }
    return acc;
}

/* Empty clusters take the farthest points. Returns 1 if any was relocated. */
static int relocate_empty(prob_t *s) {
    int64_t n_empty = 0;
    for (int64_t j = 0; j < s->k; ++j) n_empty += s->counts[j] == 0;
    if (n_empty == 0) return 0;
    float *dd = malloc(sizeof(float) * s->N);
    if (!dd) return -1;
    for (int64_t i = 0; i < s->N; ++i) dd[i] = own_dist(s, i);
    for (int64_t j = 0; j < s->k; ++j) {
        if (s->counts[j] != 0) continue;
        int64_t far = 0;
        for (int64_t i = 1; i < s->N; ++i)
            if (dd[i] > dd[far]) far = i;
        dd[far] = -1.f; /* taken */
        move_point(s, far, s->lab[far], (int32_t)j);
    }
    free(dd);
    return 1;
}

/* M-step: centres from the sums; shifts for the bounds. Returns the summed squared shift. */
static double mstep(prob_t *s) {
    const int64_t k = s->k, D = s->D;
    double tot = 0.0;
    s->max1 = s->max2 = 0.f;
    s->arg1 = -1;
    for (int64_t j = 0; j < k; ++j) {
        double acc = 0.0;
        for (int64_t d = 0; d < D; ++d) {
            float old = s->cen[j * D + d];
            float v = s->counts[j] > 0 ? (float)(s->sums[j * D + d] / (double)s->counts[j]) : old;
            double t = (double)v - (double)old;
            acc += t * t;
            s->cen[j * D + d] = v;
        }
        tot += acc;
        /* rounded up so that a bound moved by it stays a bound */
        float sh = (float)sqrt(acc) * (1.0f + 1e-6f);
        s->shift[j] = sh;
        if (sh > s->max1) {
            s->max2 = s->max1;
            s->max1 = sh;
            s->arg1 = j;
        } else if (sh > s->max2) {
            s->max2 = sh;
        }
    }
    s->pending = 1;
    return tot;
}

static int64_t lloyd_one(const float *x, int64_t N, int64_t D, int64_t k, float *cen, int64_t *labels_out,
                         float *mind, double tol_abs, int64_t max_iter, int prune) {
    const int wide = D > NARROW_D;
    prob_t s;
    memset(&s, 0, sizeof(s));
    s.N = N, s.D = D, s.k = k, s.x = x, s.cen = cen;
    s.lab = malloc(sizeof(int32_t) * N);
    s.u = malloc(sizeof(float) * N);
    s.l = malloc(sizeof(float) * N * (wide ? k : 1));
    s.sums = calloc((size_t)(k * D), sizeof(double));
    s.counts = calloc((size_t)k, sizeof(int64_t));
    s.shift = calloc((size_t)k, sizeof(float));
    s.half = malloc(sizeof(float) * k);
    s.cc = wide ? malloc(sizeof(float) * k * k) : NULL;
    s.list = wide ? NULL : malloc(sizeof(int32_t) * N);
    int64_t it = 0;
    if (!s.lab || !s.u || !s.l || !s.sums || !s.counts || !s.shift || !s.half || (wide && !s.cc) || (!wide && !s.list)) {
        it = -1;
        goto out;
    }
    int64_t (*estep)(prob_t *, int, int) = wide ? estep_wide : estep_narrow;
    estep(&s, 0, 1);
    int strict = 0, full_next = 0;
    for (it = 0; it < max_iter; ++it) {
        int64_t changed = -1;
        if (it > 0) {
            int p = prune && !full_next;
            if (p) centre_gaps(&s);
            changed = estep(&s, p, 0);
        }
        int was_full = full_next;
        int rel = relocate_empty(&s);
        if (rel < 0) {
            it = -1;
            goto out;
        }
        full_next = rel;
        double shift_tot = mstep(&s);
        if (it > 0 && changed == 0 && !was_full && !rel) {
            strict = 1;
            break;
        }
        if (shift_tot <= tol_abs) break;
    }
    if (it >= max_iter) it = max_iter - 1; /* ran out: max_iter iterations */
    if (!strict) {                         /* final E-step with the final centres */
        int p = prune && !full_next;
        if (p) centre_gaps(&s);
        estep(&s, p, 0);
    }
    for (int64_t i = 0; i < N; ++i) labels_out[i] = s.lab[i];
    if (mind)
        for (int64_t i = 0; i < N; ++i) mind[i] = own_dist(&s, i);
    it += 1;
out:
    free(s.lab), free(s.u), free(s.l), free(s.sums), free(s.counts), free(s.shift), free(s.half), free(s.cc), free(s.list);
    return it;
}

/* Lloyd for B problems. x: (B, D, N) if D <= 16 else (B, N, D), float32, centred;
 * centres (B, k, D) in: initial, out: final; labels (B, N) out; min_dist (B, N) out (squared
 * distance to the own centre) or NULL; tol_abs (B,); n_iter (B,) out (iterations run).
 * Returns 0, or -1 if an allocation failed. */
int pcc_kmeans_lloyd(const float *x, int64_t B, int64_t N, int64_t D, int64_t k, float *centres, int64_t *labels,
                     float *min_dist, const double *tol_abs, int64_t max_iter, int32_t prune, int32_t n_threads,
                     int64_t *n_iter) {
    int fail = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) reduction(| : fail)
    for (int64_t b = 0; b < B; ++b) {
        int64_t r = lloyd_one(x + b * N * D, N, D, k, centres + b * k * D, labels + b * N,
                              min_dist ? min_dist + b * N : NULL, tol_abs[b], max_iter, prune);
        n_iter[b] = r;
        fail |= r < 0;
    }
    return fail ? -1 : 0;
}

/* ------------------------------------------------------------------ k-means++ */

/* One greedy k-means++ step for B problems (layout as pcc_kmeans_lloyd). cand (B, T, D):
 * candidate rows; the potential of candidate t is sum_i min(closest_i, |x_i - cand_t|^2)
 * (double); chosen (B,) = the lowest potential (first on ties); closest (B, N) is lowered
 * with it. A first step is T = 1 with closest = +inf. potentials (B, T) out or NULL. */
void pcc_kmeanspp_step(const float *x, int64_t B, int64_t N, int64_t D, const float *cand, int64_t T,
                       float *closest, int64_t *chosen, double *potentials, int32_t n_threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t b = 0; b < B; ++b) {
        const float *xb = x + b * N * D, *cb = cand + b * T * D;
        float *cl = closest + b * N;
        double pot_s[16];
        double *pot = T <= 16 ? pot_s : malloc(sizeof(double) * T);
        float *dstore = NULL; /* wide points: (N, T) distances of this step */
        for (int64_t t = 0; t < T; ++t) pot[t] = 0.0;
        if (D <= NARROW_D) {
            float dist[BLK];
            for (int64_t s0 = 0; s0 < N; s0 += BLK) {
                int n = (int)(N - s0 < BLK ? N - s0 : BLK);
                for (int64_t t = 0; t < T; ++t) {
                    dist_block(xb + s0, N, D, n, cb + t * D, dist);
                    float part = 0.f;
#pragma omp simd reduction(+ : part)
                    for (int p = 0; p < n; ++p) {
                        float c = cl[s0 + p];
                        part += dist[p] < c ? dist[p] : c;
                    }
                    pot[t] += part;
                }
            }
        } else { /* all T distances of a point at once, kept for the update below */
            dstore = malloc(sizeof(float) * N * T);
            float tmp[64];
            for (int64_t i = 0; i < N; ++i) {
                float *o = dstore ? dstore + i * T : tmp;
                if (T <= 64 || dstore) dist_multi(xb + i * D, cb, T, D, o);
                for (int64_t t = 0; t < T; ++t) {
                    float v = T <= 64 || dstore ? o[t] : dist_row(xb + i * D, cb + t * D, D);
                    pot[t] += v < cl[i] ? v : cl[i];
                }
            }
        }
        int64_t best = 0;
        for (int64_t t = 1; t < T; ++t)
            if (pot[t] < pot[best]) best = t;
        chosen[b] = best;
        if (potentials)
            for (int64_t t = 0; t < T; ++t) potentials[b * T + t] = pot[t];
        if (D <= NARROW_D) {
            float dist[BLK];
            for (int64_t s0 = 0; s0 < N; s0 += BLK) {
                int n = (int)(N - s0 < BLK ? N - s0 : BLK);
                dist_block(xb + s0, N, D, n, cb + best * D, dist);
#pragma omp simd
                for (int p = 0; p < n; ++p) cl[s0 + p] = dist[p] < cl[s0 + p] ? dist[p] : cl[s0 + p];
            }
        } else {
            for (int64_t i = 0; i < N; ++i) {
                float v = dstore ? dstore[i * T + best] : dist_row(xb + i * D, cb + best * D, D);
                if (v < cl[i]) cl[i] = v;
            }
        }
        free(dstore);
        if (pot != pot_s) free(pot);
    }
}
