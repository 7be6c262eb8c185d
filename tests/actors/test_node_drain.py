"""retire_nodes: a draining KV node leaves only when the live nodes left could take what it holds."""
from __future__ import annotations

from types import SimpleNamespace

from fastdecode.actors.guarded_node import GuardedNode, NodeState
from fastdecode.actors.node_drain import retire_nodes
from fastdecode.scheduler import Scheduler, SchedulerConfig
from scheduler_helpers import PAGE, node


def guarded(name: str) -> GuardedNode:
    return GuardedNode(SimpleNamespace(node_id=name, is_host=True, can_attend_now=False), epoch=1)


def placed(sched: Scheduler, seq_ids) -> list[int | None]:
    return [sched.sequence(seq_id).node_id for seq_id in seq_ids]


def cluster(capacities: list[int], num_seqs: int) -> tuple[Scheduler, list[GuardedNode]]:
    """Nodes of these capacities (tokens) and ``num_seqs`` running sequences of 2 pages each (16 + 16 tokens)."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=64, admission="all-at-once", max_reserved_output=None),
                      [node(i, capacity) for i, capacity in enumerate(capacities)])
    for seq_id in range(num_seqs):
        sched.add_request(seq_id, PAGE, PAGE)
    assert len(sched.schedule().admitted) == num_seqs
    return sched, [guarded(f"n{i}") for i in range(len(capacities))]


def test_a_draining_node_is_kept_while_the_live_one_is_full_and_leaves_once_it_has_room():
    sched, nodes = cluster([1024, 8 * PAGE], num_seqs=8)  # node 1 holds 4 sequences of 2 pages: full
    on_node = {i: [s for s in range(8) if sched.sequence(s).node_id == i] for i in (0, 1)}
    assert len(on_node[1]) == 4 and len(on_node[0]) == 4
    nodes[0].mark(NodeState.DRAINING, "SIGTERM")

    assert retire_nodes(nodes, sched, placed(sched, range(8))) == []
    assert nodes[0].is_kept and not nodes[0].is_retired  # node 1 could take none of its 4 sequences

    for seq_id in on_node[1][:3]:  # room for 3 of the 4: still all or nothing
        sched.on_finished(seq_id)
    assert retire_nodes(nodes, sched, placed(sched, on_node[0] + on_node[1][3:])) == []
    assert nodes[0].is_kept

    sched.on_finished(on_node[1][3])  # room for all 4 now
    assert retire_nodes(nodes, sched, placed(sched, on_node[0])) == [0]
    assert nodes[0].is_retired and not nodes[0].is_kept


def test_a_draining_node_leaves_at_once_when_the_live_one_has_room():
    sched, nodes = cluster([1024, 1024], num_seqs=8)
    nodes[1].mark(NodeState.DRAINING, "SIGTERM")
    assert retire_nodes(nodes, sched, placed(sched, range(8))) == [1]
    assert nodes[1].is_retired and not nodes[1].is_kept


def test_a_draining_node_is_kept_when_the_room_left_goes_to_a_dead_nodes_sequences():
    sched, nodes = cluster([4 * PAGE] * 3, num_seqs=6)  # 2 sequences of 2 pages on each node: all full
    on_node = {i: [s for s in range(6) if sched.sequence(s).node_id == i] for i in range(3)}
    assert [len(seq_ids) for seq_ids in on_node.values()] == [2, 2, 2]
    for seq_id in on_node[1]:  # node 1 has room for 2 sequences: the dead node's, or the draining one's
        sched.on_finished(seq_id)
    nodes[0].mark(NodeState.DRAINING, "SIGTERM")
    nodes[2].mark(NodeState.DEAD, "no heartbeat answer")
    assert retire_nodes(nodes, sched, placed(sched, on_node[0] + on_node[2])) == [2]
    assert nodes[0].is_kept and not nodes[0].is_retired
    assert nodes[2].is_retired


def test_a_draining_node_with_no_live_node_left_is_kept_even_empty():
    sched, nodes = cluster([1024, 1024], num_seqs=0)
    nodes[0].mark(NodeState.DRAINING, "SIGTERM")
    nodes[1].mark(NodeState.DEAD, "no heartbeat answer")
    assert retire_nodes(nodes, sched, []) == [1]
    assert nodes[0].is_kept
