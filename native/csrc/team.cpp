#include "team.h"

#include <pthread.h>

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

void pin_worker(const Team &team, int tid) {
    thread_local int pinned_cpu = -1;
    if (team.cpus.empty()) return;
    const int cpu = team.cpus[(size_t)tid % team.cpus.size()];
    if (cpu == pinned_cpu) return;
    set_affinity(cpu);
    pinned_cpu = cpu;
}

}  // namespace fdn
