"""ExecutorConfig's checks at construction."""
import pytest

from fastdecode.actors.executor_config import ExecutorConfig


@pytest.mark.parametrize("max_queue", [0, -1, True, 2.5])
def test_a_queue_that_could_hold_no_request_is_refused(max_queue):
    """Every request waits in the queue before it runs: --max-queue 0 would answer every request 429 forever."""
    with pytest.raises(ValueError, match="max_queue must be a positive integer"):
        ExecutorConfig(max_queue=max_queue)
