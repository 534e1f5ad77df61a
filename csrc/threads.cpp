// Parallel execution of dsv4rt._C: the thread count, OpenMP on torch's team, the std::thread pool, and
// the automatic choice between them (see Threading in common.h).
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "common.h"

namespace dsv4rt {

int max_threads() {
#ifdef _OPENMP
    return std::max(1, omp_get_max_threads());
#else
    unsigned n = std::thread::hardware_concurrency();
    return n ? static_cast<int>(n) : 1;
#endif
}

bool have_openmp() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

static std::atomic<int> g_threading{static_cast<int>(have_openmp() ? Threading::automatic : Threading::pool)};
Threading threading_mode() { return static_cast<Threading>(g_threading.load(std::memory_order_relaxed)); }
void set_threading_mode(Threading mode) {
    g_threading.store(static_cast<int>(mode != Threading::pool && !have_openmp() ? Threading::pool : mode));
}

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

struct Job {
    TaskFn run;
    void* ctx;
    int64_t n;
    int64_t helpers;                    // helpers wanted (threads - 1)
    std::atomic<int64_t> next{0};       // next unclaimed task
    std::atomic<int64_t> done{0};       // finished tasks
    std::atomic<int64_t> joined{0};     // helpers that took part
    std::atomic<bool> failed{false};
};

// Helpers sleep on a condition variable between jobs (after a short spin). A job is published by bumping
// `gen_`; helpers claim tasks from the job's counter. The caller claims tasks too and returns once
// `done == n`: a helper that never got a CPU just finds no task left when it wakes (the shared_ptr keeps
// the job's counters alive; the task function is only called for claimed tasks, all finished by then).
class Pool {
  public:
    void run(int64_t n, int64_t threads, TaskFn fn, void* ctx) {
        if (threads <= 1 || n <= 1 || busy_.exchange(true)) {   // busy: another thread's job is running
            for (int64_t i = 0; i < n; ++i) fn(ctx, i);
            return;
        }
        auto job = std::make_shared<Job>();
        job->run = fn, job->ctx = ctx, job->n = n, job->helpers = std::min(threads, n) - 1;
        {
            std::lock_guard<std::mutex> lk(mu_);
            while (static_cast<int64_t>(workers_.size()) < job->helpers) workers_.emplace_back([this] { work(); });
            job_ = job;
            gen_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        drain(*job);
        for (int spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins) {
            if (spins < 4096) cpu_relax();
            else std::this_thread::yield();
        }
        {
            std::lock_guard<std::mutex> lk(mu_);
            job_.reset();
        }
        busy_.store(false);
        if (job->failed.load()) throw std::runtime_error("dsv4rt._C: a parallel task failed (out of memory?)");
    }

  private:
    static void drain(Job& job) {
        for (int64_t i = job.next.fetch_add(1); i < job.n; i = job.next.fetch_add(1)) {
            try {
                job.run(job.ctx, i);
            } catch (...) {
                job.failed.store(true);
            }
            job.done.fetch_add(1, std::memory_order_release);
        }
    }

    void work() {
        uint64_t seen = gen_.load();
        for (;;) {
            for (int spins = 0; spins < 5000 && gen_.load(std::memory_order_acquire) == seen; ++spins) cpu_relax();
            std::shared_ptr<Job> job;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return gen_.load() != seen; });
                seen = gen_.load();
                job = job_;
            }
            if (job && job->joined.fetch_add(1) < job->helpers) drain(*job);
        }
    }

    std::mutex mu_;
    std::condition_variable cv_;
    std::vector<std::thread> workers_;
    std::shared_ptr<Job> job_;
    std::atomic<uint64_t> gen_{0};
    std::atomic<bool> busy_{false};
};

Pool* g_pool = new Pool();   // never destroyed: helpers may still sleep on it at interpreter exit

#if defined(__unix__) || defined(__APPLE__)
// a forked child has none of the helper threads: give it a fresh pool (the old one is leaked)
const bool g_atfork = [] { return pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool(); }) == 0; }();
#endif

}  // namespace

#ifdef _OPENMP
namespace {

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

std::atomic<int64_t> g_pool_until{0};   // automatic mode: use the pool until this time (ns)
std::atomic<int> g_strikes{0};

// Dynamic schedule on an OpenMP team. Returns how long the calling thread waited at the region's end
// after it ran out of tasks, beyond what its own tasks took on average (a stalled team member).
int64_t run_openmp(int64_t n, int64_t nt, TaskFn fn, void* ctx) {
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};
    int64_t t0 = now_ns(), master_done = 0, master_tasks = 0;
#pragma omp parallel num_threads(static_cast<int>(nt))
    {
        int64_t mine = 0;
        for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1), ++mine) {
            try {
                fn(ctx, i);
            } catch (...) {
                failed.store(true);
            }
        }
        if (omp_get_thread_num() == 0) {
            master_done = now_ns();
            master_tasks = mine;
        }
    }
    const int64_t end = now_ns();
    if (failed.load()) throw std::runtime_error("dsv4rt._C: a parallel task failed (out of memory?)");
    const int64_t per_task = (master_done - t0) / std::max<int64_t>(1, master_tasks);
    return end - master_done - 2 * per_task;
}

}  // namespace
#endif

void run_tasks(int64_t n, int64_t threads, TaskFn fn, void* ctx) {
    if (n <= 0) return;
    const int64_t nt = std::min<int64_t>(threads > 0 ? threads : max_threads(), n);
#ifdef _OPENMP
    const Threading mode = threading_mode();
    if (nt > 1 && (mode == Threading::openmp || (mode == Threading::automatic && now_ns() >= g_pool_until.load()))) {
        const int64_t stall = run_openmp(n, nt, fn, ctx);
        // automatic: two calls in a row that waited > 1 ms for a team thread another process kept off
        // the CPU switch to the pool for a second, then OpenMP is tried again
        if (mode == Threading::automatic) {
            if (stall < 1000000) g_strikes.store(0);
            else if (g_strikes.fetch_add(1) + 1 >= 2) {
                g_strikes.store(0);
                g_pool_until.store(now_ns() + 1000000000);
            }
        }
        return;
    }
#endif
    g_pool->run(n, nt, fn, ctx);
}

}  // namespace dsv4rt
