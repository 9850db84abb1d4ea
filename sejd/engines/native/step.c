/* The single-token step of one TarFlow block, and the whole sequential inversion of the block, on CPU
 * threads that share the work of every layer.
 *
 * Why native code: at batch 1 a step is ~1 MFLOP over ~1.6 MB of weights (builtin:textures). An
 * ONNX Runtime graph pays ~0.3 us per node for ~40-150 nodes and one thread streams the weights from
 * L3; here the threads split every layer's work, each taking first the same share of every weight
 * matrix (packed once, so its share stays in its core's L2), and a whole block runs as one call, so
 * the per-token cost is the arithmetic plus a handful of hand-offs per layer.
 *
 * Work sharing: each phase (a layer's matrix product, its attention, ...) is a list of tasks. A thread
 * claims tasks from its home range first, then from the others' (so a thread that the OS does not
 * schedule never holds the others up: the caller can run every task alone), and the next phase starts
 * once every task of this one is done. Counters only grow (tagged by a phase number), so nothing has to
 * be reset between phases and a thread that fell behind catches up by finding every range taken.
 *
 * Threads: a pool object (sejd_pool_new) owns its worker threads; the caller passes it to every call and
 * is one of its threads. Every wait (for a phase's last task, for workers to leave a job, for the next
 * job) spins briefly and then sleeps in the kernel (a futex on Linux, a condition variable elsewhere),
 * so a worker that the OS preempted costs the others a sleep, not a core, and an idle pool takes no CPU
 * (nor a container's quota) a few tens of microseconds after its last job, or at once after
 * sejd_pool_park. When such stalls keep coming (more threads than free cores: another process, a CPU
 * quota) the pool runs its jobs on fewer threads for a while (see STALL_NS). One job at a time per pool
 * and per Block (each has a mutex; pool before block).
 *
 * Fork: a child has no worker threads. The fork handlers wait for running jobs (they take every pool's
 * job mutex around fork()) and mark every pool of the child as forked: there, jobs run on the calling
 * thread alone (create a new pool in the child for threads).
 *
 * Semantics: those of the block's KV-cached projection in the reference model (sejd/model/tarflow.py)
 * and of the exported `step_rows` graph: rows r = 0..R-1 take sample r mod B (classifier-free guidance
 * runs cond rows then uncond rows), per-row attention temperature and class label (-1: the class mean),
 * caches (R, H, T, hd) per layer written at the token's position, guided parameters
 * c + w * (c - u) with w = guidance[{a,b}][pos].
 *
 * Compiled by sejd/engines/native.py with the machine's C compiler; no symbol here is exported but the
 * `sejd_*` functions.
 */
#define _GNU_SOURCE  /* syscall() and clock_gettime() under a strict -std= too */
#include <limits.h>
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifndef SEJD_BUILD_ID
#define SEJD_BUILD_ID "unknown"  /* the build passes -DSEJD_BUILD_ID="...": what was compiled, and how */
#endif

#define PANEL 32      /* output columns per packed weight panel (two 512-bit vectors) */
#define MAX_THREADS 64
/* How long a waiting thread spins before it sleeps. Inside a job the threads hand off every phase, and a
 * wait lasts at most one task (~1-20 us from batch 1 to 16 at builtin:textures' size) while the thread it
 * waits for runs: JOB_SPIN_NS covers most of them without paying a wake-up (a system call for the waker,
 * tens of microseconds for the woken thread on a virtual machine). Longer, the thread it waits for is not
 * running (preempted, or not yet woken), and sleeping gives that thread the core. Between jobs workers
 * spin IDLE_SPIN_NS (longer than the gap between two steps called from Python, so they stay awake through
 * a token-by-token loop) and then sleep: a pool nobody uses takes no CPU. */
#define JOB_SPIN_NS 10000
#define IDLE_SPIN_NS 50000
/* Width: how many of a pool's threads take part in its jobs. A wait in a job longer than STALL_NS (far
 * above a task or a wake-up, below the time slice the OS gives another process) means a thread did not
 * run: a stall. Once stalls add up to 1/STALL_SHARE of a STALL_WINDOW_NS window the machine has fewer free
 * cores than the pool has threads (another process, a CPU quota), and every stall costs the job a time
 * slice: the pool runs with one thread fewer (a rare stall, a hiccup of the machine, does not count). It
 * tries one more again after a hold (HOLD_MIN_NS, doubled each time it narrows again within the hold, up
 * to HOLD_MAX_NS; back to HOLD_MIN_NS once a widening lasts a hold). */
#define STALL_NS 250000
#define STALL_WINDOW_NS 40000000LL
#define STALL_SHARE 4  /* 10 ms of stalls in 40 ms: about where two threads at batch 16 (1.4x one thread
                        * when both run) stop beating one */
#define HOLD_MIN_NS 20000000LL
#define HOLD_MAX_NS 1000000000LL

const char *sejd_build_id(void) { return SEJD_BUILD_ID; }

static void *aligned(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    memset(p, 0, bytes);
    return p;
}

/* ---------------------------------------------------------------- thread pool ------------------- */

typedef struct Pool Pool;
typedef void (*job_fn)(Pool *p, void *arg, int tid, int nthreads);

typedef struct { _Alignas(64) atomic_llong v; } Slot;  /* one cache line each: no false sharing */

/* Something threads wait for: a 32-bit word they sleep on, and how many sleep on it (or are about to).
 *
 * The protocol that loses no wake-up (every access below is sequentially consistent):
 *   waiter:  seen = word;  sleepers++;  if (!condition) futex_wait(word, seen);  sleepers--;  re-check.
 *   waker:   make the condition true;  if (sleepers) { word++ (unless the word is the condition);
 *            futex_wake(word, all); }
 * If the waiter found the condition false, its check came before the waker's write, so its sleepers++
 * came before the waker's read of `sleepers`: the waker sees it and wakes. The waiter read `seen` before
 * the waker changed the word, so futex_wait either finds the word changed and returns at once, or is
 * asleep before the wake (the kernel compares and queues atomically). A waker that finds no sleeper skips
 * the system call: any later waiter will find the condition true. Wake-ups may be spurious (a wake meant
 * for an earlier phase); waiters always re-check. */
typedef struct { _Alignas(64) atomic_uint word; atomic_int sleepers; } Gate;

struct Pool {
    int nthreads;                /* threads created, the calling thread included (fixed for the pool's life) */
    atomic_int forked;           /* set in a forked child, where no worker exists: jobs run on the caller */
    pthread_mutex_t job_lock;    /* one job at a time */
    pthread_t threads[MAX_THREADS];
    struct Seat { Pool *p; int tid; } seats[MAX_THREADS];  /* each worker's argument */
    Pool *prev, *next_pool;      /* the registry the fork handlers walk */
    job_fn fn;                   /* the current job: written before `open` is set, read after it is seen */
    void *arg;
    Gate start;                  /* word: the job generation (bumped per job and to stop); idle workers */
    Gate leave;                  /* word: workers inside the current job; the caller waiting for them to leave */
    Gate phase;                  /* word: moved when a phase's last task is done; threads in walk_end */
    int job_threads;             /* threads the current job runs on (its home ranges): the width when it began */
    _Alignas(64) atomic_int open;  /* the current job still accepts workers */
    atomic_int parked;           /* idle workers sleep without spinning (sejd_pool_park; cleared by a job) */
    atomic_int stop;
    _Alignas(64) atomic_int width;  /* threads jobs run on, 1..nthreads (see STALL_NS); read by workers */
    pthread_mutex_t adapt_lock;  /* the width's bookkeeping (taken at a job's start and after a stall): */
    long long window_start, stalled_ns;  /* the current window, and the stalls in it */
    long long narrowed_at, widened_at, hold_ns;  /* now_ns() times; the current hold */
#ifndef __linux__
    pthread_mutex_t sleep_lock;  /* the portable fallback for futexes: one condition for all three gates */
    pthread_cond_t sleep_cond;
#endif
    Slot next[MAX_THREADS];      /* per home range: (phase << 32) | tasks claimed in that phase */
    Slot completed;              /* tasks finished in this job, over all its phases */
};

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Sleep while *word == seen. Returns when woken, at once when the word differs, or spuriously. */
static void sleep_on(Pool *p, atomic_uint *word, unsigned seen) {
#ifdef __linux__
    (void)p;
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
    /* The waker changes the word before it takes the lock to broadcast, and the word is checked here under
     * the lock: a change after the check finds this thread inside pthread_cond_wait. */
    pthread_mutex_lock(&p->sleep_lock);
    while (atomic_load(word) == seen) pthread_cond_wait(&p->sleep_cond, &p->sleep_lock);
    pthread_mutex_unlock(&p->sleep_lock);
#endif
}

static void wake_all(Pool *p, atomic_uint *word) {
#ifdef __linux__
    (void)p;
    syscall(SYS_futex, (unsigned *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)word;
    pthread_mutex_lock(&p->sleep_lock);
    pthread_cond_broadcast(&p->sleep_cond);
    pthread_mutex_unlock(&p->sleep_lock);
#endif
}

/* The waker's half of the protocol, after its write made a waiter's condition true. `bump`: the gate's word
 * is not the condition itself, so move it (futex_wait compares the word). */
static inline void gate_wake(Pool *p, Gate *g, int bump) {
    if (atomic_load(&g->sleepers)) {
        if (bump) atomic_fetch_add(&g->word, 1);
        wake_all(p, &g->word);
    }
}

typedef int (*ready_fn)(Pool *p, long long arg);

/* Wait until ready(p, arg): spin up to spin_ns (cut short once *cut is set), then sleep on the gate. */
static inline void wait_until(Pool *p, Gate *g, ready_fn ready, long long arg, long long spin_ns,
                              const atomic_int *cut) {
    if (ready(p, arg)) return;
#define CUT (cut && atomic_load_explicit(cut, memory_order_relaxed))
    if (spin_ns > 0 && !CUT) {
        long long start = now_ns();
        for (int i = 1;; i++) {
            cpu_relax();
            if (ready(p, arg)) return;
            if (i % 16 == 0 && (now_ns() - start >= spin_ns || CUT))
                break;  /* the clock is read every 16 pauses: a fraction of a microsecond */
        }
    }
#undef CUT
    for (;;) {
        unsigned seen = atomic_load(&g->word);
        atomic_fetch_add(&g->sleepers, 1);
        int done = ready(p, arg);
        if (!done) sleep_on(p, &g->word, seen);
        atomic_fetch_sub(&g->sleepers, 1);
        if (done || ready(p, arg)) return;
    }
}

/* A thread's walk through a job's phases (every thread walks the same sequence). */
typedef struct {
    Pool *p;
    long long id;    /* this phase's number */
    long long done;  /* tasks completed before this phase began */
    int n;           /* tasks in this phase */
    int tid, nthreads;
} Walk;

static void walk_begin(Walk *w, int n) { w->n = n; }

/* The next task of the current phase this thread should run, or -1 when all are taken. */
static int walk_claim(Walk *w) {
    int n = w->n, N = w->nthreads;
    for (int i = 0; i < N; i++) {
        int u = (w->tid + i) % N, lo = (int)((long)n * u / N), hi = (int)((long)n * (u + 1) / N);
        if (lo == hi) continue;
        atomic_llong *slot = &w->p->next[u].v;
        long long v = atomic_load_explicit(slot, memory_order_acquire);
        for (;;) {
            long long phase = v >> 32, taken = v & 0xffffffffLL, want;
            if (phase > w->id) break;                        /* a later phase owns it: all taken */
            if (phase < w->id) { want = (w->id << 32) | 1; taken = 0; }
            else if (lo + taken >= hi) break;
            else want = v + 1;
            if (atomic_compare_exchange_weak_explicit(slot, &v, want, memory_order_acq_rel, memory_order_acquire))
                return lo + (int)taken;
        }
    }
    return -1;
}

static void walk_task_done(Walk *w) {
    long long total = atomic_fetch_add(&w->p->completed.v, 1) + 1;  /* seq_cst: the waker's write */
    if (total == w->done + w->n) gate_wake(w->p, &w->p->phase, 1);  /* the phase's last task */
}

static int phase_done(Pool *p, long long target) { return atomic_load(&p->completed.v) >= target; }

/* A wait in a job took `waited` ns, over STALL_NS: count it, and narrow the pool when the stalls of the
 * window add up (several threads may wait through the same stall: each counts its own wait). */
static void pool_stalled(Pool *p, long long waited) {
    long long now = now_ns();
    pthread_mutex_lock(&p->adapt_lock);
    if (now - p->window_start > STALL_WINDOW_NS) {
        p->window_start = now;
        p->stalled_ns = 0;
    }
    p->stalled_ns += waited;
    int w = atomic_load(&p->width);
    if (w > 1 && p->stalled_ns * STALL_SHARE > STALL_WINDOW_NS) {
        if (now - p->widened_at < p->hold_ns)  /* the last widening did not last: wait longer next time */
            p->hold_ns = 2 * p->hold_ns < HOLD_MAX_NS ? 2 * p->hold_ns : HOLD_MAX_NS;
        p->narrowed_at = p->window_start = now;
        p->stalled_ns = 0;
        atomic_store(&p->width, w - 1);
    }
    pthread_mutex_unlock(&p->adapt_lock);
}

/* Threads for the job about to begin (the caller, under job_lock): the width, one wider when the pool has
 * not narrowed for a hold. */
static int job_width(Pool *p) {
    long long now = now_ns();
    pthread_mutex_lock(&p->adapt_lock);
    int w = atomic_load(&p->width);
    long long last = p->narrowed_at > p->widened_at ? p->narrowed_at : p->widened_at;
    if (now - last >= p->hold_ns) {  /* no change for a hold */
        if (p->widened_at > p->narrowed_at) p->hold_ns = HOLD_MIN_NS;  /* the last widening lasted */
        if (w < p->nthreads) {
            p->widened_at = now;
            atomic_store(&p->width, ++w);
        }
    }
    pthread_mutex_unlock(&p->adapt_lock);
    return w;
}

/* Wait for the phase on the gate, and remember a stall. */
static void wait_in_job(Pool *p, Gate *g, ready_fn ready, long long arg) {
    if (ready(p, arg)) return;
    long long start = now_ns();
    wait_until(p, g, ready, arg, JOB_SPIN_NS, NULL);
    long long waited = now_ns() - start;
    if (waited > STALL_NS) pool_stalled(p, waited);
}

/* Wait until every task of the phase is done, then move to the next phase. The tasks this thread could
 * claim it ran already (PHASE claims until none is left): what remains is running on other threads, and
 * the last of them to finish wakes this one. */
static void walk_end(Walk *w) {
    long long target = w->done + w->n;
    wait_in_job(w->p, &w->p->phase, phase_done, target);
    w->done = target;
    w->id++;
}

static int job_posted(Pool *p, long long seen) {
    return atomic_load(&p->start.word) != (unsigned)seen || atomic_load(&p->stop);
}

static int workers_left(Pool *p, long long unused) {
    (void)unused;
    return atomic_load(&p->leave.word) == 0;
}

static void *worker_main(void *seat) {
    Pool *p = ((struct Seat *)seat)->p;
    int tid = ((struct Seat *)seat)->tid;
    unsigned seen = atomic_load(&p->start.word);
    long long spin = IDLE_SPIN_NS;
    for (;;) {
        wait_until(p, &p->start, job_posted, seen, spin, &p->parked);
        if (atomic_load(&p->stop)) return NULL;
        seen = atomic_load(&p->start.word);
        atomic_fetch_add(&p->leave.word, 1);  /* then check the job is still open (the caller checks the */
        int open = atomic_load(&p->open);     /* other way round): it never returns while a worker is inside */
        int mine = open && tid < p->job_threads;
        if (mine) p->fn(p, p->arg, tid, p->job_threads);
        if (atomic_fetch_sub(&p->leave.word, 1) == 1) gate_wake(p, &p->leave, 0);
        /* a job that runs narrower than this thread woke it in vain: no spinning for the next one (a job
         * it came too late for, it spins for, to be awake for the next token) */
        spin = open && !mine ? 0 : IDLE_SPIN_NS;
    }
}

/* Run fn on the calling thread and on every worker that joins before it returns. Under p->job_lock. */
static void run_job(Pool *p, job_fn fn, void *arg) {
    int n = p->nthreads == 1 || atomic_load_explicit(&p->forked, memory_order_relaxed) ? 1 : job_width(p);
    if (n == 1) {  /* the workers are not woken (nor is the job opened to them) */
        fn(p, arg, 0, 1);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    p->job_threads = n;
    atomic_store(&p->parked, 0);
    atomic_store(&p->open, 1);
    atomic_fetch_add(&p->start.word, 1);  /* the idle workers' condition: a new generation */
    gate_wake(p, &p->start, 0);
    fn(p, arg, 0, n);
    atomic_store(&p->open, 0);
    wait_in_job(p, &p->leave, workers_left, 0);  /* a worker preempted inside the job stalls it here too */
}

/* ----- pools and fork */

/* Every live pool, for the fork handlers. Lock order: registry_lock, then a pool's job_lock, then a
 * Block's lock. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static Pool *registry;

/* Before fork(): wait for every running job (its workers would vanish mid-job in the child) and hold the
 * pools still until the child has marked them. */
static void fork_prepare(void) {
    pthread_mutex_lock(&registry_lock);
    for (Pool *p = registry; p; p = p->next_pool) pthread_mutex_lock(&p->job_lock);
}

static void fork_parent(void) {
    for (Pool *p = registry; p; p = p->next_pool) pthread_mutex_unlock(&p->job_lock);
    pthread_mutex_unlock(&registry_lock);
}

/* In the child only the forking thread exists (it holds the locks taken in fork_prepare): its pools have
 * no workers, so they run every job on the calling thread from now on. */
static void fork_child(void) {
    for (Pool *p = registry; p; p = p->next_pool) {
        atomic_store(&p->forked, 1);
        pthread_mutex_unlock(&p->job_lock);
    }
    pthread_mutex_unlock(&registry_lock);
}

static void register_fork_handlers(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

/* A pool of `threads` threads, the calling thread included (clamped to 1..MAX_THREADS; fewer when the
 * system refuses to create more), or NULL when out of memory. */
void *sejd_pool_new(int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handlers);
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    Pool *p = aligned(sizeof(Pool));  /* zeroed: every counter at 0 */
    if (!p) return NULL;
    pthread_mutex_init(&p->job_lock, NULL);
#ifndef __linux__
    pthread_mutex_init(&p->sleep_lock, NULL);
    pthread_cond_init(&p->sleep_cond, NULL);
#endif
    p->nthreads = 1;
    pthread_mutex_init(&p->adapt_lock, NULL);
    p->hold_ns = HOLD_MIN_NS;
    pthread_mutex_lock(&registry_lock);
    p->next_pool = registry;
    if (registry) registry->prev = p;
    registry = p;
    pthread_mutex_lock(&p->job_lock);  /* a fork waits until the workers exist (fork_prepare takes it) */
    pthread_mutex_unlock(&registry_lock);
    for (int t = 1; t < threads; t++) {
        p->seats[t] = (struct Seat){p, t};
        if (pthread_create(&p->threads[t], NULL, worker_main, &p->seats[t]) != 0) break;
        p->nthreads = t + 1;
    }
    atomic_store(&p->width, p->nthreads);
    pthread_mutex_unlock(&p->job_lock);
    return p;
}

/* Threads a job of this pool runs on in this process (1 in a forked child). */
int sejd_pool_threads(void *pool) {
    Pool *p = pool;
    return !p ? 0 : atomic_load(&p->forked) ? 1 : p->nthreads;
}

/* Idle workers stop spinning and sleep now (until the next job): before other work needs the cores, e.g.
 * ONNX Runtime's own thread pool. Cheap (one store); callable at any time, from any thread. */
void sejd_pool_park(void *pool) {
    if (pool) atomic_store(&((Pool *)pool)->parked, 1);
}

/* Stops and joins the workers (after the running job, if any) and frees the pool. */
void sejd_pool_free(void *pool) {
    Pool *p = pool;
    if (!p) return;
    pthread_mutex_lock(&registry_lock);
    if (p->prev) p->prev->next_pool = p->next_pool;
    else registry = p->next_pool;
    if (p->next_pool) p->next_pool->prev = p->prev;
    pthread_mutex_unlock(&registry_lock);
    pthread_mutex_lock(&p->job_lock);
    if (p->nthreads > 1 && !atomic_load(&p->forked)) {  /* a forked child has no workers to join */
        atomic_store(&p->stop, 1);
        atomic_fetch_add(&p->start.word, 1);
        wake_all(p, &p->start.word);
        for (int t = 1; t < p->nthreads; t++) pthread_join(p->threads[t], NULL);
    }
    pthread_mutex_unlock(&p->job_lock);
    pthread_mutex_destroy(&p->job_lock);
    pthread_mutex_destroy(&p->adapt_lock);
#ifndef __linux__
    pthread_mutex_destroy(&p->sleep_lock);
    pthread_cond_destroy(&p->sleep_cond);
#endif
    free(p);
}

/* ---------------------------------------------------------------- packed linear layers ----------- */

typedef struct {
    int K, N, panels;
    float *w;     /* panels x K x PANEL, zero-padded: panel p holds output columns p*PANEL .. +PANEL */
    float *bias;  /* N */
} Linear;

/* w: PyTorch layout (N, K) row-major. */
static int linear_init(Linear *l, const float *w, const float *bias, int N, int K) {
    l->K = K; l->N = N; l->panels = (N + PANEL - 1) / PANEL;
    l->w = aligned((size_t)l->panels * K * PANEL * sizeof(float));
    l->bias = aligned((size_t)N * sizeof(float));
    if (!l->w || !l->bias) return -1;
    for (int n = 0; n < N; n++) {
        float *dst = l->w + (size_t)(n / PANEL) * K * PANEL + n % PANEL;
        for (int k = 0; k < K; k++) dst[(size_t)k * PANEL] = w[(size_t)n * K + k];
        l->bias[n] = bias ? bias[n] : 0.0f;
    }
    return 0;
}

static void linear_free(Linear *l) { free(l->w); free(l->bias); }

enum { STORE = 0, ADD = 1, GELU = 2 };

static inline float exp_poly(float x) {
    /* e^x = 2^n * e^r, |r| <= ln2/2, e^r by its Taylor series to r^7 (relative error < 2e-8). */
    if (x != x) return x;  /* NaN stays NaN (and never reaches the integer conversion) */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693145752f - n * 1.42860677e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

static inline float gelu(float x) {
    /* 0.5 x (1 + erf(x / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7). */
    float u = x * 0.70710678f, a = fabsf(u);
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    float e = 1.0f - poly * exp_poly(-a * a);
    return 0.5f * x * (1.0f + copysignf(e, u));
}

/* acc = in[RB rows, :] . W for PB consecutive panels: RB x PB independent accumulator chains, enough
 * to hide the fused multiply-add latency whether the batch has many rows (8 or 4 x 1) or one (1 x 4);
 * more rows per loaded weight vector also halve the weight traffic. */
#define PANEL_KERNEL(RB, PB)                                                                              \
    static void kernel_##RB##x##PB(const float *in, int ldin, const float *wp, int K, float *acc) {     \
        float a_[RB][PB * PANEL];                                                                        \
        for (int r = 0; r < RB; r++)                                                                     \
            for (int j = 0; j < PB * PANEL; j++) a_[r][j] = 0.0f;                                        \
        for (int k = 0; k < K; k++) {                                                                    \
            for (int p = 0; p < PB; p++) {                                                               \
                const float *w = wp + ((size_t)p * K + k) * PANEL;                                       \
                for (int r = 0; r < RB; r++) {                                                           \
                    float a = in[(size_t)r * ldin + k];                                                  \
                    for (int j = 0; j < PANEL; j++) a_[r][p * PANEL + j] += a * w[j];                    \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < RB; r++)                                                                     \
            for (int j = 0; j < PB * PANEL; j++) acc[r * 4 * PANEL + j] = a_[r][j];                      \
    }
PANEL_KERNEL(8, 1)
PANEL_KERNEL(4, 1)
PANEL_KERNEL(1, 4)
PANEL_KERNEL(1, 1)

/* out[r, c0 .. c0+cols) op= acc + bias: store, accumulate into (residual), or GELU. */
__attribute__((noinline)) static void epilogue(const float *restrict acc, const float *restrict bias, float *restrict o, int cols, int op) {
    if (op == ADD) {
        for (int j = 0; j < cols; j++) o[j] += acc[j] + bias[j];
    } else if (op == GELU) {
        for (int j = 0; j < cols; j++) o[j] = gelu(acc[j] + bias[j]);
    } else {
        for (int j = 0; j < cols; j++) o[j] = acc[j] + bias[j];
    }
}

/* A task of a linear layer: one panel for all rows (4 rows at a time) or, with fewer than 4 rows, up to
 * 4 panels (then the panels supply the independent accumulator chains). */
static int linear_group(int rows) { return rows >= 4 ? 1 : 4; }

static int linear_tasks(const Linear *l, int rows) {
    int g = linear_group(rows);
    return (l->panels + g - 1) / g;
}

/* out (ld = l->N) op= in . W + bias over the columns of task `task`, for all `rows`. */
static void linear_task(const Linear *l, const float *in, int rows, float *out, int op, int task) {
    int g = linear_group(rows), p0 = task * g, p1 = p0 + g < l->panels ? p0 + g : l->panels;
    float acc[8 * 4 * PANEL];  /* [row][4 panels x PANEL] */
    for (int r0 = 0; r0 < rows;) {
        int rb = rows - r0 >= 8 ? 8 : rows - r0 >= 4 ? 4 : 1;
        const float *x = in + (size_t)r0 * l->K;
        for (int p = p0; p < p1;) {
            int pb = rb == 1 && p1 - p >= 4 ? 4 : 1;
            const float *wp = l->w + (size_t)p * l->K * PANEL;
            if (rb == 8) kernel_8x1(x, l->K, wp, l->K, acc);
            else if (rb == 4) kernel_4x1(x, l->K, wp, l->K, acc);
            else if (pb == 4) kernel_1x4(x, l->K, wp, l->K, acc);
            else kernel_1x1(x, l->K, wp, l->K, acc);
            int c0 = p * PANEL, cols = l->N - c0 < pb * PANEL ? l->N - c0 : pb * PANEL;
            for (int r = 0; r < rb; r++)
                epilogue(acc + r * 4 * PANEL, l->bias + c0, out + (size_t)(r0 + r) * l->N + c0, cols, op);
            p += pb;
        }
        r0 += rb;
    }
}

/* ---------------------------------------------------------------- the block ---------------------- */

typedef struct {
    float *ln1_g, *ln1_b, *ln2_g, *ln2_b;
    float eps1, eps2;
    Linear qkv, proj, fc1, fc2;
} Layer;

typedef struct {
    int D, C, H, hd, T, L, E, P, nvp, classes;
    float scale;
    Linear in, out;
    float *pos;      /* T x C: the block's (permuted) position embedding + proj_in's bias */
    float *classes_; /* (classes + 1) x C, the class mean last; NULL without classes */
    Layer *layers;
    pthread_mutex_t lock;  /* one job at a time: the scratch below is shared by every call */
    /* scratch, sized for `rows` rows */
    int rows;
    float *tok, *h, *norm, *qkv, *att, *mlp, *p, *xa, *xb, *scores;  /* scores: T per thread */
} Block;

static float *copy_floats(const float *src, size_t n) {
    float *d = aligned(n * sizeof(float));
    if (d && src) memcpy(d, src, n * sizeof(float));
    return d;
}

static void free_scratch(Block *b) {
    float **all[] = {&b->tok, &b->h, &b->norm, &b->qkv, &b->att, &b->mlp, &b->p, &b->xa, &b->xb, &b->scores};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) { free(*all[i]); *all[i] = NULL; }
    b->rows = 0;
}

void sejd_block_free(Block *b) {
    if (!b) return;
    linear_free(&b->in); linear_free(&b->out);
    free(b->pos); free(b->classes_);
    for (int l = 0; l < b->L && b->layers; l++) {
        Layer *y = &b->layers[l];
        free(y->ln1_g); free(y->ln1_b); free(y->ln2_g); free(y->ln2_b);
        linear_free(&y->qkv); linear_free(&y->proj); linear_free(&y->fc1); linear_free(&y->fc2);
    }
    free(b->layers);
    free_scratch(b);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

/* dims: D, C, H, T, L, E (MLP width), P (proj_out width: 2D or D), nvp, classes.
 * per layer, 12 pointers: ln1 g, b, qkv w (3C x C), b, proj w (C x C), b, ln2 g, b, fc1 w (E x C), b,
 * fc2 w (C x E), b; eps: per layer (ln1, ln2). All weights in PyTorch's (out, in) layout. */
Block *sejd_block_new(const int *dims, const float *w_in, const float *pos, const float *classes,
                      const float *const *layer_params, const float *eps, const float *w_out, const float *b_out,
                      float scale) {
    Block *b = calloc(1, sizeof(Block));
    if (!b) return NULL;
    pthread_mutex_init(&b->lock, NULL);
    b->D = dims[0]; b->C = dims[1]; b->H = dims[2]; b->T = dims[3]; b->L = dims[4]; b->E = dims[5];
    b->P = dims[6]; b->nvp = dims[7]; b->classes = dims[8];
    b->hd = b->C / b->H;
    b->scale = scale;
    int C = b->C, E = b->E;
    b->layers = calloc((size_t)b->L, sizeof(Layer));
    if (!b->layers || linear_init(&b->in, w_in, NULL, C, b->D) || linear_init(&b->out, w_out, b_out, b->P, C)) goto fail;
    if (!(b->pos = copy_floats(pos, (size_t)b->T * C))) goto fail;
    if (b->classes && !(b->classes_ = copy_floats(classes, (size_t)(b->classes + 1) * C))) goto fail;
    for (int l = 0; l < b->L; l++) {
        const float *const *q = layer_params + 12 * l;
        Layer *y = &b->layers[l];
        y->eps1 = eps[2 * l]; y->eps2 = eps[2 * l + 1];
        if (!(y->ln1_g = copy_floats(q[0], C)) || !(y->ln1_b = copy_floats(q[1], C)) ||
            !(y->ln2_g = copy_floats(q[6], C)) || !(y->ln2_b = copy_floats(q[7], C)) ||
            linear_init(&y->qkv, q[2], q[3], 3 * C, C) || linear_init(&y->proj, q[4], q[5], C, C) ||
            linear_init(&y->fc1, q[8], q[9], E, C) || linear_init(&y->fc2, q[10], q[11], C, E))
            goto fail;
    }
    return b;
fail:
    sejd_block_free(b);
    return NULL;
}

/* Scratch for `rows` rows (kept, and grown when a larger batch comes). */
static int ensure_rows(Block *b, int rows) {
    if (rows <= b->rows) return 0;
    free_scratch(b);
    size_t R = (size_t)rows, f = sizeof(float);
    b->tok = aligned(R * b->D * f); b->h = aligned(R * b->C * f); b->norm = aligned(R * b->C * f);
    b->qkv = aligned(R * 3 * b->C * f); b->att = aligned(R * b->C * f); b->mlp = aligned(R * b->E * f);
    b->p = aligned(R * b->P * f); b->xa = aligned(R * b->D * f); b->xb = aligned(R * b->D * f);
    b->scores = aligned((size_t)MAX_THREADS * b->T * f);
    if (!(b->tok && b->h && b->norm && b->qkv && b->att && b->mlp && b->p && b->xa && b->xb && b->scores)) {
        free_scratch(b);
        return -1;
    }
    b->rows = rows;
    return 0;
}

/* Sum of a[i] * b[i] in 16 lane-wise partial sums (a vector register's worth: the compiler may not
 * reorder one float sum, but it vectorizes sixteen independent ones). */
static inline float dot(const float *restrict a, const float *restrict b, int n) {
#ifdef __AVX512F__
    if (n % 16 == 0) {  /* one vector of partial sums, reduced by shuffles rather than 15 scalar adds */
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float part[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) part[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j++) s += part[j];
    return s;
}

/* s[i] = e^(s[i] - shift), the softmax numerators. */
__attribute__((noinline)) static void exp_shifted(float *restrict s, int n, float shift) {
    for (int i = 0; i < n; i++) s[i] = exp_poly(s[i] - shift);
}

static inline float sum(const float *a, int n) {
    float part[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) part[j] += a[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i];
    for (int j = 0; j < 16; j++) s += part[j];
    return s;
}

static void layer_norm(const float *v, int C, const float *g, const float *beta, float eps, float *restrict o) {
    float mean = sum(v, C) / C;
    for (int c = 0; c < C; c++) o[c] = v[c] - mean;
    float inv = 1.0f / sqrtf(dot(o, o, C) / C + eps);
    for (int c = 0; c < C; c++) o[c] = o[c] * inv * g[c] + beta[c];
}

typedef struct {
    Block *b;
    int B, R, pos, end;            /* tokens pos .. end-1 (a step: one token) */
    const float *x;                /* step: (B, D), the token at pos */
    const float *z;                /* sequential: (B, T, D) */
    float *out;                    /* step: xa, xb (2, B, D); sequential: x (B, T, D) */
    float *const *caches;          /* 2L pointers, (R, H, T, hd) each */
    const int64_t *labels;         /* (R,) or NULL */
    const float *temps;            /* (R,) */
    const float *guidance;         /* (2, T) or NULL */
    long long phase0, done0;       /* where the pool's counters stood when the job began */
} Job;

/* Attention of one (row, head) pair at token `pos`: this token's key/value into the cache, then
 * softmax(q.K * scale / temp) V over positions 0..pos. */
static void attend(const Job *j, int layer, int pos, int pair, float *scores) {
    Block *b = j->b;
    int H = b->H, hd = b->hd, T = b->T, C = b->C, r = pair / H, h = pair % H;
    float *K = j->caches[2 * layer] + ((size_t)r * H + h) * T * hd;
    float *V = j->caches[2 * layer + 1] + ((size_t)r * H + h) * T * hd;
    const float *row = b->qkv + (size_t)r * 3 * C, *q = row + h * hd;
    memcpy(K + (size_t)pos * hd, row + C + h * hd, hd * sizeof(float));
    memcpy(V + (size_t)pos * hd, row + 2 * C + h * hd, hd * sizeof(float));
    float s = b->scale / j->temps[r], top = -INFINITY;
    for (int t = 0; t <= pos; t++) {
        scores[t] = dot(q, K + (size_t)t * hd, hd) * s;
        top = scores[t] > top ? scores[t] : top;
    }
    exp_shifted(scores, pos + 1, top);
    float total = sum(scores, pos + 1);
    float o[512];  /* hd <= 512, checked at creation in Python */
    for (int c = 0; c < hd; c++) o[c] = 0;
    for (int t = 0; t <= pos; t++) {
        const float *v = V + (size_t)t * hd;
        float w = scores[t];
        for (int c = 0; c < hd; c++) o[c] += w * v[c];
    }
    float *dst = b->att + (size_t)r * C + h * hd;
    for (int c = 0; c < hd; c++) dst[c] = o[c] / total;
}

/* Guided (xa, xb) of the B samples from the R rows of proj_out's output b->p -> xa, xb (B, D) each. */
static void guided(const Job *j, int pos, float *xa, float *xb) {
    const Block *b = j->b;
    int B = j->B, D = b->D, P = b->P;
    float wa = 0, wb = 0;
    if (j->R == 2 * B && j->guidance) { wa = j->guidance[pos]; wb = j->guidance[b->T + pos]; }
    for (int s = 0; s < B; s++) {
        const float *c = b->p + (size_t)s * P, *u = b->p + (size_t)(j->R - B + s) * P;
        for (int d = 0; d < D; d++) {
            float ca = b->nvp ? c[d] : 0, ua = b->nvp ? u[d] : 0;
            float cb = b->nvp ? c[D + d] : c[d], ub = b->nvp ? u[D + d] : u[d];
            xa[(size_t)s * D + d] = ca + wa * (ca - ua);
            xb[(size_t)s * D + d] = cb + wb * (cb - ub);
        }
    }
}

/* The rows' input token at `pos`: row r is sample r mod B of the step's x or of the block's output. */
static void gather_rows(const Job *j, int pos) {
    Block *b = j->b;
    int D = b->D;
    for (int r = 0; r < j->R; r++) {
        int s = r % j->B;
        const float *t = j->z ? j->out + ((size_t)s * b->T + pos) * D : j->x + (size_t)s * D;
        memcpy(b->tok + (size_t)r * D, t, D * sizeof(float));
    }
}

/* Row r of h at the first layer: proj_in(token) (+ its bias, folded into the position table) + the
 * position embedding + the class term of the row's label. */
static void embed_row(const Job *j, int pos, int r) {
    Block *b = j->b;
    int C = b->C;
    float *h = b->h + (size_t)r * C;
    const float *pe = b->pos + (size_t)pos * C;
    for (int c = 0; c < C; c++) h[c] += pe[c];
    if (b->classes) {
        int64_t y = j->labels ? j->labels[r] : -1;
        const float *ct = b->classes_ + (size_t)(y < 0 || y >= b->classes ? b->classes : y) * C;
        for (int c = 0; c < C; c++) h[c] += ct[c];
    }
}

/* The last task of a token: the guided parameters out (a step), or token pos+1 of the output. */
static void finish_token(const Job *j, int pos) {
    Block *b = j->b;
    int B = j->B, D = b->D, T = b->T;
    if (!j->z) { guided(j, pos, j->out, j->out + (size_t)B * D); return; }
    guided(j, pos, b->xa, b->xb);
    for (int s = 0; s < B; s++)
        for (int d = 0; d < D; d++) {
            size_t at = ((size_t)s * T + pos + 1) * D + d, i = (size_t)s * D + d;
            j->out[at] = j->z[at] * exp_poly(b->xa[i]) + b->xb[i];
        }
}

/* Run `body` for every task of a phase this thread claims (`task` is its index), then wait for the rest. */
#define PHASE(walk, ntasks, body)                                                         \
    do {                                                                                  \
        walk_begin(&(walk), (ntasks));                                                    \
        for (int task; (task = walk_claim(&(walk))) >= 0;) { body; walk_task_done(&(walk)); } \
        walk_end(&(walk));                                                                \
    } while (0)

static void block_job(Pool *p, void *arg, int tid, int nthreads) {
    Job *j = arg;
    Block *b = j->b;
    int C = b->C, R = j->R;
    Walk w = {p, j->phase0, j->done0, 0, tid, nthreads};
    float *scores = b->scores + (size_t)tid * b->T;
    for (int pos = j->pos; pos < j->end; pos++) {
        if (tid && tid >= atomic_load_explicit(&p->width, memory_order_relaxed))
            return;  /* the pool narrowed (see STALL_NS): this worker leaves; the others take its share */
        PHASE(w, 1, gather_rows(j, pos));
        PHASE(w, linear_tasks(&b->in, R), linear_task(&b->in, b->tok, R, b->h, STORE, task));
        for (int l = 0; l < b->L; l++) {
            Layer *y = &b->layers[l];
            PHASE(w, R, {
                if (l == 0) embed_row(j, pos, task);
                layer_norm(b->h + (size_t)task * C, C, y->ln1_g, y->ln1_b, y->eps1, b->norm + (size_t)task * C);
            });
            PHASE(w, linear_tasks(&y->qkv, R), linear_task(&y->qkv, b->norm, R, b->qkv, STORE, task));
            PHASE(w, R * b->H, attend(j, l, pos, task, scores));
            PHASE(w, linear_tasks(&y->proj, R), linear_task(&y->proj, b->att, R, b->h, ADD, task));
            PHASE(w, R, layer_norm(b->h + (size_t)task * C, C, y->ln2_g, y->ln2_b, y->eps2, b->norm + (size_t)task * C));
            PHASE(w, linear_tasks(&y->fc1, R), linear_task(&y->fc1, b->norm, R, b->mlp, GELU, task));
            PHASE(w, linear_tasks(&y->fc2, R), linear_task(&y->fc2, b->mlp, R, b->h, ADD, task));
        }
        PHASE(w, linear_tasks(&b->out, R), linear_task(&b->out, b->h, R, b->p, STORE, task));
        PHASE(w, 1, finish_token(j, pos));
    }
}

/* One job at a time per pool and per block (ctypes calls release the GIL, so two Python threads can call
 * in at once: they queue on the mutexes, the pool's first). */
static int run_block(Pool *p, Job *j) {
    pthread_mutex_lock(&p->job_lock);
    pthread_mutex_lock(&j->b->lock);
    int rc = ensure_rows(j->b, j->R) ? -1 : 0;
    if (rc == 0) {
        /* Phases are numbered from 0 in every job (no worker is inside one now: the last job waited for
         * them), so the (phase << 32) tags never overflow: a job has at most T x (4 + 7 L) phases. */
        for (int t = 0; t < MAX_THREADS; t++) atomic_store(&p->next[t].v, 0);
        atomic_store(&p->completed.v, 0);
        j->phase0 = 1;  /* above every slot's tag, so the first claim of each range starts it */
        j->done0 = 0;
        run_job(p, block_job, j);
    }
    pthread_mutex_unlock(&j->b->lock);
    pthread_mutex_unlock(&p->job_lock);
    return rc;
}

/* One token: x (B, D) at `pos` -> out = guided xa, xb (2, B, D); caches get the token's keys/values. */
int sejd_block_step(void *pool, Block *b, int B, int R, int pos, const float *x, float *out,
                    float *const *caches, const int64_t *labels, const float *temps, const float *guidance) {
    if (!pool || !b || pos < 0 || pos >= b->T || B < 1 || (R != B && R != 2 * B)) return -2;
    Job j = {b, B, R, pos, pos + 1, x, NULL, out, caches, labels, temps, guidance, 0, 0};
    return run_block(pool, &j);
}

/* The exact sequential inversion: x[:, 0] = z[:, 0], then x[:, t+1] = z[:, t+1] exp(xa_t) + xb_t for
 * t = 0 .. T-2, each token's parameters from tokens <= t; out (B, T, D); caches hold positions 0..T-2. */
int sejd_block_sequential(void *pool, Block *b, int B, int R, const float *z, float *out,
                          float *const *caches, const int64_t *labels, const float *temps, const float *guidance) {
    if (!pool || !b || B < 1 || (R != B && R != 2 * B)) return -2;
    for (int s = 0; s < B; s++) memcpy(out + (size_t)s * b->T * b->D, z + (size_t)s * b->T * b->D, b->D * sizeof(float));
    Job j = {b, B, R, 0, b->T - 1, NULL, z, out, caches, labels, temps, guidance, 0, 0};
    return run_block(pool, &j);
}
