"""Early stopping: the best key wins, ties go to the earlier check, patience counts checks since the best."""
from retrain.stopping import EarlyStopping


def test_accuracy_decides_and_a_lower_loss_breaks_ties():
    stop = EarlyStopping(patience=2)
    assert stop.improved((0.90, -0.5))
    assert stop.improved((0.90, -0.4))  # same accuracy, lower loss
    assert not stop.improved((0.90, -0.4))  # a tie is no improvement: the earlier weights stay
    assert not stop.improved((0.85, -0.1)) and stop.should_stop and stop.best == (0.90, -0.4)


def test_no_patience_never_stops_and_state_resumes():
    stop = EarlyStopping(patience=None)
    for key in [(0.5,), (0.4,), (0.3,), (0.2,)]:
        stop.improved(key)
    assert not stop.should_stop and stop.stale == 3
    resumed = EarlyStopping(3, best=stop.best, stale=stop.stale)  # as a checkpoint restores it
    assert resumed.should_stop and not resumed.improved((0.5,)) and resumed.improved((0.6,))
