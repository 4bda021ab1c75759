"""tuned.py: a finished fine-tuning run cached under its training identity, and nothing else read back."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from retrain.metrics import FinetuneRecord
from retrain.tuned import TUNED_KEPT, TunedRun, load_tuned, save_tuned, scores_path, tuned_path


def tiny_run(seed: int = 0) -> TunedRun:
    rng = np.random.default_rng(seed)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    layers = [(rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))]
    x = {"validation": (rng.normal(size=(5, 4)).astype(np.float32), np.arange(5) % 3),
         "test": (rng.normal(size=(2, 4)).astype(np.float32), np.array([0, 2]))}
    return TunedRun(helper.make_model(graph), layers, x, FinetuneRecord(1, [{"epoch": 0}, {"epoch": 1}], "cpu", 160))


def test_round_trip(tmp_path):
    run, identity = tiny_run(), {"dataset_fingerprint": "abc", "settings": {"epochs": 6}}
    path = tuned_path(tmp_path, identity)
    save_tuned(path, run, identity)
    back = load_tuned(path, identity)
    assert back is not None and back.record == run.record
    assert onnx.helper.printable_graph(back.extractor.graph) == onnx.helper.printable_graph(run.extractor.graph)
    np.testing.assert_array_equal(back.layers[0][0], run.layers[0][0])
    for split in ("validation", "test"):
        np.testing.assert_array_equal(back.x[split][0], run.x[split][0])
        np.testing.assert_array_equal(back.x[split][1], run.x[split][1])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging folder left behind


def test_another_identity_or_a_damaged_entry_reads_as_none(tmp_path):
    identity = {"dataset_fingerprint": "abc"}
    path = tuned_path(tmp_path, identity)
    assert load_tuned(path, identity) is None  # nothing cached yet
    save_tuned(path, tiny_run(), identity)
    other = {"dataset_fingerprint": "abd"}
    assert tuned_path(tmp_path, other) != path
    assert load_tuned(path, other) is None  # same folder, another run's record
    (path / "network.onnx").write_bytes(b"\x00garbage")
    assert load_tuned(path, identity) is None
    save_tuned(path, tiny_run(), identity)
    for damage in (b"", b"not a zip"):
        (path / "arrays.npz").write_bytes(damage)
        assert load_tuned(path, identity) is None
    (path / "record.json").write_text("{not json")
    assert load_tuned(path, identity) is None


def test_an_unwritable_cache_is_not_an_error(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    save_tuned(tuned_path(blocker, {"a": 1}), tiny_run(), {"a": 1})  # fine-tuning's result must not be lost to it
    assert blocker.read_text().startswith("a file")


def test_a_backbone_comparison_round_trips_with_its_winners_head_and_logits(tmp_path):
    from retrain.head import HeadResult
    from retrain.metrics import BackboneScore
    from retrain.tuned import Winner, load_scores, save_scores, scores_path

    scores = [BackboneScore("lite0", 40, 54), BackboneScore("lite1", 43, 54)]
    head = HeadResult(tiny_run().layers, [{"step": 100, "validation_accuracy": 0.5}], 100, 400)
    held_out = np.random.default_rng(0).normal(size=(54, 3)).astype(np.float32)
    y = np.arange(54) % 3
    path = scores_path(tmp_path, {"run": 1})
    save_scores(path, scores, {"run": 1}, Winner("lite1", head, held_out, y))
    back, winner = load_scores(path, {"run": 1})
    assert back == scores and winner.backbone == "lite1"
    assert (winner.head.history, winner.head.best_step, winner.head.steps_run) == (head.history, 100, 400)
    np.testing.assert_array_equal(winner.head.layers[0][0], head.layers[0][0])
    np.testing.assert_array_equal(winner.head.layers[0][1], head.layers[0][1])
    np.testing.assert_array_equal(winner.held_out, held_out)
    assert winner.held_out_fits(y, 3) and not winner.held_out_fits(y[:-1], 3) and not winner.held_out_fits(y, 4)
    assert not winner.held_out_fits(np.roll(y, 1), 3)  # the rows of other photos, or in another order
    held_out[0, 0] = np.nan
    assert not Winner("lite1", head, held_out, y).held_out_fits(y, 3)
    assert not Winner("lite1", head, held_out.astype(np.float64), y).held_out_fits(y, 3)
    # A comparison stored before the logits were kept: its head still counts, the logits are computed again.
    save_scores(path, scores, {"run": 1}, Winner("lite1", head))
    _, winner = load_scores(path, {"run": 1})
    assert winner.held_out is None and not winner.held_out_fits(y, 3) and winner.head.best_step == 100


def test_a_damaged_or_foreign_backbone_comparison_is_not_reused(tmp_path):
    from retrain.head import HeadResult
    from retrain.metrics import BackboneScore
    from retrain.tuned import Winner, load_scores, save_scores, scores_path

    scores = [BackboneScore("lite0", 40, 54), BackboneScore("lite1", 43, 54)]
    path, other = scores_path(tmp_path, {"run": 1}), scores_path(tmp_path, {"run": 2})
    save_scores(path, scores, {"run": 1}, Winner("lite1", HeadResult(tiny_run(1).layers)))
    save_scores(other, scores, {"run": 2}, Winner("lite1", HeadResult(tiny_run(2).layers)))
    assert load_scores(path, {"run": 2}) is None
    heads = {p.name: p for p in tmp_path.rglob("*.head.npz")}
    ours, theirs = (heads[p.name.replace(".json", ".head.npz")] for p in (path, other))
    # The counts still stand where the head beside them is not the one they name; the head is trained again.
    for damage in (b"", b"damaged", theirs.read_bytes()):  # empty, not a zip, another run's head
        ours.write_bytes(damage)
        assert load_scores(path, {"run": 1}) == (scores, None)
    record = json.loads(path.read_text(encoding="utf-8"))
    for head in ("a string", [1, 2], None, {"backbone": "lite1"}):
        path.write_text(json.dumps(record | {"head": head}), encoding="utf-8")
        assert load_scores(path, {"run": 1}) == (scores, None)
    path.write_text('{"identity": {"run": 1}, "scores": [{"name": "lite0"}]}', encoding="utf-8")
    assert load_scores(path, {"run": 1}) is None
    path.write_text("not json", encoding="utf-8")
    assert load_scores(path, {"run": 1}) is None


def test_only_the_most_recently_used_runs_are_kept(tmp_path):
    identities = [{"dataset_fingerprint": str(i)} for i in range(TUNED_KEPT)]
    for i, identity in enumerate(identities):
        save_tuned(tuned_path(tmp_path, identity), tiny_run(i), identity)
        os.utime(tuned_path(tmp_path, identity), (1000 + i, 1000 + i))  # saved one after another
    scores_path(tmp_path, identities[1]).write_text("{}")  # a comparison's counts: small, not counted among the runs
    assert len(list((tmp_path / "tuned").iterdir())) == TUNED_KEPT + 1
    assert load_tuned(tuned_path(tmp_path, identities[0]), identities[0]) is not None  # used again: now the newest
    save_tuned(tuned_path(tmp_path, {"dataset_fingerprint": "new"}), tiny_run(), {"dataset_fingerprint": "new"})
    kept = {p.name for p in (tmp_path / "tuned").iterdir() if p.is_dir()}
    assert len(kept) == TUNED_KEPT
    assert tuned_path(tmp_path, identities[0]).name in kept and tuned_path(tmp_path, identities[1]).name not in kept
    assert scores_path(tmp_path, identities[1]).exists()
