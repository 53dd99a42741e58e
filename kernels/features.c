/* Clustering points of section 2 from the head-wise features, on the CPU.
 *
 * Called from pccfast/features.py (clustering_points) through ctypes. For every image: each
 * of the D feature columns (a contiguous row of N pixels in the input) is min-max normalised
 * and centred, the pixels' normalised x and y are appended and centred, and the result is
 * written as rows (N, D + 2), the layout the k-means kernel takes for wide points. In torch
 * this is a transpose of the whole tensor (a strided write per element); here it is done in
 * tiles that stay in cache. Column statistics use double sums, the variance a second pass
 * around the mean.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 16

/* one image: f (D, N) -> out (N, D + 2); mean (D + 2,) of the normalised columns; var = the
 * mean over all D + 2 columns of their variance (scikit-learn's tolerance scale) */
static int prepare_one(const float *f, int64_t D, int64_t H, int64_t Wd, float *out, float *mean, double *var) {
    const int64_t N = H * Wd, C = D + 2;
    float *scale = malloc(sizeof(float) * D), *shift = malloc(sizeof(float) * D);
    if (!scale || !shift) {
        free(scale), free(shift);
        return 1;
    }
    double vsum = 0.0;
    for (int64_t d = 0; d < D; ++d) {
        const float *row = f + d * N;
        float lo = row[0], hi = row[0];
        double s = 0.0;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : s)
        for (int64_t i = 0; i < N; ++i) {
            float v = row[i];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
            s += v;
        }
        double m = s / (double)N, ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < N; ++i) {
            double t = (double)row[i] - m;
            ss += t * t;
        }
        float span = hi - lo;
        float inv = span > 0.f ? 1.0f / span : 0.f; /* a constant column becomes 0 */
        scale[d] = inv;
        shift[d] = (float)(-m * (double)inv);
        mean[d] = (float)((m - (double)lo) * (double)inv);
        vsum += ss / (double)N * (double)inv * (double)inv;
    }
    /* normalised, centred pixel coordinates: x = column / (W - 1), y = row / (H - 1) */
    double mx = Wd > 1 ? 0.5 : 0.0, my = H > 1 ? 0.5 : 0.0;
    double vx = 0.0, vy = 0.0;
    for (int64_t c = 0; c < Wd; ++c) {
        double t = (Wd > 1 ? (double)c / (double)(Wd - 1) : 0.0) - mx;
        vx += t * t;
    }
    for (int64_t r = 0; r < H; ++r) {
        double t = (H > 1 ? (double)r / (double)(H - 1) : 0.0) - my;
        vy += t * t;
    }
    mean[D] = (float)mx;
    mean[D + 1] = (float)my;
    *var = (vsum + vx / (double)Wd + vy / (double)H) / (double)C;
    /* tiled transpose with the affine map */
    for (int64_t i0 = 0; i0 < N; i0 += TILE) {
        int64_t i1 = i0 + TILE < N ? i0 + TILE : N;
        for (int64_t d0 = 0; d0 < D; d0 += TILE) {
            int64_t d1 = d0 + TILE < D ? d0 + TILE : D;
            for (int64_t i = i0; i < i1; ++i) {
                float *o = out + i * C;
                for (int64_t d = d0; d < d1; ++d) o[d] = f[d * N + i] * scale[d] + shift[d];
            }
        }
        for (int64_t i = i0; i < i1; ++i) {
            int64_t r = i / Wd, c = i % Wd;
            out[i * C + D] = (float)((Wd > 1 ? (double)c / (double)(Wd - 1) : 0.0) - mx);
            out[i * C + D + 1] = (float)((H > 1 ? (double)r / (double)(H - 1) : 0.0) - my);
        }
    }
    free(scale), free(shift);
    return 0;
}

/* features (B, D, H, W) float32 contiguous -> out (B, H*W, D + 2) centred points, mean
 * (B, D + 2), var (B,). Returns 0, or 1 if an allocation failed. */
int pcc_clustering_points(const float *features, int64_t B, int64_t D, int64_t H, int64_t Wd, float *out,
                          float *mean, double *var, int32_t n_threads) {
    int fail = 0;
    const int64_t N = H * Wd;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) reduction(| : fail)
    for (int64_t b = 0; b < B; ++b)
        fail |= prepare_one(features + b * D * N, D, H, Wd, out + b * N * (D + 2), mean + b * (D + 2), var + b);
    return fail;
}
