#include "planner/worker.h"

#include <stdexcept>
#include <utility>

namespace eplb {

Worker::Worker() : thread_([this] { Run(); }) {}

Worker::~Worker() {
  Close();
  Join();
}

uint64_t Worker::Submit(PlanJob job) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) throw std::runtime_error("Planner is closed");
  job.id = next_id_++;
  const uint64_t id = job.id;
  queue_.push_back(std::move(job));
  cv_jobs_.notify_one();
  return id;
}

bool Worker::Cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = queue_.begin(); it != queue_.end(); ++it) {
    if (it->id == id) {
      PlanDone d;
      d.id = id;
      d.cancelled = true;
      queue_.erase(it);
      done_.push_back(std::move(d));
      cv_done_.notify_all();
      return true;
    }
  }
  return false;
}

bool Worker::WaitNext(PlanDone* out) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock,
                [this] { return !done_.empty() || (closed_ && queue_.empty() && !running_); });
  if (done_.empty()) return false;
  *out = std::move(done_.front());
  done_.pop_front();
  return true;
}

void Worker::Close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) return;
  closed_ = true;
  while (!queue_.empty()) {
    PlanDone d;
    d.id = queue_.front().id;
    d.cancelled = true;
    queue_.pop_front();
    done_.push_back(std::move(d));
  }
  cv_jobs_.notify_all();
  cv_done_.notify_all();
}

void Worker::Join() {
  if (thread_.joinable()) thread_.join();
}

void Worker::Run() {
  for (;;) {
    PlanJob job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_jobs_.wait(lock, [this] { return closed_ || !queue_.empty(); });
      if (queue_.empty()) {
        cv_done_.notify_all();
        return;
      }
      job = std::move(queue_.front());
      queue_.pop_front();
      running_ = true;
      PlanDone started;
      started.id = job.id;
      started.started = true;
      done_.push_back(std::move(started));
      cv_done_.notify_all();
    }
    PlanDone d;
    d.id = job.id;
    try {
      d.result = Plan(job.load.data(), job.old_phy2log.empty() ? nullptr : job.old_phy2log.data(),
                      job.shape, job.options);
      d.ok = true;
    } catch (const std::invalid_argument& e) {
      d.error = e.what();
      d.invalid_argument = true;
    } catch (const std::exception& e) {
      d.error = std::string("internal: ") + e.what();
    } catch (...) {  // (none is thrown today; one escaping this thread would end the process)
      d.error = "internal: an exception that is not a std::exception";
    }
    std::lock_guard<std::mutex> lock(mu_);
    running_ = false;
    done_.push_back(std::move(d));
    cv_done_.notify_all();
  }
}

}  // namespace eplb
