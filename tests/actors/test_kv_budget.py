import pytest

from fastdecode.actors.kv_budget import KVBudget


def make(total=(40, 40), page=(4, 4), layers=2):
    return KVBudget(total_pages=list(total), page_sizes=list(page), num_layers=layers)


def test_pages_round_up_per_layer():
    b = make()
    assert b.pages_for(0, 1) == 2
    assert b.pages_for(0, 4) == 2
    assert b.pages_for(0, 5) == 4


def test_hold_grow_release_accounting():
    b = make()
    b.hold(0, seq_id=7, num_tokens=4)
    assert b.used_pages == [2, 0]
    b.hold(0, seq_id=7, num_tokens=9)  # grew to 3 pages per layer
    assert b.used_pages == [6, 0]
    b.release(7)
    assert b.used_pages == [0, 0]
    with pytest.raises(KeyError):
        b.release(7)


def test_can_hold_respects_free_pages():
    b = make(total=(8, 8))
    b.hold(0, 1, 12)  # 3 pages x 2 layers
    assert b.free_pages(0) == 2
    assert b.can_hold(0, 4)
    assert not b.can_hold(0, 5)


def test_overflowing_node_predicts_next_step():
    b = make(total=(4, 100))
    b.hold(0, 1, 4)
    b.hold(0, 2, 4)  # node 0 full: 2 seqs x 1 page x 2 layers
    assert b.overflowing_node({1: 4, 2: 4}) is None
    assert b.overflowing_node({1: 5, 2: 4}) == 0  # seq 1 crosses into a new page
    b.hold(1, 3, 50)
    assert b.overflowing_node({1: 4, 2: 4, 3: 51}) is None


def test_mismatched_lengths_refused():
    with pytest.raises(ValueError):
        KVBudget(total_pages=[1, 2], page_sizes=[1], num_layers=1)
