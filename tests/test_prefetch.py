"""ordered_map: results in input order, never more than `ahead` items in flight; batched: runs by size."""
import threading
import time

from retrain.prefetch import batched, ordered_map


def test_results_come_in_input_order_whatever_finishes_first():
    def slow_for_small(x: int) -> int:
        time.sleep(0.002 * (10 - x))
        return x * x
    assert list(ordered_map(slow_for_small, range(10), workers=4, ahead=5)) == [x * x for x in range(10)]


def test_at_most_ahead_items_are_in_flight():
    lock, running, peak = threading.Lock(), [0], [0]

    def work(x: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.001)
        with lock:
            running[0] -= 1
        return x
    started = []
    items = (started.append(i) or i for i in range(200))  # counts what was taken from the input
    results = ordered_map(work, items, workers=8, ahead=6)
    assert next(results) == 0 and len(started) <= 6  # lazy: nothing beyond the window was taken
    assert list(results) == list(range(1, 200)) and peak[0] <= 6


def test_batched_cuts_runs_of_the_given_sizes():
    assert list(batched(iter(range(7)), [3, 3, 1])) == [[0, 1, 2], [3, 4, 5], [6]]
