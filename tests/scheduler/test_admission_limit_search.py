"""SLS admission under the context limit: ``num_to_admit`` against the straightforward search it replaced (every
candidate count from the rate's ``num`` down, the peak recomputed over all items each time), and the peak it
computes only when a cheaper lower bound cannot rule the candidates out."""
import copy
import math
import random
from fastdecode.scheduler import admission
from fastdecode.scheduler.admission import AdmissionPolicy
from fastdecode.scheduler.config import SchedulerConfig
from scheduler_helpers import Seq


def brute_force_peak(items):
    """Total context at every step until the last item leaves (each grows a token a step, leaves after its steps)."""
    return max((sum(c + step for c, n in items if n > step) for step in range(max((n for _, n in items), default=0))),
               default=0)


def reference_num_to_admit(policy, running, waiting):
    """The search as it was: (result, the rate's num before the context limit); updates the policy's credit."""
    config = policy.config
    num_slots = max(0, config.max_num_seqs - len(running))
    num_candidates = min(num_slots, len(waiting))
    group = policy.group_size
    if not running:
        policy._credit = max(policy._credit, float(group))
    else:
        policy._credit = min(policy._credit + policy.rate_per_step, policy._credit_cap())
    if len(running) + len(waiting) <= config.sls_free_load * config.max_num_seqs:
        num = num_candidates
    else:
        num = min(num_candidates, group * math.floor(policy._credit / group))
    paced = num
    num_resumed = next((i for i, s in enumerate(waiting[:num_candidates]) if s.num_generated == 0), num_candidates)
    limit = policy.context_limit
    if num == 0 or limit is None:
        return max(num, num_resumed), paced
    live = [(s.context_len, policy.expected_remaining(s)) for s in running]
    while num > 0:
        items = live + [(s.context_len, policy.expected_remaining(s)) for s in waiting[:num]]
        allowed = limit
        if config.max_total_context is None:
            longest = max(c + n - 1 for c, n in items)
            allowed = max(limit, longest + limit * (config.max_num_seqs - 1) / config.max_num_seqs)
        if brute_force_peak(items) <= allowed:
            break
        num -= 1
    if num == 0 and not running:
        num = 1
    return max(num, num_resumed), paced


def random_seq(rng, is_running):
    prompt_len = rng.randint(1000, 3000) if rng.random() < 0.05 else rng.randint(1, 200)  # now and then a long one
    max_tokens = rng.randint(1, 120)
    num_generated = 0
    if is_running or rng.random() < 0.1:  # running, or resumed after a preemption
        num_generated = rng.randint(0, max_tokens - 1) if is_running else rng.randint(1, max_tokens)
    return Seq(prompt_len, max_tokens, num_generated)


def random_case(rng):
    batch = rng.choice([4, 8, 16, 48])
    running = [random_seq(rng, True) for _ in range(rng.randint(0, batch))]
    waiting = [random_seq(rng, False) for _ in range(rng.randint(1, 3 * batch))]
    waiting.sort(key=lambda s: s.num_generated == 0)  # the resumed ones at the head, as the scheduler queues them
    # an explicit limit about the live peak (so that it binds part of the time), or the derived one
    live_total = sum(s.context_len + s.max_tokens - s.num_generated for s in running)
    max_total_context = rng.choice([None, max(1, int(live_total * rng.uniform(0.5, 1.3)) + rng.randint(0, 400))])
    config = SchedulerConfig(max_num_seqs=batch, sls_min_group_size=rng.choice([1, 2, 3]),
                             sls_free_load=rng.choice([0.0, 0.5]), sls_load_headroom=rng.choice([0.0, 0.1]),
                             max_total_context=max_total_context)
    policy = AdmissionPolicy(config)
    for seq in running + waiting:
        policy.on_arrival(seq.prompt_len, seq.max_tokens)
    for _ in range(rng.randint(0, 3)):  # early finishes lower the expected remaining steps
        max_tokens = rng.randint(1, 120)
        policy.on_finish(rng.randint(1, max_tokens), max_tokens)
    policy._credit = rng.uniform(0.0, policy._credit_cap())
    return policy, running, waiting


def test_num_to_admit_matches_the_straightforward_search():
    rng = random.Random(20240517)
    outcomes = {"blocked": 0, "binds": 0, "fits": 0}
    for _ in range(1500):
        policy, running, waiting = random_case(rng)
        reference = copy.deepcopy(policy)
        for _ in range(3):  # consecutive steps: the credit carries over
            expected, paced = reference_num_to_admit(reference, running, waiting)
            assert policy.num_to_admit(running, waiting) == expected
            assert policy._credit == reference._credit
            if paced > 0 and policy.context_limit is not None:
                outcomes["blocked" if expected == 0 else "binds" if expected < paced else "fits"] += 1
    # each way the limit can end the search is exercised, the binding one after several candidates were taken out
    assert min(outcomes.values()) >= 50, outcomes


def test_a_blocked_queue_head_computes_the_peak_once_not_once_per_candidate(monkeypatch):
    """At B=256 with 248 running and a rate that allows 8, the limit holds the head back: the peak of the running
    sequences with the first 8 waiting ones is computed once, and the lower bound it gives rules out 7 down to 1."""
    rng = random.Random(7)
    running = [Seq(rng.randint(100, 400), 64, num_generated=rng.randint(0, 63)) for _ in range(248)]
    live_peak, _ = admission.predicted_peak_and_step([(s.context_len, s.max_tokens - s.num_generated) for s in running])
    calls = []
    peak_and_step = admission.predicted_peak_and_step

    def counted(items, horizon=None):
        calls.append(len(items))
        return peak_and_step(items, horizon)

    monkeypatch.setattr(admission, "predicted_peak_and_step", counted)
    policy = AdmissionPolicy(SchedulerConfig(max_num_seqs=256, max_total_context=live_peak + 50))
    waiting = [Seq(300, 64) for _ in range(20)]
    for seq in running + waiting:
        policy.on_arrival(seq.prompt_len, seq.max_tokens)
    policy._credit = policy._credit_cap()
    assert policy.group_size * math.floor(policy._credit / policy.group_size) == 8  # the rate alone would admit 8
    assert policy.num_to_admit(running, waiting) == 0
    assert calls == [248 + 8]


def test_predicted_peak_and_step_gives_the_step_the_total_peaks_at():
    rng = random.Random(3)
    for _ in range(300):
        items = [(rng.randint(0, 500), rng.randint(1, 40)) for _ in range(rng.randint(1, 12))]
        peak, step = admission.predicted_peak_and_step(items)
        assert peak == brute_force_peak(items)
        assert sum(c + step for c, n in items if n > step) == peak  # what the search's lower bound relies on
