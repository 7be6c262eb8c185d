import pytest

from fastdecode.scheduler.admission import AdmissionPolicy, predicted_peak_and_step
from fastdecode.scheduler.config import SchedulerConfig
from scheduler_helpers import Seq


def drive(policy, waiting, num_steps):
    """Admit, then give every running sequence a token, for ``num_steps`` steps; returns per-step history."""
    running, history = [], []
    for _ in range(num_steps):
        num = policy.num_to_admit(running, waiting)
        policy.on_admitted(waiting[:num])
        running += waiting[:num]
        del waiting[:num]
        history.append((num, len(running), sum(s.context_len for s in running)))
        for seq in running:
            seq.num_generated += 1
        for seq in [s for s in running if s.is_done]:
            running.remove(seq)
            policy.on_finish(seq.num_generated, seq.max_tokens)
    return history


def make_policy(mode="sls", batch=64, **kwargs):
    return AdmissionPolicy(SchedulerConfig(max_num_seqs=batch, admission=mode, **kwargs))


def arrivals(policy, count, prompt=32, max_tokens=256, stop_at=None):
    seqs = [Seq(prompt, max_tokens, stop_at=stop_at) for _ in range(count)]
    for seq in seqs:
        policy.on_arrival(seq.prompt_len, seq.max_tokens)
    return seqs


def test_sls_ramps_up_at_the_steady_rate_instead_of_all_at_once():
    policy = make_policy()
    waiting = arrivals(policy, 1000)
    assert policy.rate_per_step == pytest.approx(64 / 256)
    assert policy.group_size == 1 and policy.steps_between_groups == pytest.approx(4.0)
    history = drive(policy, waiting, 1200)
    counts = [running for _, running, _ in history]
    assert history[0][0] == 1  # cold start: the first group at once
    assert counts[127] == pytest.approx(32, abs=2)  # half way up the ramp
    assert counts[255] == pytest.approx(64, abs=2)
    assert max(counts) <= 64
    assert max(num for num, _, _ in history) <= 2  # never a burst


def test_all_at_once_fills_every_slot_and_its_context_peaks():
    aao = make_policy("all-at-once")
    history_aao = drive(aao, arrivals(aao, 1000), 1200)
    assert history_aao[0][:2] == (64, 64)
    sls = make_policy()
    history_sls = drive(sls, arrivals(sls, 1000), 1200)
    peak_aao = max(ctx for _, _, ctx in history_aao)
    peak_sls = max(ctx for _, _, ctx in history_sls)
    assert peak_aao == pytest.approx(64 * (32 + 256), rel=0.01)
    # SLS steady state: B sequences with ages spread over the output length: B * (P + O/2), flat.
    steady = [ctx for _, _, ctx in history_sls[400:1200]]
    target = 64 * (32 + 128)
    assert max(steady) <= 1.05 * target and min(steady) >= 0.95 * target
    assert peak_sls <= 0.6 * peak_aao


def test_early_finishes_replan_the_rate_and_keep_the_batch_full():
    policy = make_policy()
    waiting = arrivals(policy, 3000, stop_at=128)  # everyone stops at half of max_tokens
    before = policy.rate_per_step
    history = drive(policy, waiting, 1500)
    assert policy.expected_output_len == pytest.approx(128, rel=0.05)
    assert policy.rate_per_step == pytest.approx(2 * before, rel=0.05)
    counts = [running for _, running, _ in history[800:]]
    assert min(counts) >= 60 and max(counts) <= 64
    # and the total context is flat at the new steady state B * (P + 128/2)
    contexts = [ctx for _, _, ctx in history[800:]]
    assert max(contexts) <= 1.1 * 64 * (32 + 64)


def test_the_first_early_finish_replans_at_once():
    policy = make_policy(batch=4, max_total_context=10**9)
    arrivals(policy, 10, prompt=8, max_tokens=400)
    assert policy.rate_per_step == pytest.approx(4 / 400)
    limit = make_policy(batch=4)
    arrivals(limit, 10, prompt=8, max_tokens=400)
    before = limit.context_limit
    for p in (policy, limit):
        p.on_finish(100, 400)  # EOS after a quarter of max_tokens
    assert policy.expected_output_len == pytest.approx(100)
    assert policy.rate_per_step == pytest.approx(4 / 100)
    assert limit.context_limit < before
    assert policy.expected_remaining(Seq(8, 400, num_generated=30)) == 70
    policy.on_finish(400, 400)  # a full-length one pulls the estimate back up
    assert policy.expected_output_len == pytest.approx(250)


def test_context_limit_holds_admission_back():
    policy = make_policy(batch=64, max_total_context=2000)
    waiting = arrivals(policy, 100, prompt=100, max_tokens=100)
    history = drive(policy, waiting, 300)
    contexts = [ctx for _, _, ctx in history]
    assert max(contexts) <= 2000
    assert max(contexts) >= 1700  # the limit, not something else, is what holds it
    assert max(running for _, running, _ in history) < 20


def test_an_idle_system_admits_a_prompt_larger_than_the_limit():
    policy = make_policy(batch=8, max_total_context=100)
    waiting = arrivals(policy, 2, prompt=500, max_tokens=10)
    assert policy.num_to_admit([], waiting) == 1


def test_a_lightly_loaded_server_starts_every_request_at_once():
    policy = make_policy(batch=256)
    waiting = arrivals(policy, 10, prompt=20, max_tokens=8162)  # chat requests that give no max_tokens
    assert policy.rate_per_step < 0.05  # paced, the tenth would start some 300 steps late
    assert policy.num_to_admit([], waiting) == 10
    running = arrivals(policy, 118, prompt=20, max_tokens=8162)
    assert policy.num_to_admit(running, waiting) == 10  # 128 of 256: still half the batch
    assert policy.num_to_admit(running, waiting + arrivals(policy, 5)) <= 1  # past half: paced again


def test_the_context_limit_holds_a_lightly_loaded_server_back_too():
    policy = make_policy(batch=64, max_total_context=2000)
    waiting = arrivals(policy, 10, prompt=500, max_tokens=100)
    assert policy.num_to_admit([], waiting) == 3  # 3 x 600 tokens fit under 2000, 4 do not


def test_one_long_request_neither_waits_for_the_batch_to_empty_nor_holds_it_down():
    """SLS at B=16 on short chat requests (200-token prompts, 128 out) that keep the batch near full; one 7,800-token
    prompt arrives. It starts within a few steps, and while it runs the short ones keep the batch near full (the
    derived limit made no room for it: it waited for the batch to empty, then ran with one or two beside it)."""
    policy = make_policy(batch=16)
    running = arrivals(policy, 13, prompt=200, max_tokens=128)
    for age, seq in enumerate(running):
        seq.num_generated = age * 9
    long = Seq(7800, 300)
    policy.on_arrival(long.prompt_len, long.max_tokens)
    waiting = [long]
    started, sizes = None, []
    for step in range(400):
        waiting += arrivals(policy, 1 if step % 10 == 0 else 0, prompt=200, max_tokens=128)  # 0.8 of the rate
        num = policy.num_to_admit(running, waiting)
        if long in waiting[:num]:
            started = step
        policy.on_admitted(waiting[:num])
        running += waiting[:num]
        del waiting[:num]
        if long in running and long.num_generated > 20:
            sizes.append(len(running))
        for seq in running:
            seq.num_generated += 1
        for seq in [s for s in running if s.is_done]:
            running.remove(seq)
            policy.on_finish(seq.num_generated, seq.max_tokens)
    assert started is not None and started <= 16
    assert min(sizes) >= 10 and len(sizes) > 200
    assert len(waiting) <= 4


def test_a_given_context_limit_stays_a_hard_one():
    policy = make_policy(batch=16, max_total_context=3000)
    running = arrivals(policy, 4, prompt=200, max_tokens=100)
    waiting = arrivals(policy, 1, prompt=2900, max_tokens=100)
    assert all(policy.num_to_admit(running, waiting) == 0 for _ in range(50))


def test_resumed_sequences_start_at_once_outside_the_rate():
    """Sequences requeued off a failed node (or preempted) come back as soon as there is room, not at the pacing rate,
    and do not use up the new arrivals' credit."""
    policy = make_policy(batch=64)
    running = arrivals(policy, 39, prompt=100, max_tokens=512)
    resumed = arrivals(policy, 25, prompt=100, max_tokens=512)
    for seq in resumed:
        seq.num_generated = 40
    fresh = arrivals(policy, 5, prompt=100, max_tokens=512)
    policy.num_to_admit(running, [])  # the rate's credit: under one sequence per step
    assert policy.num_to_admit(running, resumed + fresh) == 25
    assert policy.num_to_admit(running[:-3], fresh + resumed) <= 1  # only at the head: first come, first served


def test_max_num_seqs_bounds_both_modes():
    for mode in ("sls", "all-at-once"):
        policy = make_policy(mode, batch=3, sls_min_group_size=8, max_total_context=10**9)
        waiting = arrivals(policy, 20)
        assert policy.num_to_admit([], waiting) == 3
        assert policy.num_to_admit(waiting[:3], waiting[3:]) == 0


def predicted_peak_context(items, horizon=None) -> int:
    return predicted_peak_and_step(items, horizon)[0]


def test_predicted_peak_context():
    assert predicted_peak_context([]) == 0
    assert predicted_peak_context([(10, 1)]) == 10
    # one sequence of 10 tokens running 5 more steps peaks at 10 + 4
    assert predicted_peak_context([(10, 5)]) == 14
    # a long one and a short one: either both just before the short leaves, or the long one alone at its end
    assert predicted_peak_context([(100, 3), (10, 50)]) == max(100 + 2 + 10 + 2, 10 + 49)
    assert predicted_peak_context([(100, 3), (10, 200)]) == 10 + 199
    assert predicted_peak_context([(5, 2), (5, 2)]) == 12
    # over a short horizon only the next steps count
    assert predicted_peak_context([(100, 3), (10, 200)], horizon=1) == 101 + 11
    assert predicted_peak_context([(100, 3), (10, 200)], horizon=10) == 102 + 12


def test_config_validation():
    with pytest.raises(ValueError, match="admission"):
        SchedulerConfig(admission="greedy")
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="overcommit"):
        SchedulerConfig(overcommit=0.5)
    with pytest.raises(ValueError, match="sls_free_load"):
        SchedulerConfig(sls_free_load=1.5)
