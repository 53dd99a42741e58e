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
 *
 * Run ids are int32 (the caller keeps H * W below 2^31) and the run arrays grow on demand
 * (first guess a quarter of the pixels, 20 bytes a run), so a piecewise-constant map with
 * few runs needs little memory. Each pixel is read once and written once.
 */
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int32_t *start;  /* (cap,) first column of each run */
    int32_t *end;    /* (cap,) last column of each run (inclusive) */
    int32_t *parent; /* (cap,) union-find parent, parent[r] <= r; later the piece id */
    int64_t *label;  /* (cap,) label of each run */
    int32_t *row;    /* (H + 1,) first run of each row */
    int64_t cap;     /* runs the arrays hold */
} work_t;

static void work_free(work_t *w) {
    free(w->start);
    free(w->end);
    free(w->parent);
    free(w->label);
    free(w->row);
}

/* room for cap runs (old contents kept); 0 on success */
static int work_grow(work_t *w, int64_t cap) {
    int32_t *s = realloc(w->start, sizeof(int32_t) * (size_t)cap);
    if (s) w->start = s;
    int32_t *e = realloc(w->end, sizeof(int32_t) * (size_t)cap);
    if (e) w->end = e;
    int32_t *p = realloc(w->parent, sizeof(int32_t) * (size_t)cap);
    if (p) w->parent = p;
    int64_t *l = realloc(w->label, sizeof(int64_t) * (size_t)cap);
    if (l) w->label = l;
    if (!s || !e || !p || !l) return 1;
    w->cap = cap;
    return 0;
}

static inline int32_t find(int32_t *parent, int32_t r) {
    while (parent[r] != r) { /* path halving keeps parent[r] <= r */
        parent[r] = parent[parent[r]];
        r = parent[r];
    }
    return r;
}

static inline void unite(int32_t *parent, int32_t a, int32_t b) {
    a = find(parent, a);
    b = find(parent, b);
    if (a < b)
        parent[b] = a;
    else if (b < a)
        parent[a] = b;
}

/* one image: lab (H, W) -> out (H, W) piece ids; 0 on success, 1 when memory ran out */
static int label_image(const int64_t *lab, int64_t H, int64_t W, int reach, int64_t *out, work_t *w) {
    int32_t R = 0;
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
                if (R == w->cap) {
                    const int64_t total = H * W, want = 2 * w->cap;
                    if (work_grow(w, want < total ? want : total)) return 1;
                }
                w->start[R] = (int32_t)x;
                w->end[R] = (int32_t)(e - 1);
                w->parent[R] = R;
                w->label[R] = v;
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
        int32_t a = w->row[y - 1];
        const int32_t a_end = w->row[y];
        for (int32_t b = w->row[y]; b < w->row[y + 1] && a < a_end; ++b) {
            const int32_t s2 = w->start[b], e2 = w->end[b];
            const int64_t v = w->label[b];
            while (a < a_end && w->end[a] + reach < s2) ++a;
            for (int32_t c = a; c < a_end && w->start[c] <= e2 + reach; ++c)
                if (w->label[c] == v) unite(w->parent, c, b);
        }
    }

    /* roots in run order get 1..N; every other run takes its parent's id (parent < run, so
     * already final) */
    int32_t n = 0;
    for (int32_t r = 0; r < R; ++r)
        w->parent[r] = (w->parent[r] == r) ? ++n : w->parent[w->parent[r]];

    for (int64_t y = 0; y < H; ++y) {
        int64_t *o = out + y * W;
        for (int32_t r = w->row[y]; r < w->row[y + 1]; ++r) {
            const int64_t id = w->parent[r], x1 = w->end[r];
            for (int64_t x = w->start[r]; x <= x1; ++x) o[x] = id;
        }
    }
    return 0;
}

/* labels: (B, H, W) int64; out: (B, H, W) int64 piece ids (1..N per image, 0 if masked).
 * Returns 0; 1 when memory ran out; 2 when H * W >= 2^31 (int32 run ids). */
int pcc_components(const int64_t *labels, int64_t B, int64_t H, int64_t W, int32_t connectivity,
                   int64_t *out, int32_t n_threads) {
    if (B <= 0 || H <= 0 || W <= 0) return 0;
    if (H * W >= INT32_MAX) return 2;
    const int reach = connectivity == 8 ? 1 : 0;
    const int64_t hw = H * W;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > B) n_threads = (int32_t)B;
    work_t *work = calloc((size_t)n_threads, sizeof(work_t));
    if (!work) return 1;
    int failed = 0;
    const int64_t cap0 = hw < 4096 ? hw : (hw / 4 > 4096 ? hw / 4 : 4096); /* first guess */
    for (int32_t t = 0; t < n_threads; ++t) {
        work[t].row = malloc(sizeof(int32_t) * (size_t)(H + 1));
        failed |= !work[t].row || work_grow(&work[t], cap0);
    }
    if (!failed) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) reduction(| : failed)
        for (int64_t i = 0; i < B; ++i) {
#ifdef _OPENMP
            work_t *w = &work[omp_get_thread_num()];
#else
            work_t *w = &work[0];
#endif
            failed |= label_image(labels + i * hw, H, W, reach, out + i * hw, w);
        }
    }
    for (int32_t t = 0; t < n_threads; ++t) work_free(&work[t]);
    free(work);
    return failed;
}
