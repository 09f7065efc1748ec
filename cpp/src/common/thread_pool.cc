#include "common/thread_pool.h"

#include <algorithm>
#include <string>
#include <system_error>

namespace tensorspark {

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

Status ThreadPool::Start(size_t parallelism) {
  const size_t want = std::max<size_t>(parallelism, 1) - 1;
  workers_.reserve(want);
  for (size_t i = 0; i < want; ++i) {
    try {
      workers_.emplace_back([this] { WorkerLoop(); });
    } catch (const std::system_error& e) {
      return Status(StatusCode::kInternal, "cannot start update thread " + std::to_string(i + 1) +
                                               " of " + std::to_string(want) + ": " + e.what() +
                                               "; lower update_threads");
    }
  }
  return Status::OK();
}

size_t ThreadPool::RunJob(Job* job) {
  size_t done = 0;
  for (size_t i = job->next.fetch_add(1, std::memory_order_relaxed); i < job->n;
       i = job->next.fetch_add(1, std::memory_order_relaxed)) {
    (*job->fn)(i);
    ++done;
  }
  return done;
}

void ThreadPool::WorkerLoop() {
  std::unique_lock lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and nothing left
    Job* job = queue_.front();
    // Counted before mu_ is released, so the job's owner waits for us.
    ++job->helpers;
    lock.unlock();
    const size_t done = RunJob(job);
    lock.lock();
    // Every index is claimed now: nobody else needs to pick the job up.
    if (auto it = std::find(queue_.begin(), queue_.end(), job); it != queue_.end()) {
      queue_.erase(it);
    }
    job->finished += done;
    --job->helpers;
    if (job->helpers == 0 && job->finished == job->n) done_cv_.notify_all();
  }
}

void ThreadPool::ParallelFor(size_t n, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  if (workers_.empty() || n == 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  Job job;
  job.fn = &fn;
  job.n = n;
  {
    std::lock_guard lock(mu_);
    queue_.push_back(&job);
  }
  // Wake only as many workers as there are indices beyond our own.
  if (n - 1 >= workers_.size()) {
    work_cv_.notify_all();
  } else {
    for (size_t i = 0; i + 1 < n; ++i) work_cv_.notify_one();
  }
  const size_t done = RunJob(&job);
  std::unique_lock lock(mu_);
  if (auto it = std::find(queue_.begin(), queue_.end(), &job); it != queue_.end()) {
    queue_.erase(it);
  }
  job.finished += done;
  // `job` lives on this stack frame: wait until no worker touches it.
  done_cv_.wait(lock, [&] { return job.helpers == 0 && job.finished == job.n; });
}

}  // namespace tensorspark
