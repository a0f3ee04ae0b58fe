"""railtower.heap: a settled heap is out of the cycle collector's walks, and what a swap
leaves behind is still collected at the next settle."""

from __future__ import annotations

import gc
import weakref

import pytest

from railtower.heap import settle_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> _Node:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return a


@pytest.fixture(autouse=True)
def _thawed():
    yield
    gc.unfreeze()  # the rest of the suite runs with an ordinary collector


def test_a_model_loaded_before_the_settle_is_never_walked_again():
    model = [_Node() for _ in range(1000)]  # stands for a loaded bundle's objects
    settle_heap("test")
    assert gc.get_freeze_count() >= len(model)
    walked = {id(o) for o in gc.get_objects()}  # every generation the collector walks
    assert not walked & {id(node) for node in model}
    later = _Node()  # what a request allocates is still collected as usual
    assert any(o is later for o in gc.get_objects())


def test_garbage_cycles_go_at_the_settle_and_a_swapped_out_models_cycles_at_the_next():
    garbage = weakref.ref(_cycle())  # unreachable already when the model loads
    served = [_cycle()]  # the model being served, frozen with the heap
    settle_heap("first model")
    assert garbage() is None
    old_model = weakref.ref(served[0])
    served.clear()  # swapped out: only its own cycle keeps it alive now
    gc.collect()
    assert old_model() is not None  # frozen: an ordinary collection leaves it alone
    settle_heap("second model")
    assert old_model() is None


def test_reference_counting_still_frees_frozen_objects_at_once():
    holder = [_Node()]
    ref = weakref.ref(holder[0])
    settle_heap("test")
    holder.clear()
    assert ref() is None


def test_every_collector_pause_is_counted_and_exposed_on_the_metrics():
    from prometheus_client import generate_latest

    from railtower.heap import gc_pauses
    from serving.metrics import Metrics

    pauses = gc_pauses()
    assert gc_pauses() is pauses  # one hook per process, however many apps
    before = pauses.count[2]
    gc.collect(2)
    gc.collect(2)
    assert pauses.count[2] == before + 2
    assert pauses.longest[2] > 0 and pauses.seconds[2] >= pauses.longest[2]
    text = generate_latest(Metrics().registry).decode()
    assert f'railtower_gc_pauses_total{{generation="2"}} {float(pauses.count[2])}' in text
    assert 'railtower_gc_pause_longest_seconds{generation="2"}' in text


def test_collector_held_blocks_nest_and_collect_the_cycles_they_left_when_the_last_ends():
    from railtower.heap import collector_held

    assert gc.isenabled()
    with collector_held():
        assert not gc.isenabled()
        ref = weakref.ref(_cycle())  # a cycle the batch drops: only the collector frees it
        with collector_held():  # nested (another thread's batch, say)
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still holds it
        for _ in range(2000):
            _cycle()  # far past the young generation's threshold: no automatic run
        assert ref() is not None
    assert gc.isenabled()
    assert ref() is None  # the young collection at the end of the last block took it


def test_collector_held_turns_the_collector_back_on_after_an_error():
    from railtower.heap import collector_held

    with pytest.raises(RuntimeError), collector_held():
        raise RuntimeError("the batch failed")
    assert gc.isenabled()


def test_collector_held_leaves_a_collector_that_was_off_off():
    from railtower.heap import collector_held

    gc.disable()
    try:
        with collector_held():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
