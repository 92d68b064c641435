"""Placement is a pure function of a snapshot and a request: table tests, no servers."""

import pytest

from services.router.placement import ExecutorView, rank

DEVICE, HOST, DISK = 1, 2, 3


def view(addr, healthy=True, running=0, waiting=0, batch=8, **adapters):
    return ExecutorView(addr, healthy, running, waiting, batch,
                        {k.replace("_", "/"): v for k, v in adapters.items()})


@pytest.mark.parametrize("snapshot, adapter, first", [
    # the adapter is resident on b: go there even though b is a little busier
    ([view("a"), view("b", running=4, org_x=DEVICE)], "org/x", "b"),
    # b holds it but is swamped (3 full batches queued): spill to idle a
    ([view("a"), view("b", running=8, waiting=16, org_x=DEVICE)], "org/x", "a"),
    # device beats host beats disk at equal load
    ([view("a", org_x=DISK), view("b", org_x=DEVICE), view("c", org_x=HOST)], "org/x", "b"),
    ([view("a", org_x=DISK), view("c", org_x=HOST)], "org/x", "c"),
    # base-only: least loaded
    ([view("a", running=5), view("b", running=1), view("c", running=3)], "", "b"),
    # unhealthy executors are never first while a healthy one exists
    ([view("a", healthy=False, org_x=DEVICE), view("b", running=7)], "org/x", "b"),
])
def test_rank_first_choice(snapshot, adapter, first):
    assert rank(snapshot, adapter)[0] == first


def test_rank_lists_every_executor_unhealthy_last():
    order = rank([view("a", healthy=False), view("b"), view("c")], "x")
    assert sorted(order[:2]) == ["b", "c"] and order[2] == "a"


def test_an_unplaced_adapter_sticks_to_one_executor():
    snapshot = [view(f"e{i}") for i in range(4)]
    firsts = {rank(snapshot, "org/x")[0] for _ in range(10)}
    assert len(firsts) == 1
    spread = {rank(snapshot, f"adapter-{i}")[0] for i in range(64)}
    assert len(spread) == 4   # different adapters land on different executors


def test_empty_snapshot():
    assert rank([], "x") == []
