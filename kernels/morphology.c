/* The refinement's clean-up (pccfast.refine.cleanup) on the CPU, on bit-packed masks.
 *
 * Called from pccfast/refine.py (backend "native") through ctypes. Labels are int64
 * (B, H, W), row-major; the output is uint8 (B, H, W). Same result as the torch path: every
 * label value v != 0 present in an image is a task; its mask m = (labels == v) is opened
 * (erode e1 times, dilate d times, erode e2 times, all 3x3) and its band = dilate(m, bd);
 * the uncertain label's m and band are its raw mask. A pixel takes the value of the last
 * (largest) task whose band covers it if it lies in that task's m, else the uncertain label;
 * pixels no band covers are 0.
 *
 * Borders as OpenCV's defaults: erosion treats outside the image as foreground, dilation as
 * background; either way a 3x3 step is an AND / OR over the neighbours inside the image, and
 * it is separable into a row step and a column step over the in-image window. n steps of a
 * 3-wide in-image window make one (2n+1)-wide in-image window.
 *
 * A mask is stored one bit per pixel (rows of nw = ceil(W / 64) uint64 words, bit x & 63 of
 * word x >> 6 is column x) for the task's rows only: the rows of its pixels grown by d + bd
 * (erosion never grows a mask, each dilation by its count). Rows outside that range are
 * background at every stage, so a column erosion whose window reaches past the stored rows
 * (but not past the image) gives 0 there. Row steps shift whole words; the padding bits past
 * column W - 1 hold the outside value of the current operation (1 for erosion, 0 for
 * dilation) and are cleared at the end.
 *
 * Four parallel phases: per image, the first and last row of every value's pixels (a scan
 * over runs of equal labels); per image, each run's bits set in its value's mask; per task
 * (dynamic schedule), open and dilate the mask; per output row, write the tasks in
 * ascending value order (the last covering one wins).
 *
 * With at least as many images as threads, each image runs all phases on one thread (one
 * fork and join per call); else every phase is spread over the threads.
 *
 * Returns 0, 1 when values is NULL and a label lies outside [0, 255] (the caller then passes
 * the sorted non-zero values present), 2 when memory runs out.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int64_t b;       /* image */
    int64_t value;   /* label value */
    int64_t y0, y1;  /* stored rows [y0, y1] (image rows) */
    int64_t r0, r1;  /* rows of the value's pixels */
    size_t m_off;    /* word offset of m in the arena */
    size_t band_off; /* word offset of the band (== m_off for the uncertain label) */
    int empty;       /* nothing left after the opening */
} task_t;

/* index of v in the sorted values (n of them), -1 when absent */
static inline int64_t find_value(const int64_t *values, int64_t n, int64_t v) {
    int64_t lo = 0, hi = n - 1;
    while (lo <= hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (values[mid] == v) return mid;
        if (values[mid] < v) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

/* One 3-wide row step in place; outside the image (and the padding bits) count as `outside`. */
static inline void row_step(uint64_t *w, int64_t nw, int erode, uint64_t pad) {
    const uint64_t outside = erode ? ~0ULL : 0ULL;
    w[nw - 1] = erode ? (w[nw - 1] | pad) : (w[nw - 1] & ~pad);
    uint64_t prev = outside;
    for (int64_t i = 0; i < nw; ++i) {
        const uint64_t cur = w[i];
        const uint64_t next = i + 1 < nw ? w[i + 1] : outside;
        const uint64_t left = (cur << 1) | (prev >> 63);  /* bit x holds column x - 1 */
        const uint64_t right = (cur >> 1) | (next << 63); /* bit x holds column x + 1 */
        w[i] = erode ? (cur & left & right) : (cur | left | right);
        prev = cur;
    }
}

/* `iters` 3x3 steps of erosion or dilation of the stored rows [y0, y1] of an H-row image:
 * rows in place, then columns from src into dst. */
static void morph(uint64_t *src, uint64_t *dst, int64_t y0, int64_t y1, int64_t H,
                  int64_t nw, int iters, int erode, uint64_t pad) {
    const int64_t R = y1 - y0 + 1;
    for (int64_t r = 0; r < R; ++r)
        for (int it = 0; it < iters; ++it) row_step(src + r * nw, nw, erode, pad);
    for (int64_t r = 0; r < R; ++r) {
        const int64_t y = y0 + r;
        int64_t lo = y - iters, hi = y + iters;
        if (lo < 0) lo = 0;
        if (hi > H - 1) hi = H - 1;
        uint64_t *out = dst + r * nw;
        if (erode && (lo < y0 || hi > y1)) { /* the window reaches a background row */
            memset(out, 0, sizeof(uint64_t) * nw);
            continue;
        }
        if (lo < y0) lo = y0;
        if (hi > y1) hi = y1;
        memcpy(out, src + (lo - y0) * nw, sizeof(uint64_t) * nw);
        for (int64_t yy = lo + 1; yy <= hi; ++yy) {
            const uint64_t *in = src + (yy - y0) * nw;
            if (erode)
                for (int64_t i = 0; i < nw; ++i) out[i] &= in[i];
            else
                for (int64_t i = 0; i < nw; ++i) out[i] |= in[i];
        }
    }
}

/* erode or dilate `iters` times, result back in *a (buffers swapped) */
static inline void morph_swap(uint64_t **a, uint64_t **tmp, int64_t y0, int64_t y1, int64_t H, int64_t nw,
                              int iters, int erode, uint64_t pad) {
    if (iters <= 0) return;
    morph(*a, *tmp, y0, y1, H, nw, iters, erode, pad);
    uint64_t *t = *a;
    *a = *tmp;
    *tmp = t;
}

/* set columns [x0, x1) of a packed row */
static inline void set_bits(uint64_t *w, int64_t x0, int64_t x1) {
    const int64_t i0 = x0 >> 6, i1 = (x1 - 1) >> 6;
    const uint64_t lo = ~0ULL << (x0 & 63), hi = ~0ULL >> (63 - ((x1 - 1) & 63));
    if (i0 == i1) {
        w[i0] |= lo & hi;
        return;
    }
    w[i0] |= lo;
    for (int64_t i = i0 + 1; i < i1; ++i) w[i] = ~0ULL;
    w[i1] |= hi;
}

static int any_bit(const uint64_t *w, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (w[i]) return 1;
    return 0;
}

/* all phases for images [0, B), each phase spread over n_threads */
static int cleanup_phased(const int64_t *labels, int64_t B, int64_t H, int64_t W, const int64_t *values, int64_t C,
                          int32_t ignore, int32_t erode_first, int32_t dilate_iters, int32_t erode_after,
                          int32_t band, uint8_t *out, int32_t n_threads) {
    if (erode_first < 0) erode_first = 0;
    if (dilate_iters < 0) dilate_iters = 0;
    if (erode_after < 0) erode_after = 0;
    if (band < 0) band = 0;
    const int direct = values == NULL; /* slot = label value in [0, 255] */
    const int64_t S = direct ? 256 : C; /* value slots per image */
    const int64_t nw = (W + 63) / 64;
    const uint64_t pad = (W % 64) ? ~0ULL << (W % 64) : 0ULL;
    const int64_t grow = (int64_t)dilate_iters + band;

    /* phase 1: first and last row of each value's pixels, per image */
    int64_t *box = malloc(sizeof(int64_t) * 2 * (size_t)(B * (S > 0 ? S : 1)));
    if (!box) return 2;
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(n_threads) reduction(| : bad)
    for (int64_t b = 0; b < B; ++b) {
        int64_t *bx = box + 2 * b * S; /* (S, 2): r0, r1 */
        for (int64_t s = 0; s < 2 * S; ++s) bx[s] = -1;
        const int64_t *img = labels + b * H * W;
        for (int64_t y = 0; y < H && !bad; ++y) {
            const int64_t *row = img + y * W;
            int64_t x = 0;
            while (x < W) { /* runs of equal labels */
                const int64_t v = row[x];
                while (x < W && row[x] == v) ++x;
                if (v == 0) continue;
                int64_t s;
                if (direct) {
                    if (v < 0 || v > 255) {
                        bad = 1;
                        break;
                    }
                    s = v;
                } else {
                    s = find_value(values, C, v);
                    if (s < 0) continue;
                }
                int64_t *q = bx + 2 * s;
                if (q[0] < 0) q[0] = y;
                q[1] = y;
            }
        }
    }
    if (bad) {
        free(box);
        return 1;
    }

    /* the tasks, per image in ascending value order, and their place in the arena */
    int64_t T = 0;
    for (int64_t i = 0; i < B * S; ++i) T += box[2 * i] >= 0;
    task_t *task = malloc(sizeof(task_t) * (size_t)(T > 0 ? T : 1));
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(B + 1)); /* tasks of image b: [first[b], first[b+1]) */
    if (!task || !first) {
        free(box);
        free(task);
        free(first);
        return 2;
    }
    size_t words = 0;
    int64_t t = 0;
    for (int64_t b = 0; b < B; ++b) {
        first[b] = t;
        for (int64_t s = 0; s < S; ++s) {
            int64_t *q = box + 2 * (b * S + s);
            if (q[0] < 0) continue;
            task_t *k = task + t;
            k->b = b;
            k->value = direct ? s : values[s];
            k->r0 = q[0];
            k->r1 = q[1];
            k->empty = 0;
            const int raw_only = k->value == ignore;
            const int64_t g = raw_only ? 0 : grow;
            k->y0 = k->r0 - g < 0 ? 0 : k->r0 - g;
            k->y1 = k->r1 + g > H - 1 ? H - 1 : k->r1 + g;
            const size_t n = (size_t)(k->y1 - k->y0 + 1) * (size_t)nw;
            k->m_off = words;
            words += n;
            k->band_off = raw_only ? k->m_off : words;
            if (!raw_only) words += n;
            q[0] = t++; /* from here on: the slot's task */
        }
    }
    first[B] = t;
    uint64_t *arena = malloc(sizeof(uint64_t) * (words > 0 ? words : 1));
    if (!arena) {
        free(box);
        free(task);
        free(first);
        return 2;
    }

    /* phase 2: the raw masks into the m planes, run by run, per image */
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = first[b]; i < first[b + 1]; ++i)
            memset(arena + task[i].m_off, 0, sizeof(uint64_t) * (size_t)(task[i].y1 - task[i].y0 + 1) * (size_t)nw);
        const int64_t *img = labels + b * H * W;
        const int64_t *slot_task = box + 2 * b * S; /* stride 2 */
        for (int64_t y = 0; y < H; ++y) {
            const int64_t *row = img + y * W;
            int64_t x = 0;
            while (x < W) {
                const int64_t v = row[x];
                const int64_t start = x;
                while (x < W && row[x] == v) ++x;
                if (v == 0) continue;
                const int64_t s = direct ? v : find_value(values, C, v);
                if (s < 0) continue;
                const task_t *k = task + slot_task[2 * s];
                set_bits(arena + k->m_off + (size_t)(y - k->y0) * nw, start, x);
            }
        }
    }
    free(box);

    /* phase 3: open, band */
    int oom = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : oom)
    {
        uint64_t *tmp = malloc(sizeof(uint64_t) * (size_t)(H * nw));
        uint64_t *work = malloc(sizeof(uint64_t) * (size_t)(H * nw));
        if (!tmp || !work) oom = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < T; ++i) {
            if (!tmp || !work) continue;
            task_t *k = task + i;
            const int64_t y0 = k->y0, y1 = k->y1, R = y1 - y0 + 1;
            const size_t n = (size_t)R * (size_t)nw;
            const int raw_only = k->value == ignore;
            if (raw_only) continue;
            uint64_t *a = work;
            memcpy(a, arena + k->m_off, sizeof(uint64_t) * n);
            uint64_t *b2 = tmp;
            morph_swap(&a, &b2, y0, y1, H, nw, erode_first, 1, pad);
            for (int64_t r = 0; r < R; ++r) a[r * nw + nw - 1] &= ~pad;
            if (!any_bit(a, n)) {
                k->empty = 1;
                continue;
            }
            morph_swap(&a, &b2, y0, y1, H, nw, dilate_iters, 0, pad);
            morph_swap(&a, &b2, y0, y1, H, nw, erode_after, 1, pad);
            for (int64_t r = 0; r < R; ++r) a[r * nw + nw - 1] &= ~pad;
            uint64_t *m = arena + k->m_off;
            memcpy(m, a, sizeof(uint64_t) * n);
            morph_swap(&a, &b2, y0, y1, H, nw, band, 0, pad);
            uint64_t *bd = arena + k->band_off;
            memcpy(bd, a, sizeof(uint64_t) * n);
            for (int64_t r = 0; r < R; ++r) bd[r * nw + nw - 1] &= ~pad;
        }
        free(tmp);
        free(work);
    }
    if (oom) {
        free(arena);
        free(task);
        free(first);
        return 2;
    }

    /* phase 4: every output row, tasks in ascending value order */
    const uint8_t ign = (uint8_t)ignore;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t by = 0; by < B * H; ++by) {
        const int64_t b = by / H, y = by % H;
        uint8_t *o = out + by * W;
        memset(o, 0, (size_t)W);
        for (int64_t i = first[b]; i < first[b + 1]; ++i) {
            const task_t *k = task + i;
            if (k->empty || y < k->y0 || y > k->y1) continue;
            const uint64_t *bd = arena + k->band_off + (size_t)(y - k->y0) * nw;
            const uint64_t *m = arena + k->m_off + (size_t)(y - k->y0) * nw;
            const uint8_t val = (uint8_t)k->value;
            for (int64_t j = 0; j < nw; ++j) {
                uint64_t bw = bd[j];
                if (!bw) continue;
                const uint64_t mw = m[j];
                uint8_t *ow = o + j * 64;
                if (bw == ~0ULL) { /* a whole word: no padding bits in it */
                    if (mw == ~0ULL) {
                        memset(ow, val, 64);
                    } else {
                        for (int z = 0; z < 64; ++z) ow[z] = ((mw >> z) & 1) ? val : ign;
                    }
                    continue;
                }
                while (bw) {
                    const int z = __builtin_ctzll(bw);
                    ow[z] = ((mw >> z) & 1) ? val : ign;
                    bw &= bw - 1;
                }
            }
        }
    }
    free(arena);
    free(task);
    free(first);
    return 0;
}

int pcc_cleanup(const int64_t *labels, int64_t B, int64_t H, int64_t W, const int64_t *values, int64_t C,
                int32_t ignore, int32_t erode_first, int32_t dilate_iters, int32_t erode_after, int32_t band,
                uint8_t *out, int32_t n_threads) {
    if (B <= 0 || H <= 0 || W <= 0) return 0;
    if (n_threads < 1) n_threads = 1;
    if (n_threads == 1 || B < n_threads)
        return cleanup_phased(labels, B, H, W, values, C, ignore, erode_first, dilate_iters, erode_after, band, out,
                              n_threads);
    /* enough images: one image per thread at a time, one fork and join per call (the phases'
     * barriers cost much more than their work on a busy machine) */
    int rc = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) reduction(max : rc)
    for (int64_t b = 0; b < B; ++b) {
        const int r = cleanup_phased(labels + b * H * W, 1, H, W, values, C, ignore, erode_first, dilate_iters,
                                     erode_after, band, out + b * H * W, 1);
        if (r > rc) rc = r;
    }
    return rc;
}
