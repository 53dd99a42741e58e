/* Connected components of integer label maps on the CPU, one image per OpenMP task.
 *
 * Called from pccfast/components.py (backend "native") through ctypes. Labels are int64
 * (B, H, W), row-major; two pixels are connected when they are neighbours (4- or
 * 8-connectivity) with equal labels; negative labels are masked (id 0, connect to nothing).
 *
 * Run-based union-find: each row is cut into runs of equal labels (masked pixels make no
 * run), runs are numbered in raster order of their first pixel, and every run is joined with
 * the touching runs of equal label in the row above (a merge-like sweep over both rows). A
 * union hooks the larger root onto the smaller, so a tree's root is always its smallest run,
 * whose first pixel is the piece's first pixel in raster order. Numbering the roots in run
 * order therefore gives pieces 1..N in raster order of their first pixels, exactly as
 * scipy.ndimage.label and the torch backend number them.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int64_t *start;  /* (R,) first column of each run */
    int64_t *end;    /* (R,) last column of each run (inclusive) */
    int64_t *label;  /* (R,) label of each run */
    int64_t *parent; /* (R,) union-find parent, parent[r] <= r; later the piece id */
    int64_t *row;    /* (H + 1,) first run of each row */
} work_t;

static void work_free(work_t *w) {
    free(w->start);
    free(w->end);
    free(w->label);
    free(w->parent);
    free(w->row);
}

static int work_alloc(work_t *w, int64_t H, int64_t W) {
    const size_t n = (size_t)(H * W) + 1, bytes = sizeof(int64_t) * n;
    w->start = malloc(bytes);
    w->end = malloc(bytes);
    w->label = malloc(bytes);
    w->parent = malloc(bytes);
    w->row = malloc(sizeof(int64_t) * (size_t)(H + 1));
    return !w->start || !w->end || !w->label || !w->parent || !w->row; /* caller frees */
}

static inline int64_t find(int64_t *parent, int64_t r) {
    while (parent[r] != r) { /* path halving keeps parent[r] <= r */
        parent[r] = parent[parent[r]];
        r = parent[r];
    }
    return r;
}

static inline void unite(int64_t *parent, int64_t a, int64_t b) {
    a = find(parent, a);
    b = find(parent, b);
    if (a < b)
        parent[b] = a;
    else if (b < a)
        parent[a] = b;
}

/* one image: lab (H, W) -> out (H, W) piece ids; returns the number of pieces */
static int64_t label_image(const int64_t *lab, int64_t H, int64_t W, int reach, int64_t *out, work_t *w) {
    int64_t R = 0;
    for (int64_t y = 0; y < H; ++y) { /* runs of equal labels, row by row */
        const int64_t *l = lab + y * W;
        int64_t *o = out + y * W;
        w->row[y] = R;
        int64_t x = 0;
        while (x < W) {
            const int64_t v = l[x];
            int64_t e = x + 1;
            while (e < W && l[e] == v) ++e;
            if (v >= 0) {
                w->start[R] = x;
                w->end[R] = e - 1;
                w->label[R] = v;
                w->parent[R] = R;
                ++R;
            } else {
                for (int64_t i = x; i < e; ++i) o[i] = 0;
            }
            x = e;
        }
    }
    w->row[H] = R;

    /* join each run with the runs above that touch it: run a = [s1, e1] above and
     * b = [s2, e2] touch when s1 <= e2 + reach and s2 <= e1 + reach (reach 0 for 4-, 1 for
     * 8-connectivity). Runs above ending before s2 - reach touch neither b nor later runs. */
    for (int64_t y = 1; y < H; ++y) {
        int64_t a = w->row[y - 1];
        const int64_t a_end = w->row[y];
        for (int64_t b = w->row[y]; b < w->row[y + 1] && a < a_end; ++b) {
            const int64_t s2 = w->start[b], e2 = w->end[b], v = w->label[b];
            while (a < a_end && w->end[a] + reach < s2) ++a;
            for (int64_t c = a; c < a_end && w->start[c] <= e2 + reach; ++c)
                if (w->label[c] == v) unite(w->parent, c, b);
        }
    }

    /* roots in run order get 1..N; every other run takes its parent's id (parent < run, so
     * already final) */
    int64_t n = 0;
    for (int64_t r = 0; r < R; ++r)
        w->parent[r] = (w->parent[r] == r) ? ++n : w->parent[w->parent[r]];

    for (int64_t y = 0; y < H; ++y) {
        int64_t *o = out + y * W;
        for (int64_t r = w->row[y]; r < w->row[y + 1]; ++r) {
            const int64_t id = w->parent[r];
            for (int64_t x = w->start[r]; x <= w->end[r]; ++x) o[x] = id;
        }
    }
    return n;
}

/* labels: (B, H, W) int64; out: (B, H, W) int64 piece ids (1..N per image, 0 if masked).
 * Returns 0, or 1 when memory ran out. */
int pcc_components(const int64_t *labels, int64_t B, int64_t H, int64_t W, int32_t connectivity,
                   int64_t *out, int32_t n_threads) {
    if (B <= 0 || H <= 0 || W <= 0) return 0;
    const int reach = connectivity == 8 ? 1 : 0;
    const int64_t hw = H * W;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > B) n_threads = (int32_t)B;
    work_t *work = calloc((size_t)n_threads, sizeof(work_t));
    if (!work) return 1;
    int failed = 0;
    for (int32_t t = 0; t < n_threads; ++t) failed |= work_alloc(&work[t], H, W);
    if (!failed) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
        for (int64_t i = 0; i < B; ++i) {
#ifdef _OPENMP
            work_t *w = &work[omp_get_thread_num()];
#else
            work_t *w = &work[0];
#endif
            label_image(labels + i * hw, H, W, reach, out + i * hw, w);
        }
    }
    for (int32_t t = 0; t < n_threads; ++t) work_free(&work[t]);
    free(work);
    return failed;
}
