import random

import pytest

from fastdecode.scheduler.node import NodeModel
from fastdecode.scheduler.perf_model import GpuPerfModel, ShardPerfModel
from fastdecode.scheduler.split import SplitItem, StepTimeModel, fresh_split, split_minibatches

LAYERS = 4


def nodes_of(speeds, unit=300e9):
    """Nodes fast enough that, for the batches here, attention and the GPU take comparable times."""
    return {
        i: NodeModel(i, 1 << 40, 4096 * LAYERS, LAYERS, 16, ShardPerfModel(20e-6, s * unit))
        for i, s in enumerate(speeds)
    }


def ideal_step_s(items, model):
    """Perfectly even halves: half the count, half of every node's context."""
    per_node = {}
    for it in items:
        per_node[it.node_id] = per_node.get(it.node_id, 0) + it.context_len
    g = model.dense_time(len(items) / 2) / LAYERS
    s = max(model.nodes[i].predict_attend_s(c / 2) for i, c in per_node.items())
    return LAYERS * 2 * max(g, s)


def gpu():
    return GpuPerfModel([(1, 2e-3), (64, 2e-3), (512, 6e-3)])


def halves(items, assignment):
    counts, context = [0, 0], [{}, {}]
    for it in items:
        h = assignment[it.seq_id]
        counts[h] += 1
        context[h][it.node_id] = context[h].get(it.node_id, 0) + it.context_len
    return counts, context


def random_items(count, num_nodes, seed=0):
    rng = random.Random(seed)
    return [SplitItem(i, rng.randrange(num_nodes), rng.randint(10, 3000)) for i in range(count)]


def test_cycle_time_formula():
    model = StepTimeModel(nodes_of([1.0], unit=10e9), LAYERS, lambda n: n * 1e-3)
    # g = n * 1e-3 / 4 layers; s = 20us + ctx * 4096 / 1e10
    counts, contexts = [4, 4], [{0: 0}, {0: 0}]
    assert model.cycle_s(counts, contexts) == pytest.approx(2 * 1e-3)  # the GPU does both halves
    contexts = [{0: 100_000}, {0: 100_000}]
    s = 20e-6 + 100_000 * 4096 / 1e10
    assert model.cycle_s(counts, contexts) == pytest.approx(2 * s)  # the node does both halves
    contexts = [{0: 100_000}, {0: 0}]
    assert model.cycle_s(counts, contexts) == pytest.approx(max(2e-3, 1e-3 + s))  # A waits for itself


def test_fresh_split_balances_each_node_and_the_counts():
    items = random_items(500, 3)
    assignment = fresh_split(items)
    counts, contexts = halves(items, assignment)
    assert abs(counts[0] - counts[1]) <= 3
    for node_id in range(3):
        a, b = contexts[0][node_id], contexts[1][node_id]
        assert abs(a - b) <= 3000  # within one sequence's context
    model = StepTimeModel(nodes_of([1, 2, 4]), LAYERS, gpu().predict)
    one_sided = {it.seq_id: 0 for it in items}
    assert model.step_s(items, assignment) < 0.8 * model.step_s(items, one_sided)
    assert model.step_s(items, assignment) <= 1.02 * ideal_step_s(items, model)


def test_split_keeps_sequences_in_place_and_places_newcomers_on_the_lighter_side():
    model = StepTimeModel(nodes_of([1, 1]), LAYERS, gpu().predict)
    items = random_items(200, 2, seed=1)
    first, first_s = split_minibatches(items, model, rebalance_threshold=0.02)
    assert first_s == pytest.approx(model.step_s(items, first))
    # next step: everyone grew by one token, two finished, three arrived
    grown = [SplitItem(it.seq_id, it.node_id, it.context_len + 1, first[it.seq_id]) for it in items[2:]]
    newcomers = [SplitItem(1000 + i, i % 2, 500) for i in range(3)]
    second, _ = split_minibatches(grown + newcomers, model, rebalance_threshold=0.02)
    assert all(second[it.seq_id] == first[it.seq_id] for it in grown)  # nobody moved
    assert model.step_s(grown + newcomers, second) <= 1.03 * ideal_step_s(grown + newcomers, model)


def test_split_rebalances_when_worth_it():
    model = StepTimeModel(nodes_of([1, 2]), LAYERS, gpu().predict)
    items = random_items(300, 2, seed=2)
    lopsided = [SplitItem(it.seq_id, it.node_id, it.context_len, 0) for it in items]
    assignment, step_s = split_minibatches(lopsided, model, rebalance_threshold=0.02)
    assert set(assignment.values()) == {0, 1}
    assert step_s < 0.8 * model.step_s(lopsided, {it.seq_id: 0 for it in items})
    assert step_s <= 1.02 * ideal_step_s(items, model)
    # a nearly balanced split is left alone
    kept, _ = split_minibatches(
        [SplitItem(it.seq_id, it.node_id, it.context_len, assignment[it.seq_id]) for it in items], model, 0.02
    )
    assert kept == assignment


def test_pipeline_forbids_the_single_minibatch_the_model_would_pick():
    """A weight-bound GPU and short contexts: the model prefers one mini-batch; with the
    pipeline asked for (is_single_allowed False) both mini-batches are filled, each node split."""
    model = StepTimeModel(nodes_of([1.0, 1.0], unit=1e13), LAYERS, gpu().predict)
    items = [SplitItem(i, i % 2, 16) for i in range(8)]
    chosen, _ = split_minibatches(items, model, 0.02)
    assert set(chosen.values()) == {0}  # the model's own choice: read the weights once
    forced, step_s = split_minibatches(items, model, 0.02, is_single_allowed=False)
    counts, context = halves(items, forced)
    assert counts == [4, 4] and context[0] == context[1]
    assert step_s == pytest.approx(model.step_s(items, forced))
