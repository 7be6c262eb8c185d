// The OpenMP thread team of a pool: explicit size and optional CPU pinning.
#ifndef FASTDECODE_TEAM_H
#define FASTDECODE_TEAM_H

#include <sched.h>
#include <stdint.h>

#include <vector>

namespace fdn {

struct Team {
    int num_threads = 1;
    std::vector<int> cpus;   // empty: no pinning
};

// Pins the calling thread to team.cpus[0] for its lifetime and restores its old affinity afterwards:
// the caller (a Python thread) is OpenMP thread 0 of every parallel region.
class CallerPin {
public:
    explicit CallerPin(const Team &team);
    ~CallerPin();
    CallerPin(const CallerPin &) = delete;
    CallerPin &operator=(const CallerPin &) = delete;

private:
    bool is_pinned_ = false;
    cpu_set_t saved_;
};

// Called by OpenMP thread tid > 0 at the start of a parallel region: pins it to cpus[tid % n]
// (a no-op when it is already there or the team has no CPU list).
void pin_worker(const Team &team, int tid);

// FD_OK, or FD_EINVAL with the error set: a thread count outside [1, 4096], or a CPU list with a CPU this
// process may not run on (sched_getaffinity; pinning a thread there would fail, and the thread would run
// wherever the OS puts it). Checked when a pool or buffer is made, before anything is allocated.
int32_t check_team_args(int32_t num_threads, const int32_t *cpu_list, int32_t num_cpus);

}  // namespace fdn
#endif
