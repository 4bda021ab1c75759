"""lr-find: the learning-rate sweep on features, its plot, and the command on a generated folder."""
from __future__ import annotations

import os

import numpy as np
import pytest

from retrain.cli import retrain_main
from retrain.head import HeadConfig
from retrain.lrfind import lr_sweep, plot_sweep

from conftest import make_dataset
from test_head import _blobs


def test_lr_sweep_suggests_a_rate_where_the_loss_falls(tmp_path):
    x, y = _blobs(n=400, d=50, seed=2, spread=1.0)
    sweep = lr_sweep(x, y, 3, HeadConfig(), steps=150)
    assert 1e-5 <= sweep.suggestion <= 1.0
    assert sweep.losses[-1] > sweep.losses.min() or len(sweep.losses) == 150
    at = int(np.searchsorted(sweep.rates, sweep.suggestion))
    assert sweep.losses[min(at + 10, len(sweep.losses) - 1)] < sweep.losses[max(at - 10, 0)]  # falling there
    assert plot_sweep(sweep, tmp_path / "lr.png").stat().st_size > 5000


def test_lr_find_command(shapes_data, cache_dir, tmp_path, capsys):
    assert retrain_main(["lr-find", str(shapes_data), "--plot", str(tmp_path / "lr.png"), "--quiet",
                         "--cache_dir", str(cache_dir)]) == 0
    out, err = capsys.readouterr()
    assert "Suggested --learning_rate" in out and (tmp_path / "lr.png").exists()
    # 16 photos a class, some held out: too few for the sweep's curve to mean much, and it says so.
    assert "in the smallest class (fewer than 20): its loss curve is noise as much as signal" in err


def test_a_sweep_on_enough_photos_carries_no_caveat(cache_dir, tmp_path, capsys):
    data = make_dataset(tmp_path / "photos", per_class=30)
    assert retrain_main(["lr-find", str(data), "--plot", str(tmp_path / "lr.png"), "--quiet",
                         "--cache_dir", str(cache_dir)]) == 0
    out, err = capsys.readouterr()
    assert "Suggested --learning_rate" in out and "noise as much as signal" not in err


def test_the_plot_path_printed_is_the_file_written_and_a_folder_or_photo_folder_is_refused(shapes_data, cache_dir,
                                                                                            tmp_path, capsys):
    args = ["--quiet", "--cache_dir", str(cache_dir)]
    assert retrain_main(["lr-find", str(shapes_data), "--plot", str(tmp_path / "curve"), *args]) == 0
    assert f"(loss curve: {tmp_path / 'curve.png'})" in capsys.readouterr().out and (tmp_path / "curve.png").exists()
    for plot, message in ((tmp_path / "folder.png", "is a folder: give a file name, e.g."),
                          (shapes_data / "circles" / "lr.png", "is inside the image folder")):
        if plot.suffix and plot.parent == tmp_path:
            plot.mkdir()
        assert retrain_main(["lr-find", str(shapes_data), "--plot", str(plot), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (shapes_data / "circles" / "lr.png").exists()  # a class folder: the next scan would read it


def test_the_default_plot_may_sit_at_the_top_of_the_photo_folder(cache_dir, tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "photos", per_class=4)
    monkeypatch.chdir(data)  # `cd photos && retrain lr-find .`: only class folders are scanned, not this file
    assert retrain_main(["lr-find", ".", "--quiet", "--cache_dir", str(cache_dir)]) == 0
    assert (data / "lr_find.png").is_file() and "Suggested --learning_rate" in capsys.readouterr().out


def test_a_plot_path_that_would_lose_a_file_or_fail_after_the_sweep_is_refused_before_it(shapes_data, cache_dir,
                                                                                        tmp_path, capsys, monkeypatch):
    import retrain.lrfind as lrfind

    monkeypatch.setattr(lrfind, "lr_sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    mine = tmp_path / "holiday.png"
    mine.write_bytes(b"\x89PNG not a loss curve")
    os.mkfifo(tmp_path / "pipe")
    for plot, message in ((mine, "already exists and is not a loss curve retrain drew"),
                          (tmp_path / "curve.xyz", "give a name ending in .png"),
                          (tmp_path / "pipe", "is a named pipe, not a regular file"),
                          (tmp_path, "is a folder"), ("/", "is a folder")):
        assert retrain_main(["lr-find", str(shapes_data), "--plot", str(plot), "--cache_dir", str(cache_dir)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert mine.read_bytes() == b"\x89PNG not a loss curve" and not (tmp_path / "pipe.png").exists()


def test_an_earlier_loss_curve_is_replaced(shapes_data, cache_dir, tmp_path, capsys):
    args = ["lr-find", str(shapes_data), "--plot", str(tmp_path / "lr.png"), "--quiet", "--cache_dir", str(cache_dir)]
    assert retrain_main(args) == 0 and retrain_main(args) == 0
