#include "team.h"

#include <pthread.h>

#include "pool.h"

namespace fdn {

static void set_affinity(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

CallerPin::CallerPin(const Team &team) {
    if (team.cpus.empty()) return;
    if (pthread_getaffinity_np(pthread_self(), sizeof(saved_), &saved_) != 0) return;
    is_pinned_ = true;
    set_affinity(team.cpus[0]);
}

CallerPin::~CallerPin() {
    if (is_pinned_) pthread_setaffinity_np(pthread_self(), sizeof(saved_), &saved_);
}

int32_t check_team_args(int32_t num_threads, const int32_t *cpu_list, int32_t num_cpus) {
    if (num_threads < 1 || num_threads > 4096) return set_error("num_threads must be in [1, 4096]"), FD_EINVAL;
    if (num_cpus < 0 || (num_cpus > 0 && !cpu_list)) return set_error("bad cpu list"), FD_EINVAL;
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    const bool is_known = num_cpus == 0 || sched_getaffinity(0, sizeof(allowed), &allowed) == 0;
    for (int i = 0; i < num_cpus; ++i) {
        if (cpu_list[i] < 0 || cpu_list[i] >= CPU_SETSIZE) return set_error("bad cpu %d", cpu_list[i]), FD_EINVAL;
        if (is_known && !CPU_ISSET(cpu_list[i], &allowed))
            return set_error("cpu %d is not in this process's CPU set (os.sched_getaffinity)", cpu_list[i]), FD_EINVAL;
    }
    return FD_OK;
}

void pin_worker(const Team &team, int tid) {
    thread_local int pinned_cpu = -1;
    if (team.cpus.empty()) return;
    const int cpu = team.cpus[(size_t)tid % team.cpus.size()];
    if (cpu == pinned_cpu) return;
    set_affinity(cpu);
    pinned_cpu = cpu;
}

}  // namespace fdn
