// Background planner thread. Jobs are planned in submission order on one std::thread that
// never touches Python; results are collected with WaitNext() (the bindings call it with the
// GIL released from a Python waiter thread).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "planner/placement.h"

namespace eplb {

struct PlanJob {
  uint64_t id = 0;
  std::vector<double> load;          // [L, E]
  std::vector<int64_t> old_phy2log;  // [L, P] or empty
  Shape shape;
  PlanOptions options;
};

struct PlanDone {
  uint64_t id = 0;
  bool started = false;  // not done: the job just started (reported before its outcome)
  bool ok = false;
  bool cancelled = false;
  PlanResult result;  // valid when ok
  std::string error;  // invalid_argument message, or "internal: ..." for anything else
  bool invalid_argument = false;
};

class Worker {
 public:
  Worker();
  ~Worker();  // Close() then join
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Queues a job; returns its id. Throws std::runtime_error once closed.
  uint64_t Submit(PlanJob job);
  // Removes a queued job that has not started; it is reported by WaitNext as cancelled.
  bool Cancel(uint64_t id);
  // Blocks until a job starts (done->started) or finishes; false once closed and every job
  // was reported. Each job's start, if it starts, comes before its outcome.
  bool WaitNext(PlanDone* done);
  // Stops taking jobs; queued jobs are reported as cancelled; the running one finishes.
  void Close();
  // Joins the thread (after Close). Idempotent.
  void Join();

 private:
  void Run();

  std::mutex mu_;
  std::condition_variable cv_jobs_;
  std::condition_variable cv_done_;
  std::deque<PlanJob> queue_;
  std::deque<PlanDone> done_;
  uint64_t next_id_ = 1;
  bool closed_ = false;
  bool running_ = false;
  std::thread thread_;
};

}  // namespace eplb
