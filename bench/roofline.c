/* bench/roofline.c - what this machine can do, measured with the same threads ./run would use:
 *   roofline bandwidth [MiB] [passes]   read bandwidth: threads sum a buffer far larger than the caches;
 *                                       prints "read_gbps BEST MEDIAN" (GB/s, 1e9 bytes/s)
 *   roofline fma [seconds]              f32 multiply-add peak: independent FMA chains on 512-bit vectors;
 *                                       prints "fma_gflops BEST MEDIAN"
 * Decode reads every weight once per token (tok/s <= bandwidth / bytes of weights); prefill does ~2 FLOPs
 * per weight per token (tok/s <= FMA peak / FLOPs per token). Built with OpenMP by bench/bench.py. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float vec __attribute__((vector_size(64), aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* prints the best and the median of v[0..n) */
static void report(const char *what, double *v, int n) {
    double best = v[0];
    for (int i = 1; i < n; i++) best = v[i] > best ? v[i] : best;
    qsort(v, n, sizeof *v, by_value);
    printf("%s %.2f %.2f\n", what, best, v[n / 2]);
}

static int bandwidth(size_t mib, int passes) {
    if (mib < 1 || passes < 1 || passes > 1000) return fprintf(stderr, "usage: roofline bandwidth [MiB] [passes]\n"), 1;
    size_t n = mib * 1024 * 1024 / sizeof(vec);
    vec *buf = aligned_alloc(64, n * sizeof(vec));
    if (!buf) return fprintf(stderr, "error: out of memory\n"), 1;
#pragma omp parallel for schedule(static) /* first touch by the thread that will read it */
    for (size_t i = 0; i < n; i++) memset(&buf[i], 1, sizeof(vec));
    double gbps[1000], sink = 0;
    for (int p = 0; p < passes; p++) {
        double t0 = now();
        vec total = {0};
#pragma omp parallel
        {
            vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
#pragma omp for schedule(static) nowait
            for (size_t i = 0; i < n; i += 4) {
                a0 += buf[i], a1 += buf[i + 1], a2 += buf[i + 2], a3 += buf[i + 3];
            }
#pragma omp critical
            total += a0 + a1 + a2 + a3;
        }
        gbps[p] = n * sizeof(vec) / (now() - t0) / 1e9;
        sink += total[0];
    }
    report("read_gbps", gbps, passes);
    return sink == 42.0; /* keeps the sums alive */
}

#define CHAINS 16 /* independent chains: more than FMA latency x FMA ports, so the units never wait */

static int fma_peak(double seconds) {
    long iters = 1000000;
    double gflops[7], sink = 0;
    for (int rep = 0; rep < 7; rep++) {
        double t0 = now(), flops = 0;
        do {
            float s = 0;
#pragma omp parallel reduction(+ : s)
            {
                vec m, b;
                for (int i = 0; i < 16; i++) m[i] = 0.9999f, b[i] = 1e-4f * (i + 1); /* converges to b / (1 - m): no denormals */
                vec a0 = b + 0, a1 = b + 1, a2 = b + 2, a3 = b + 3, a4 = b + 4, a5 = b + 5, a6 = b + 6, a7 = b + 7;
                vec a8 = b + 8, a9 = b + 9, a10 = b + 10, a11 = b + 11, a12 = b + 12, a13 = b + 13, a14 = b + 14;
                vec a15 = b + 15;
                for (long i = 0; i < iters; i++) {
                    a0 = a0 * m + b, a1 = a1 * m + b, a2 = a2 * m + b, a3 = a3 * m + b;
                    a4 = a4 * m + b, a5 = a5 * m + b, a6 = a6 * m + b, a7 = a7 * m + b;
                    a8 = a8 * m + b, a9 = a9 * m + b, a10 = a10 * m + b, a11 = a11 * m + b;
                    a12 = a12 * m + b, a13 = a13 * m + b, a14 = a14 * m + b, a15 = a15 * m + b;
                    /* the compiler may not fold or merge the chains */
                    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7));
                    __asm__ volatile("" : "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11), "+v"(a12), "+v"(a13), "+v"(a14), "+v"(a15));
                }
                vec t = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15;
                for (int i = 0; i < 16; i++) s += t[i];
            }
            sink += s;
            int threads = 1;
#ifdef _OPENMP
            threads = omp_get_max_threads();
#endif
            flops += 2.0 * 16 * CHAINS * iters * threads;
        } while (now() - t0 < seconds);
        gflops[rep] = flops / (now() - t0) / 1e9;
    }
    report("fma_gflops", gflops, 7);
    return sink == 42.0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "bandwidth"))
        return bandwidth(argc > 2 ? (size_t)atol(argv[2]) : 1024, argc > 3 ? atoi(argv[3]) : 9);
    if (argc > 1 && !strcmp(argv[1], "fma")) return fma_peak(argc > 2 ? atof(argv[2]) : 0.3);
    fprintf(stderr, "usage: roofline bandwidth [MiB] [passes] | roofline fma [seconds]\n");
    return 2;
}
