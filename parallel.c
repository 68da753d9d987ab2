/* parallel.c - a small pool of threads for the matmuls and attention (ops.h: parallel_for).
 *
 * A job is n items cut into chunks; the calling thread and the workers claim chunks from a shared counter
 * until none are left, and the caller returns once every claimed chunk is done. A worker that is not
 * running at the moment (the machine is shared, or it is still waking up) simply claims nothing, so no job
 * waits for a thread that never got a core; only a chunk already claimed is waited for.
 *
 * The threads are started once, on first use. Between jobs a worker spins for up to SPIN_MICROSECONDS
 * (decode posts a job every few microseconds: a spinning worker picks it up at once), then sleeps on a
 * condition variable and gives its core back. That bound is why this is not OpenMP: libgomp's idle threads
 * spin for up to 300000 PAUSEs (milliseconds) before sleeping, and when another process holds one of the
 * cores, every barrier then waits for whole scheduler time slices (measured on a loaded 2-core machine:
 * kjv-5m decoding at 1.5 tok/s instead of 460).
 *
 * Jobs come from one thread at a time (the one running forward()); a job posted from inside a job runs on
 * the thread that posts it. Thread count: parallel_set_threads() (./run --threads N), at most the number of
 * online cores (the default). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "ops.h"
#include "profile.h"

#define SPIN_MICROSECONDS 100
#define MAX_THREADS 256
#define CHUNKS_PER_THREAD 8   /* so that a thread that comes late still finds work, and the last chunk is short */
#define MIN_CHUNK_WORK 16384  /* multiply-adds: a few microseconds, well above the cost of claiming a chunk */

/* A job: body(ctx, begin, end) over [0, n_items) in chunks of grain. Job number g is written into
 * jobs[g % 2]: a worker may still be looking at job g - 1 while job g is being posted, and slot g % 2 is
 * only written again for job g + 2, which cannot be posted before job g is done. */
typedef struct {
    _Atomic(ParallelRange) body;
    _Atomic(void *) ctx;
    atomic_int n_items, grain;
    atomic_int finished;              /* items done */
} Job;

static struct {
    int n_threads;                    /* 0 until started; then the workers + the caller */
    unsigned generation;              /* jobs posted so far (the caller's own count) */
    Job jobs[2];
    atomic_ullong claim;              /* generation << 32 | first unclaimed item of that job */
    atomic_int sleepers;              /* workers blocked on `wake` */
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .done = PTHREAD_COND_INITIALIZER};

static int requested_threads;
static _Thread_local int inside_job; /* a job that calls parallel_for runs the inner one by itself */
static _Thread_local int is_worker;  /* a pool thread (not the one that posts jobs): --profile counts its chunks */

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Spins while still() holds, for up to SPIN_MICROSECONDS; returns 1 if it stopped holding. */
static int spin_while(int (*still)(unsigned), unsigned arg) {
    double deadline = 0.0;
    for (unsigned i = 1; still(arg); i++) {
        cpu_relax();
        if (i % 64 == 0) { /* a look at the clock now and then */
            double t = seconds();
            if (deadline == 0.0) deadline = t + SPIN_MICROSECONDS * 1e-6;
            else if (t > deadline) return 0;
        }
    }
    return 1;
}

static unsigned posted_generation(void) { return (unsigned)(atomic_load(&pool.claim) >> 32); }
static int no_new_job(unsigned seen) { return posted_generation() == seen; }
static int job_unfinished(unsigned generation) {
    Job *job = &pool.jobs[generation % 2];
    return atomic_load(&job->finished) < atomic_load_explicit(&job->n_items, memory_order_relaxed);
}

/* Claims and runs chunks of job `generation` until none are left. The claim word names the job, so a
 * claim made with a stale view of it fails and is retried (and then sees the job is over). */
static void work_on(unsigned generation) {
    Job *job = &pool.jobs[generation % 2];
    for (;;) {
        unsigned long long v = atomic_load(&pool.claim);
        int next = (int)(v & 0xFFFFFFFFu), n = atomic_load_explicit(&job->n_items, memory_order_relaxed);
        if ((unsigned)(v >> 32) != generation || next >= n) return;
        int grain = atomic_load_explicit(&job->grain, memory_order_relaxed), end = n - next > grain ? next + grain : n;
        ParallelRange body = atomic_load_explicit(&job->body, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&job->ctx, memory_order_relaxed);
        if (!atomic_compare_exchange_weak(&pool.claim, &v, ((unsigned long long)generation << 32) | (unsigned)end)) continue;
        long long t0 = profile_on && is_worker ? profile_now_ns() : 0;
        body(ctx, next, end);
        if (t0) profile_worker_busy(profile_now_ns() - t0);
        if (atomic_fetch_add(&job->finished, end - next) + (end - next) == n) { /* the last chunk: tell the caller */
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

static void *worker_main(void *unused) {
    (void)unused;
    unsigned seen = 0;
    inside_job = is_worker = 1;
    for (;;) {
        if (!spin_while(no_new_job, seen)) { /* nothing came while spinning: sleep until a job does */
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while (posted_generation() == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = posted_generation();
        work_on(seen);
    }
    return NULL;
}

void parallel_set_threads(int n) { requested_threads = n; }

int parallel_threads(void) {
    if (pool.n_threads) return pool.n_threads;
    int cores = (int)sysconf(_SC_NPROCESSORS_ONLN), n = requested_threads > 0 ? requested_threads : cores;
    if (cores > 0 && n > cores) n = cores; /* more threads than cores would only take turns */
    return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
}

/* Starts the workers (once). If a thread cannot be started, the pool makes do with those that were. */
static void start_pool(void) {
    int n = parallel_threads(), started = 1;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    for (pthread_t t; started < n && pthread_create(&t, &attr, worker_main, NULL) == 0; started++) pthread_detach(t);
    pthread_attr_destroy(&attr);
    pool.n_threads = started;
}

void parallel_for(int n, int grain, long long work, ParallelRange body, void *ctx) {
    if (n <= 0) return;
    if (work >= PARALLEL_MIN_WORK && n > 1 && !inside_job && !pool.n_threads) start_pool();
    if (work < PARALLEL_MIN_WORK || n == 1 || inside_job || pool.n_threads <= 1) {
        body(ctx, 0, n);
        return;
    }
    /* chunks: at most CHUNKS_PER_THREAD per thread (each claim is a contended atomic), each with at least
     * MIN_CHUNK_WORK multiply-adds, and never smaller than the caller asks */
    long long by_count = (n + CHUNKS_PER_THREAD * pool.n_threads - 1) / (CHUNKS_PER_THREAD * pool.n_threads);
    long long by_work = (MIN_CHUNK_WORK * (long long)n + work - 1) / work;
    if (grain < by_count) grain = (int)by_count;
    if (grain < by_work) grain = (int)(by_work < n ? by_work : n);
    unsigned generation = ++pool.generation;
    Job *job = &pool.jobs[generation % 2];
    atomic_store_explicit(&job->body, body, memory_order_relaxed);
    atomic_store_explicit(&job->ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&job->n_items, n, memory_order_relaxed);
    atomic_store_explicit(&job->grain, grain < 1 ? 1 : grain, memory_order_relaxed);
    atomic_store(&job->finished, 0);
    atomic_store(&pool.claim, (unsigned long long)generation << 32); /* publishes the job */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    inside_job = 1;
    work_on(generation);
    inside_job = 0;
    long long t0 = profile_on ? profile_now_ns() : 0;
    if (!spin_while(job_unfinished, generation)) { /* a worker still has a chunk: wait for it */
        pthread_mutex_lock(&pool.lock);
        while (job_unfinished(generation)) pthread_cond_wait(&pool.done, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    if (t0) profile_caller_waited(profile_now_ns() - t0);
}
