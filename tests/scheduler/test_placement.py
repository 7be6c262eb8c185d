import random

import pytest

from fastdecode.scheduler.node import NodeModel
from fastdecode.scheduler.perf_model import ShardPerfModel
from fastdecode.scheduler.placement import NodeLoad, can_ever_fit, choose_node

KV_PER_TOKEN = 32 * 1024  # 8 layers x 4 KiB
LAYERS = 8
PAGE = 16


def make_node(node_id, speed, capacity_tokens, overhead_s=50e-6):
    return NodeModel(
        node_id=node_id,
        capacity_bytes=capacity_tokens * KV_PER_TOKEN,
        kv_bytes_per_token=KV_PER_TOKEN,
        num_layers=LAYERS,
        page_size=PAGE,
        perf=ShardPerfModel(overhead_s, speed * 10e9),
    )


def place_all(nodes, lengths, overcommit=1.0):
    """Place (prompt, final) sequences one by one, as the scheduler does; returns loads and who waits."""
    loads = {n.node_id: NodeLoad(n) for n in nodes}
    placed, waiting = [], []
    for prompt, final in lengths:
        node_id = choose_node(loads.values(), prompt, final, overcommit=overcommit)
        if node_id is None:
            waiting.append((prompt, final))
            continue
        node, load = loads[node_id].node, loads[node_id]
        loads[node_id] = NodeLoad(
            node,
            load.num_used_pages + node.pages_for(prompt + 1),
            load.num_committed_pages + node.pages_for(final),
            load.num_final_tokens + final,
        )
        placed.append((node_id, prompt, final))
    return loads, placed, waiting


def random_lengths(count, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        prompt = rng.randint(16, 512)
        out.append((prompt, prompt + rng.randint(16, 1024)))
    return out


def test_shards_of_speed_1_2_4_end_with_equal_predicted_attend_times():
    nodes = [make_node(0, 1.0, 10**7), make_node(1, 2.0, 10**7), make_node(2, 4.0, 10**7)]
    loads, placed, waiting = place_all(nodes, random_lengths(500))
    assert not waiting and len(placed) == 500
    times = [load.predicted_attend_s() for load in loads.values()]
    assert max(times) <= 1.10 * min(times), times
    counts = [sum(1 for node_id, _, _ in placed if node_id == i) for i in range(3)]
    assert counts[0] < counts[1] < counts[2]  # the faster, the more sequences
    tokens = [load.num_final_tokens for load in loads.values()]
    assert tokens[2] / tokens[0] == pytest.approx(4.0, rel=0.1)


def test_memory_limits_are_never_exceeded_and_the_rest_waits():
    # The fast shard is small: once full, sequences go elsewhere or wait.
    nodes = [make_node(0, 1.0, 60_000), make_node(1, 2.0, 40_000), make_node(2, 4.0, 20_000)]
    loads, placed, waiting = place_all(nodes, random_lengths(500, seed=3))
    assert waiting, "the cluster cannot hold 500 sequences: some must wait"
    for load in loads.values():
        assert load.num_committed_pages <= load.node.num_pages
        assert load.num_used_pages <= load.node.num_pages
    by_node = {i: sum(-(-final // PAGE) for node_id, _, final in placed if node_id == i) for i in range(3)}
    assert by_node == {i: loads[i].num_committed_pages for i in range(3)}
    # The fast node filled up first, and is nearly full.
    assert loads[2].num_committed_pages > 0.9 * loads[2].node.num_pages


def test_overcommit_allows_more_final_pages_but_not_more_current_pages():
    node = make_node(0, 1.0, 64 * PAGE)  # 64 pages
    load = NodeLoad(node, num_used_pages=10, num_committed_pages=60)
    assert not load.has_room(32, 32 + 160)  # 12 more final pages: 72 > 64
    assert load.has_room(32, 32 + 160, overcommit=1.2)  # 72 <= 76.8
    full_now = NodeLoad(node, num_used_pages=63, num_committed_pages=63)
    assert not full_now.has_room(32, 64, overcommit=4.0)  # the prompt itself does not fit now


def test_overcommit_is_used_only_where_no_node_has_real_room():
    """A fast small node and a slow big one, overcommit 4: sequences go to the fast node while it has real room,
    then to the big one; overcommitting starts only once neither has (the fast node used to take four times its
    memory, and preempt, while the big one stood nearly empty)."""
    fast, big = make_node(0, 4.0, 4_000), make_node(1, 1.0, 40_000)
    loads, placed, waiting = place_all([fast, big], [(100, 900)] * 40, overcommit=4.0)
    assert not waiting
    assert loads[0].num_committed_pages <= loads[0].node.num_pages  # the fast node is not overcommitted
    assert sum(1 for node_id, _, _ in placed if node_id == 1) == 40 - 4  # the rest went where there was room
    loads, placed, waiting = place_all([fast, big], [(100, 900)] * 60, overcommit=4.0)
    assert not waiting and sum(1 for node_id, _, _ in placed if node_id == 1) == 43  # big is full: 2500 // 57 pages
    assert loads[0].num_committed_pages > loads[0].node.num_pages  # only then is the fast one overcommitted


def test_pages_round_up_and_ties_go_to_the_lower_id():
    a, b = make_node(3, 1.0, 10_000), make_node(1, 1.0, 10_000)
    assert a.pages_for(0) == 0 and a.pages_for(1) == 1 and a.pages_for(16) == 1 and a.pages_for(17) == 2
    assert choose_node([NodeLoad(a), NodeLoad(b)], 10, 20) == 1
    assert choose_node([], 10, 20) is None
    with pytest.raises(ValueError, match="exceed"):
        choose_node([NodeLoad(a)], 20, 20)
    assert can_ever_fit([a, b], 10_000) and not can_ever_fit([a, b], 10_001)


def test_node_model_validates():
    with pytest.raises(ValueError, match="page_size"):
        NodeModel(0, 1 << 20, KV_PER_TOKEN, LAYERS, 0, ShardPerfModel(0.0, 1e9))
    with pytest.raises(ValueError, match="predict"):
        NodeModel(0, 1 << 20, KV_PER_TOKEN, LAYERS, 16, perf=object())
    node = make_node(0, 1.0, 100)
    assert node.read_bytes(10) == 10 * KV_PER_TOKEN / LAYERS
    assert node.predict_attend_s(0) == 0.0
