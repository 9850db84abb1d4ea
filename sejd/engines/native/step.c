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
 * Semantics: those of the block's KV-cached projection in the reference model (sejd/model/tarflow.py)
 * and of the exported `step_rows` graph: rows r = 0..R-1 take sample r mod B (classifier-free guidance
 * runs cond rows then uncond rows), per-row attention temperature and class label (-1: the class mean),
 * caches (R, H, T, hd) per layer written at the token's position, guided parameters
 * c + w * (c - u) with w = guidance[{a,b}][pos].
 *
 * Compiled by sejd/engines/native.py with the machine's C compiler; no symbol here is exported but the
 * `sejd_*` functions.
 */
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PANEL 32      /* output columns per packed weight panel (two 512-bit vectors) */
#define MAX_THREADS 64
#define IDLE_SPIN_NS 200000  /* idle workers spin 0.2 ms (well over the gap between two steps called from
                              * Python) before sleeping, so they do not take a core from other work for long */

/* ---------------------------------------------------------------- thread pool ------------------- */

typedef void (*job_fn)(void *arg, int tid, int nthreads);

typedef struct { _Alignas(64) atomic_llong v; } Slot;  /* one cache line each: no false sharing */

static struct {
    int nthreads;                 /* including the calling thread */
    pthread_t threads[MAX_THREADS];
    atomic_int generation;        /* bumped for each job */
    atomic_int open;              /* the current job still accepts workers */
    atomic_int active;            /* workers inside the current job */
    atomic_int sleeping;
    atomic_int stop;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    job_fn fn;
    void *arg;
    Slot next[MAX_THREADS];       /* per home range: (phase << 32) | tasks claimed in that phase */
    Slot completed;               /* tasks finished, over all phases ever */
} pool = {.nthreads = 1, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* A thread's walk through a job's phases (every thread walks the same sequence). */
typedef struct {
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
        atomic_llong *slot = &pool.next[u].v;
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

static void walk_task_done(void) { atomic_fetch_add_explicit(&pool.completed.v, 1, memory_order_acq_rel); }

/* Wait until every task of the phase is done, then move to the next phase. */
static void walk_end(Walk *w) {
    long long target = w->done + w->n;
    for (int spins = 0; atomic_load_explicit(&pool.completed.v, memory_order_acquire) < target; spins++) {
        if (spins < 4000) cpu_relax();
        else sched_yield();  /* a preempted thread holds a task: let it run */
    }
    w->done = target;
    w->id++;
}

static void *worker_main(void *p) {
    int tid = (int)(intptr_t)p;
    int seen = atomic_load(&pool.generation);
    for (;;) {
        long long idle_since = now_ns();
        for (int spins = 0; atomic_load_explicit(&pool.generation, memory_order_acquire) == seen; spins++) {
            if (atomic_load_explicit(&pool.stop, memory_order_relaxed)) return NULL;
            if (spins % 64 || now_ns() - idle_since < IDLE_SPIN_NS) { cpu_relax(); continue; }
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.generation) == seen && !atomic_load(&pool.stop))
                pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.lock);
            idle_since = now_ns();
        }
        if (atomic_load(&pool.stop)) return NULL;
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        atomic_fetch_add(&pool.active, 1);  /* then check the job is still open (the caller checks the */
        if (atomic_load(&pool.open))        /* other way round): it never returns while a worker is inside */
            pool.fn(pool.arg, tid, pool.nthreads);
        atomic_fetch_sub(&pool.active, 1);
    }
}

static void pool_stop(void) {
    if (pool.nthreads <= 1) return;
    pthread_mutex_lock(&pool.lock);
    atomic_store(&pool.stop, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    for (int t = 1; t < pool.nthreads; t++) pthread_join(pool.threads[t], NULL);
    atomic_store(&pool.stop, 0);
    pool.nthreads = 1;
}

/* Threads that run every following job (the calling thread included); returns the number set. */
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;  /* see run_block */
static int set_threads_locked(int n);

/* A forked child has the pool's state but none of its threads: it starts with the calling thread only. */
static void pool_after_fork(void) {
    pool.nthreads = 1;
    atomic_store(&pool.sleeping, 0);
    atomic_store(&pool.active, 0);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_mutex_init(&job_lock, NULL);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

int sejd_set_threads(int n) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&job_lock);  /* never while a job runs */
    n = set_threads_locked(n);
    pthread_mutex_unlock(&job_lock);
    return n;
}

static int set_threads_locked(int n) {
    if (n == pool.nthreads) return n;
    pool_stop();
    for (int t = 1; t < n; t++) {
        if (pthread_create(&pool.threads[t], NULL, worker_main, (void *)(intptr_t)t) != 0) {
            pool.nthreads = t;
            return t;
        }
    }
    pool.nthreads = n;
    return n;
}

/* Run fn on the calling thread and on every worker that joins before it returns. */
static void run_job(job_fn fn, void *arg) {
    pool.fn = fn;
    pool.arg = arg;
    atomic_store(&pool.open, 1);
    if (pool.nthreads > 1) {
        atomic_fetch_add(&pool.generation, 1);  /* seq_cst: pairs with a worker's sleeping++ then load */
        if (atomic_load(&pool.sleeping)) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_broadcast(&pool.wake);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    fn(arg, 0, pool.nthreads);
    atomic_store(&pool.open, 0);
    for (int spins = 0; atomic_load(&pool.active); spins++) {
        if (spins < 4000) cpu_relax();
        else sched_yield();
    }
}

/* ---------------------------------------------------------------- packed linear layers ----------- */

typedef struct {
    int K, N, panels;
    float *w;     /* panels x K x PANEL, zero-padded: panel p holds output columns p*PANEL .. +PANEL */
    float *bias;  /* N */
} Linear;

static void *aligned(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    memset(p, 0, bytes);
    return p;
}

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
        for (int task; (task = walk_claim(&(walk))) >= 0;) { body; walk_task_done(); }    \
        walk_end(&(walk));                                                                \
    } while (0)

static void block_job(void *arg, int tid, int nthreads) {
    Job *j = arg;
    Block *b = j->b;
    int C = b->C, R = j->R;
    Walk w = {j->phase0, j->done0, 0, tid, nthreads};
    float *scores = b->scores + (size_t)tid * b->T;
    for (int pos = j->pos; pos < j->end; pos++) {
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

/* One job at a time in the process (the pool and a block's scratch are shared; ctypes calls release the
 * GIL, so two Python threads can call in at once): they queue on job_lock. */
static int run_block(Job *j) {
    pthread_mutex_lock(&job_lock);
    if (!j->b || ensure_rows(j->b, j->R)) {
        pthread_mutex_unlock(&job_lock);
        return -1;
    }
    /* Phases are numbered from 0 in every job (no worker is inside one now: the last job waited for them),
     * so the (phase << 32) tags never overflow: a job has at most T x (4 + 7 L) phases. */
    for (int t = 0; t < MAX_THREADS; t++) atomic_store(&pool.next[t].v, 0);
    atomic_store(&pool.completed.v, 0);
    j->phase0 = 1;  /* above every slot's tag, so the first claim of each range starts it */
    j->done0 = 0;
    run_job(block_job, j);
    pthread_mutex_unlock(&job_lock);
    return 0;
}

/* One token: x (B, D) at `pos` -> out = guided xa, xb (2, B, D); caches get the token's keys/values. */
int sejd_block_step(Block *b, int B, int R, int pos, const float *x, float *out, float *const *caches,
                    const int64_t *labels, const float *temps, const float *guidance) {
    if (!b || pos < 0 || pos >= b->T || B < 1 || (R != B && R != 2 * B)) return -2;
    Job j = {b, B, R, pos, pos + 1, x, NULL, out, caches, labels, temps, guidance, 0, 0};
    return run_block(&j);
}

/* The exact sequential inversion: x[:, 0] = z[:, 0], then x[:, t+1] = z[:, t+1] exp(xa_t) + xb_t for
 * t = 0 .. T-2, each token's parameters from tokens <= t; out (B, T, D); caches hold positions 0..T-2. */
int sejd_block_sequential(Block *b, int B, int R, const float *z, float *out, float *const *caches,
                          const int64_t *labels, const float *temps, const float *guidance) {
    if (!b || B < 1 || (R != B && R != 2 * B)) return -2;
    for (int s = 0; s < B; s++) memcpy(out + (size_t)s * b->T * b->D, z + (size_t)s * b->T * b->D, b->D * sizeof(float));
    Job j = {b, B, R, 0, b->T - 1, NULL, z, out, caches, labels, temps, guidance, 0, 0};
    return run_block(&j);
}
