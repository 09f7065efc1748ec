// A small fixed pool of worker threads for data-parallel loops (the update
// of one large tensor split into chunks).
//
// ParallelFor may be called from several threads at once (one per server
// connection): each call is a job that idle workers help with, and the
// calling thread always works on its own job too, so a call finishes even
// when every worker is busy elsewhere. Nothing here throws after Start().
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "tensorspark/status.h"

namespace tensorspark {

class ThreadPool {
 public:
  ThreadPool() = default;
  ~ThreadPool();  // joins the workers; no ParallelFor may be running
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Starts `parallelism - 1` workers: with the calling thread, that many
  // threads share each ParallelFor. Call once, before any ParallelFor.
  [[nodiscard]] Status Start(size_t parallelism);

  // Threads that work on one ParallelFor (workers + the caller), >= 1.
  size_t parallelism() const { return workers_.size() + 1; }

  // Runs fn(i) for every i in [0, n), each exactly once, on the workers and
  // the calling thread; returns when all calls returned. fn must not throw.
  // Writes made by fn are visible to the caller afterwards.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn);

 private:
  struct Job {
    const std::function<void(size_t)>* fn;
    size_t n;
    std::atomic<size_t> next{0};  // next index to claim
    size_t finished = 0;          // indices done; guarded by mu_
    size_t helpers = 0;           // workers inside RunJob; guarded by mu_
  };

  // Claims and runs indices of `job` until none are left; returns how many.
  static size_t RunJob(Job* job);
  void WorkerLoop();

  std::vector<std::thread> workers_;
  std::mutex mu_;                    // guards queue_, stop_ and the Job counters
  std::condition_variable work_cv_;  // queue_ gained a job, or stop_
  std::condition_variable done_cv_;  // a job's counters changed
  std::deque<Job*> queue_;           // jobs with indices possibly left to claim
  bool stop_ = false;
};

}  // namespace tensorspark
