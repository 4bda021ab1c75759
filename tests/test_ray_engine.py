"""--engine ray (issue #8, past one machine): a two-node Ray cluster on this machine gives exactly the
features, failures and prediction rows of the local path, writes them into the same feature store
(a local rerun extracts nothing), and a missing Ray is one clear line. The Ray tests skip where Ray
is not installed (`make test` installs it: pip install -e '.[test,ray]').
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrain
import retrain.runtime as runtime_mod
from retrain.api import TrainConfig
from retrain.backbones import get_backbone
from retrain.cli import retrain_main
from retrain.engine import RayEngine
from retrain.errors import UserError
from retrain.features import compute_features, feature_matrix, store_folder
from retrain.graphs import extractor_path
from retrain.store import STORE_FILE
from retrain.head import HeadConfig
from retrain.prediction import load, predict_to_file
from retrain.scan import scan_dataset

from conftest import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"
BATCH = 4  # small batches: the 50 images make several Ray chunks (8 batches each), so order is tested


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on this machine (two raylets, so two worker pools); shut down after."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' (make test installs it)")
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    try:
        nodes.wait_for_nodes()
        yield nodes.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """48 generated photos in 3 classes plus two unreadable files."""
    root = make_dataset(tmp_path_factory.mktemp("ray") / "shapes")
    (root / "squares" / "notes.jpg").write_text("<html>not an image</html>")
    (root / "circles" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The benchmark's 2-convolution ONNX CNN: a backbone that costs nothing to run."""
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.tiny_backbone(tmp_path_factory.mktemp("tiny") / "tiny_cnn.onnx", size=32)


def decoded_on_rerun(monkeypatch) -> list[str]:
    """Names of the files later runs decode (spied on in this process: the local engine)."""
    seen: list[str] = []
    real = runtime_mod.decoded_batches
    monkeypatch.setattr(runtime_mod, "decoded_batches",
                        lambda paths, *a, **k: seen.extend(p.name for p in paths) or real(paths, *a, **k))
    return seen


UNREADABLE = ["empty.png", "notes.jpg"]  # never cached, so every run retries them (local runs too)


def test_features_match_local_bit_for_bit_and_a_local_rerun_extracts_nothing(cluster, data, tiny, tmp_path,
                                                                             monkeypatch):
    samples, backbone = scan_dataset(data, quiet=True).samples, get_backbone(str(tiny))
    def features(cache: Path, engine=None):
        return compute_features(samples, backbone, extractor_path(backbone, cache), store_folder(cache),
                                batch_size=BATCH, quiet=True, engine=engine)
    local, local_failures = features(tmp_path / "local")
    with RayEngine(cluster) as engine:
        remote, remote_failures = features(tmp_path / "ray", engine)
    assert remote_failures == local_failures and len(local_failures) == 2
    assert sorted(remote) == sorted(local) and len(local) == 48
    usable = samples[local.covers(samples)]
    assert np.array_equal(feature_matrix(usable, remote, backbone.feature_dim)[0],
                          feature_matrix(usable, local, backbone.feature_dim)[0])
    # Same records in the same order: the driver appends what the workers computed, as a local run does.
    store = Path("features") / backbone.identity / STORE_FILE
    assert (tmp_path / "ray" / store).read_bytes() == (tmp_path / "local" / store).read_bytes()

    seen = decoded_on_rerun(monkeypatch)
    again, _ = features(tmp_path / "ray")
    assert sorted(seen) == UNREADABLE
    assert np.array_equal(feature_matrix(usable, again, backbone.feature_dim)[0],
                          feature_matrix(usable, local, backbone.feature_dim)[0])


def _config(tiny: Path, cache: Path, **engine) -> TrainConfig:
    return TrainConfig(backbone=str(tiny), cache_dir=str(cache), quiet=True, batch_size=BATCH,
                       head=HeadConfig(steps=60), **engine)


def test_train_with_the_ray_engine_reports_skipped_files_and_leaves_the_cache_for_local_runs(
        cluster, data, tiny, tmp_path, monkeypatch):
    on_ray = retrain.train(data, _config(tiny, tmp_path / "cache", engine="ray", ray_address=cluster))
    local = retrain.train(data, _config(tiny, tmp_path / "local-cache"))
    assert on_ray.metrics.skipped_files == local.metrics.skipped_files
    assert {Path(item.path).name for item in local.metrics.skipped_files} == {"notes.jpg", "empty.png"}
    assert on_ray.metrics.test_accuracy == local.metrics.test_accuracy

    seen = decoded_on_rerun(monkeypatch)
    rerun = retrain.train(data, _config(tiny, tmp_path / "cache"))
    assert sorted(seen) == UNREADABLE
    assert rerun.metrics.skipped_files == local.metrics.skipped_files


@pytest.fixture(scope="module")
def model_dir(data, tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    retrain.train(data, _config(tiny, tmp_path_factory.mktemp("cache"))).save(out, report=False)
    return out


def test_predictions_match_local_row_for_row(cluster, data, model_dir, tmp_path, capsys):
    with RayEngine(cluster) as engine:
        summary = predict_to_file(load(model_dir, engine=engine), [data], tmp_path / "ray.csv", top_k=2,
                                  batch_size=BATCH)
        on_ray = [p.to_dict() for p in load(model_dir, engine=engine).predict_paths(sorted(data.rglob("*.*")),
                                                                                     batch_size=BATCH)]
    predict_to_file(load(model_dir), [data], tmp_path / "local.csv", top_k=2, batch_size=BATCH)
    assert (tmp_path / "ray.csv").read_text() == (tmp_path / "local.csv").read_text()
    assert (summary.rows, summary.failures) == (50, 2)
    local = [p.to_dict() for p in load(model_dir).predict_paths(sorted(data.rglob("*.*")), batch_size=BATCH)]
    assert on_ray == local and sum("error" in row for row in local) == 2

    # The command line: --engine ray --ray_address, JSON Lines on stdout, the same as a local run's.
    def cli_rows(*flags: str) -> list[dict]:
        assert retrain_main(["predict", str(model_dir), str(data), "--json", *flags]) == 1  # 1: unreadable files
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert cli_rows("--engine", "ray", "--ray_address", cluster) == cli_rows()


def test_engine_ray_without_ray_installed_is_one_clear_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an absent package looks like to import machinery
    code = retrain_main(["train", str(data), "--output", str(tmp_path / "m"), "--engine", "ray", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--engine ray needs Ray" in err and "pip install 'retrain[ray]'" in err
    with pytest.raises(UserError, match="applies to --engine ray only"):
        TrainConfig(ray_address="127.0.0.1:6379")


def test_the_local_path_never_imports_ray():
    code = ("import sys, retrain.api, retrain.cli, retrain.engine, retrain.prediction; "
            "from retrain.engine import open_engine\n"
            "with open_engine('local') as engine: assert engine is None\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
