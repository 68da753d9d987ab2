/* profile.c - ./run --profile (profile.h). The calling thread times the sections; the workers add up the time
 * they spent in chunks. parallel_for returns only when every chunk of its job is done, so all the work of a
 * section has been counted when the next section starts:
 *   busy threads x seconds = wall - time the caller waited for workers + time workers ran chunks */
#include "profile.h"

#include <stdatomic.h>
#include <time.h>

int profile_on;

static const char *section_names[PROFILE_SECTIONS] = {
    "other (embed, residual)", "norms", "matmul q,k,v", "rope", "attention", "matmul wo", "matmul gate,up",
    "activation", "matmul down", "matmul classifier", "quantize activations", "sampling"};

/* the time before the first phase (loading, the KV cache set aside): counted apart, and not reported */
enum { SETUP = 2 };

static struct {
    int phase;
    ProfileSection running;
    long long started;                       /* when the running section started */
    double wall[SETUP + 1][PROFILE_SECTIONS], busy[SETUP + 1][PROFILE_SECTIONS]; /* per phase */
    atomic_llong worker_ns, waited_ns;       /* since the running section started */
} prof;

long long profile_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

void profile_start(void) {
    profile_on = 1;
    prof.phase = SETUP;
    prof.running = PROFILE_OTHER;
    prof.started = profile_now_ns();
}

ProfileSection profile_section(ProfileSection s) {
    ProfileSection was = prof.running;
    if (!profile_on) return was;
    long long now = profile_now_ns(), wall = now - prof.started;
    long long busy = wall - atomic_exchange(&prof.waited_ns, 0) + atomic_exchange(&prof.worker_ns, 0);
    prof.wall[prof.phase][was] += wall * 1e-9;
    prof.busy[prof.phase][was] += busy * 1e-9;
    prof.running = s;
    prof.started = now;
    return was;
}

void profile_phase(int phase) {
    profile_section(PROFILE_OTHER);
    prof.phase = phase;
}

void profile_worker_busy(long long ns) { atomic_fetch_add(&prof.worker_ns, ns); }
void profile_caller_waited(long long ns) { atomic_fetch_add(&prof.waited_ns, ns); }

static void report_phase(FILE *f, int phase, const char *what, int tokens, int threads) {
    double wall = 0, busy = 0;
    for (int s = 0; s < PROFILE_SECTIONS; s++) wall += prof.wall[phase][s], busy += prof.busy[phase][s];
    if (tokens <= 0 || wall <= 0) return;
    fprintf(f, "profile: %s, %d %s, %d threads: %.3f ms per %s\n", phase == PROFILE_PREFILL ? "prefill" : "decode",
            tokens, what, threads, 1e3 * wall / tokens, phase == PROFILE_PREFILL ? "token" : "step");
    fprintf(f, "  %-24s %10s %7s %13s\n", "section", "ms/token", "share", "threads busy");
    for (int s = 0; s < PROFILE_SECTIONS; s++) {
        double w = prof.wall[phase][s];
        if (w <= 0) continue;
        fprintf(f, "  %-24s %10.4f %6.1f%% %12.0f%%\n", section_names[s], 1e3 * w / tokens, 100 * w / wall,
                100 * prof.busy[phase][s] / (w * threads));
    }
    fprintf(f, "  threads idle (barriers, one-thread sections): %.1f%% of %d x the wall time\n",
            100 * (1 - busy / (wall * threads)), threads);
}

void profile_report(FILE *f, int prefill_tokens, int decode_steps, int threads) {
    if (!profile_on) return;
    profile_section(PROFILE_OTHER);
    report_phase(f, PROFILE_PREFILL, "tokens", prefill_tokens, threads);
    report_phase(f, PROFILE_DECODE, "steps", decode_steps, threads);
}
