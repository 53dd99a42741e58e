/* k-means on the CPU: fused k-means++ steps and an exact bounds-pruned Lloyd loop.
 *
 * Called from pccfast/kmeans.py (backend "native") through ctypes; one problem per batch
 * item, items spread over OpenMP threads. Points are float32 rows (B, N, D), already centred.
 *
 * Lloyd with Hamerly's bounds: every point keeps an upper bound u on the distance to its own
 * centre and a lower bound l on the distance to any other centre; after an M-step u grows by
 * its centre's shift and l shrinks by the largest other shift. A point whose u is below
 * max(l, half the distance from its centre to the nearest other centre) cannot change
 * cluster, so its k distances are not computed. The test carries a relative margin (MARGIN)
 * far above the rounding of a computed distance, so a pruned point is one whose computed
 * distances would have picked the same centre: labels and centres are those of plain Lloyd
 * with the same arithmetic (tested against prune = 0). Cluster sums are kept in double and
 * updated only for points that move.
 *
 * Distances are direct sums of squared differences: for D <= SMALL_D (refinement, D = 5)
 * vectorised over the centres in double, else (features, D = 632) vectorised over D in float.
 *
 * Semantics as scikit-learn's Lloyd: iteration = E-step, M-step; stop when labels did not
 * change (strict) or the summed squared centre shift is <= tol_abs, or after max_iter; then a
 * final E-step unless strict. An empty cluster takes one of the points farthest from their
 * centres (the j-th empty cluster the j-th farthest), which leaves its old cluster.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SMALL_D 16
#define MARGIN 1e-4

typedef struct {
    int64_t N, D, k;
    const float *x; /* (N, D) */
    double *ct;     /* small D: centres transposed (D, k) */
    float *cf;      /* large D: centres (k, D) */
    double *buf;    /* (k,) squared distances of one point */
} space_t;

static void set_centres(space_t *s, const float *c) {
    if (s->D <= SMALL_D) {
        for (int64_t j = 0; j < s->k; ++j)
            for (int64_t d = 0; d < s->D; ++d) s->ct[d * s->k + j] = c[j * s->D + d];
    } else {
        memcpy(s->cf, c, sizeof(float) * s->k * s->D);
    }
}

static inline double dist_large(const float *x, const float *c, int64_t D) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) {
        float t = x[d] - c[d];
        acc += t * t;
    }
    return (double)acc;
}

/* squared distances of point i to all centres into s->buf */
static inline void all_dist(const space_t *s, int64_t i) {
    const float *x = s->x + i * s->D;
    double *out = s->buf;
    const int64_t k = s->k, D = s->D;
    if (D <= SMALL_D) {
        for (int64_t j = 0; j < k; ++j) out[j] = 0.0;
        for (int64_t d = 0; d < D; ++d) {
            const double xd = x[d];
            const double *row = s->ct + d * k;
#pragma omp simd
            for (int64_t j = 0; j < k; ++j) {
                double t = xd - row[j];
                out[j] += t * t;
            }
        }
    } else {
        for (int64_t j = 0; j < k; ++j) out[j] = dist_large(x, s->cf + j * D, D);
    }
}

static inline double one_dist(const space_t *s, int64_t i, int64_t j) {
    const float *x = s->x + i * s->D;
    if (s->D <= SMALL_D) {
        double acc = 0.0;
        for (int64_t d = 0; d < s->D; ++d) {
            double t = (double)x[d] - s->ct[d * s->k + j];
            acc += t * t;
        }
        return acc;
    }
    return dist_large(x, s->cf + j * s->D, s->D);
}

/* best (first minimum) and second-best squared distance in s->buf */
static inline int64_t best_two(const space_t *s, double *b1, double *b2) {
    int64_t best = 0;
    double m1 = s->buf[0], m2 = INFINITY;
    for (int64_t j = 1; j < s->k; ++j) {
        double v = s->buf[j];
        if (v < m1) {
            m2 = m1;
            m1 = v;
            best = j;
        } else if (v < m2) {
            m2 = v;
        }
    }
    *b1 = m1;
    *b2 = m2;
    return best;
}

static inline void move_point(const space_t *s, int64_t i, int64_t from, int64_t to, double *sums, int64_t *counts) {
    const float *x = s->x + i * s->D;
    double *sf = sums + from * s->D, *st = sums + to * s->D;
    for (int64_t d = 0; d < s->D; ++d) {
        sf[d] -= x[d];
        st[d] += x[d];
    }
    counts[from] -= 1;
    counts[to] += 1;
}

/* Assign every point (prune = 0, or first pass: all distances); returns the number of points
 * whose label changed. u, l: bounds (distances, not squared); s_half: (k,) half distance to
 * the nearest other centre (used when pruning). */
static int64_t assign_pass(space_t *s, int64_t *lab, double *u, double *l, const double *s_half, int prune,
                           double *sums, int64_t *counts, int fresh) {
    int64_t changed = 0;
    for (int64_t i = 0; i < s->N; ++i) {
        int64_t a = lab[i];
        if (prune && !fresh) {
            double m = l[i] > s_half[a] ? l[i] : s_half[a];
            if (u[i] * (1.0 + MARGIN) < m * (1.0 - MARGIN)) continue;
        }
        all_dist(s, i);
        double b1, b2;
        int64_t best = best_two(s, &b1, &b2);
        u[i] = sqrt(b1);
        l[i] = sqrt(b2);
        if (fresh) {
            lab[i] = best;
            const float *x = s->x + i * s->D;
            for (int64_t d = 0; d < s->D; ++d) sums[best * s->D + d] += x[d];
            counts[best] += 1;
            ++changed;
        } else if (best != a) {
            move_point(s, i, a, best, sums, counts);
            lab[i] = best;
            ++changed;
        }
    }
    return changed;
}

/* half the distance from every centre to its nearest other centre: (k,) */
static void half_gaps(const float *c, int64_t k, int64_t D, double *out) {
    for (int64_t j = 0; j < k; ++j) out[j] = INFINITY;
    for (int64_t a = 0; a < k; ++a)
        for (int64_t b = a + 1; b < k; ++b) {
            double acc = 0.0;
            for (int64_t d = 0; d < D; ++d) {
                double t = (double)c[a * D + d] - (double)c[b * D + d];
                acc += t * t;
            }
            double h = 0.5 * sqrt(acc);
            if (h < out[a]) out[a] = h;
            if (h < out[b]) out[b] = h;
        }
}

/* One problem. Returns the number of Lloyd iterations run, or -1 on allocation failure. */
static int64_t lloyd_one(const float *x, int64_t N, int64_t D, int64_t k, float *cen, int64_t *lab, float *mind,
                         double tol_abs, int64_t max_iter, int prune) {
    space_t s = {N, D, k, x, NULL, NULL, NULL};
    double *u = malloc(sizeof(double) * N), *l = malloc(sizeof(double) * N);
    double *sums = calloc((size_t)(k * D), sizeof(double)), *shift = malloc(sizeof(double) * k);
    double *gap = malloc(sizeof(double) * k);
    int64_t *counts = calloc((size_t)k, sizeof(int64_t));
    float *newc = malloc(sizeof(float) * k * D);
    s.buf = malloc(sizeof(double) * k);
    if (D <= SMALL_D)
        s.ct = malloc(sizeof(double) * k * D);
    else
        s.cf = malloc(sizeof(float) * k * D);
    int64_t it = 0;
    if (!u || !l || !sums || !shift || !gap || !counts || !newc || !s.buf || (!s.ct && !s.cf)) {
        it = -1;
        goto out;
    }
    set_centres(&s, cen);
    for (int64_t i = 0; i < N; ++i) lab[i] = 0;
    assign_pass(&s, lab, u, l, gap, 0, sums, counts, 1);
    int strict = 0, full_next = 0, relocated = 0;
    for (it = 0; it < max_iter; ++it) {
        int64_t changed = -1;
        if (it > 0) {
            if (prune && !full_next) half_gaps(cen, k, D, gap);
            changed = assign_pass(&s, lab, u, l, gap, prune && !full_next, sums, counts, 0);
            full_next = 0;
        }
        int was_relocated = relocated;
        relocated = 0;
        /* empty clusters: the j-th empty one takes the j-th farthest point */
        int64_t n_empty = 0;
        for (int64_t j = 0; j < k; ++j) n_empty += counts[j] == 0;
        if (n_empty > 0) {
            double *dd = malloc(sizeof(double) * N);
            if (!dd) {
                it = -1;
                goto out;
            }
            for (int64_t i = 0; i < N; ++i) dd[i] = one_dist(&s, i, lab[i]);
            for (int64_t j = 0; j < k; ++j) {
                if (counts[j] != 0) continue;
                int64_t far = 0;
                for (int64_t i = 1; i < N; ++i)
                    if (dd[i] > dd[far]) far = i;
                dd[far] = -1.0; /* taken */
                int64_t from = lab[far];
                move_point(&s, far, from, j, sums, counts);
                lab[far] = j;
            }
            free(dd);
            full_next = 1;
            relocated = 1;
        }
        /* M-step */
        double shift_tot = 0.0, max1 = 0.0, max2 = 0.0;
        int64_t arg1 = -1;
        for (int64_t j = 0; j < k; ++j) {
            double acc = 0.0;
            for (int64_t d = 0; d < D; ++d) {
                float v = counts[j] > 0 ? (float)(sums[j * D + d] / (double)counts[j]) : cen[j * D + d];
                double t = (double)v - (double)cen[j * D + d];
                acc += t * t;
                newc[j * D + d] = v;
            }
            shift_tot += acc;
            shift[j] = sqrt(acc);
            if (shift[j] > max1) {
                max2 = max1;
                max1 = shift[j];
                arg1 = j;
            } else if (shift[j] > max2) {
                max2 = shift[j];
            }
        }
        memcpy(cen, newc, sizeof(float) * k * D);
        set_centres(&s, cen);
        for (int64_t i = 0; i < N; ++i) {
            u[i] += shift[lab[i]];
            l[i] -= lab[i] == arg1 ? max2 : max1;
        }
        if (it > 0 && changed == 0 && !was_relocated && !relocated) {
            strict = 1;
            break;
        }
        if (shift_tot <= tol_abs) break;
    }
    if (it >= max_iter) it = max_iter - 1; /* the loop ran out: report max_iter iterations */
    if (!strict) {                         /* final E-step with the final centres */
        if (prune && !full_next) half_gaps(cen, k, D, gap);
        assign_pass(&s, lab, u, l, gap, prune && !full_next, sums, counts, 0);
    }
    if (mind)
        for (int64_t i = 0; i < N; ++i) mind[i] = (float)one_dist(&s, i, lab[i]);
    it += 1;
out:
    free(u), free(l), free(sums), free(shift), free(gap), free(counts), free(newc), free(s.buf), free(s.ct),
        free(s.cf);
    return it;
}

/* Lloyd for B problems. x (B, N, D) float32 centred; centres (B, k, D) in: initial, out: final;
 * labels (B, N) out; min_dist (B, N) out (squared distance to the own centre) or NULL;
 * tol_abs (B,); n_iter (B,) out. Returns 0, or -1 if an allocation failed. */
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

/* One greedy k-means++ step for B problems: for each of the T candidate rows (B, T, D), the
 * potential sum_i min(closest_i, d(x_i, cand)^2) (double); chosen (B,) = the candidate of
 * the lowest potential (first on ties); closest (B, N) is updated with it. A first step is a
 * step with T = 1 and closest = +inf. potentials (B, T) out or NULL. */
void pcc_kmeanspp_step(const float *x, int64_t B, int64_t N, int64_t D, const float *cand, int64_t T,
                       float *closest, int64_t *chosen, double *potentials, int32_t n_threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t b = 0; b < B; ++b) {
        const float *xb = x + b * N * D, *cb = cand + b * T * D;
        float *cl = closest + b * N;
        double pot[64];
        double *p = T <= 64 ? pot : malloc(sizeof(double) * T);
        space_t s = {N, D, T, xb, NULL, NULL, NULL};
        double ct_local[64 * SMALL_D];
        double buf_local[64];
        double *ctb = NULL, *bufb = buf_local;
        if (T > 64) bufb = malloc(sizeof(double) * T);
        if (D <= SMALL_D) {
            ctb = T <= 64 ? ct_local : malloc(sizeof(double) * T * D);
            s.ct = ctb;
        } else {
            s.cf = (float *)cb;
        }
        s.buf = bufb;
        if (D <= SMALL_D) set_centres(&s, cb);
        for (int64_t t = 0; t < T; ++t) p[t] = 0.0;
        for (int64_t i = 0; i < N; ++i) {
            all_dist(&s, i);
            double c = cl[i];
            for (int64_t t = 0; t < T; ++t) {
                double v = (double)(float)s.buf[t];
                p[t] += v < c ? v : c;
            }
        }
        int64_t best = 0;
        for (int64_t t = 1; t < T; ++t)
            if (p[t] < p[best]) best = t;
        chosen[b] = best;
        if (potentials)
            for (int64_t t = 0; t < T; ++t) potentials[b * T + t] = p[t];
        for (int64_t i = 0; i < N; ++i) {
            float v = (float)one_dist(&s, i, best);
            if (v < cl[i]) cl[i] = v;
        }
        if (p != pot) free(p);
        if (bufb != buf_local) free(bufb);
        if (ctb && ctb != ct_local) free(ctb);
    }
}
