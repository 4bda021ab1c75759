"""plan.py: what the default (anytime) run decides before spending its time budget, and why."""
from __future__ import annotations

from dataclasses import replace

import pytest

from retrain.backbones import get_backbone
from retrain.errors import UserError
from retrain.config import AUTO_BUDGET_SECONDS, Augment, FinetuneConfig, HeadConfig, TrainConfig
from retrain.plan import (CPU_IMAGES_PER_SECOND, GENTLE_RATES, MIN_VALIDATION, NEAR_PERFECT, Mode, check_settings_apply,
                         estimated_seconds, plan_training)


@pytest.fixture(scope="module")
def lite0():
    return get_backbone("lite0")


def cpu(**kw) -> TrainConfig:
    return TrainConfig(finetune=FinetuneConfig(device="cpu"), **kw)


def test_the_default_run_is_anytime_and_fine_tunes_where_a_gain_can_show(lite0):
    assert TrainConfig().mode == "auto"
    plan = plan_training(cpu(), lite0, 1000, (0.9, 200))
    assert plan.mode is Mode.FINETUNE and plan.anytime and plan.live
    assert plan.time_budget == AUTO_BUDGET_SECONDS
    assert "head: 90.0% (N=200, 95% CI 85-94%) on validation" in plan.reason and "Ctrl-C keeps the best model" in plan.reason


def test_too_few_validation_photos_to_see_a_gain_keeps_the_head(lite0):
    plan = plan_training(cpu(), lite0, 1000, (0.8, MIN_VALIDATION - 1))
    assert plan.mode is Mode.HEAD and not plan.live
    assert f"{MIN_VALIDATION - 1} validation photos are too few" in plan.reason


def test_a_near_perfect_head_keeps_the_head(lite0):
    plan = plan_training(cpu(), lite0, 1000, (NEAR_PERFECT, 500))
    assert plan.mode is Mode.HEAD and "already 99.0% (N=500, 95% CI 97-100%) right on validation" in plan.reason


def test_the_budget_bounds_the_epochs(lite0):
    epoch_seconds = 3000 / CPU_IMAGES_PER_SECOND
    plan = plan_training(cpu(time_budget=2.5 * epoch_seconds), lite0, 3000, (0.9, 300))
    assert plan.mode is Mode.FINETUNE and plan.epochs == 2
    plan = plan_training(cpu(time_budget=0.5 * epoch_seconds), lite0, 3000, (0.9, 300))
    assert plan.mode is Mode.HEAD and "over the" in plan.reason and "--time_budget" in plan.reason


def test_what_the_trainer_runs_is_resolved_in_the_plan(lite0):
    cfg = cpu(time_budget=3600)
    plan = plan_training(cfg, lite0, 200, (0.9, 60))
    assert (plan.device, plan.epochs, plan.batch_size, plan.train_size) == ("cpu", 6, 32, 160)
    assert plan.settings(cfg.finetune).batch_size == 32 and "batch 32, 160 px" in plan.describe()
    with pytest.raises(UserError, match="unknown mode"):
        TrainConfig(mode="fast")


def test_explicit_modes_are_not_second_guessed(lite0):
    assert plan_training(cpu(mode="head"), lite0, 1000, (0.5, 500)).mode is Mode.HEAD
    tuned = plan_training(cpu(mode="finetune"), lite0, 1000, (0.999, 10))
    assert tuned.mode is Mode.FINETUNE and not tuned.anytime


def test_a_schedule_cut_to_two_epochs_or_fewer_trains_at_gentler_rates(lite0):
    epoch_seconds = 3000 / CPU_IMAGES_PER_SECOND
    short = plan_training(cpu(time_budget=2.5 * epoch_seconds), lite0, 3000, (0.9, 300))
    assert short.epochs == 2 and short.rates == GENTLE_RATES and "gentler learning rates" in short.reason
    tuned = short.settings(FinetuneConfig(device="cpu"))
    assert (tuned.learning_rate, tuned.backbone_lr_ratio) == (GENTLE_RATES["learning_rate"],
                                                              GENTLE_RATES["backbone_lr_ratio"])
    full = plan_training(cpu(), lite0, 1000, (0.9, 300))
    assert full.epochs == FinetuneConfig().epochs and full.rates is None
    assert full.settings(FinetuneConfig()).learning_rate == FinetuneConfig().learning_rate
    by_hand = TrainConfig(time_budget=2.5 * epoch_seconds, finetune=FinetuneConfig(device="cpu", learning_rate=5e-3))
    assert plan_training(by_hand, lite0, 3000, (0.9, 300)).rates is None  # a rate set by hand is kept
    # A full schedule carries the same rates for the case a slower machine cuts it short at run time.
    assert short.rates_if_cut is None and plan_training(by_hand, lite0, 1000, (0.9, 300)).rates_if_cut is None
    gentle = full.rates_if_cut
    assert (gentle.epochs, gentle.learning_rate, gentle.backbone_lr_ratio) == (
        2, GENTLE_RATES["learning_rate"], GENTLE_RATES["backbone_lr_ratio"])


def test_a_small_folder_lets_the_lite_sizes_compete_instead_of_fine_tuning(lite0):
    plan = plan_training(cpu(), lite0, 220, (0.95, 24), n_photos=400)
    assert plan.mode is Mode.HEAD and plan.backbone_candidates == ("lite0", "lite1", "lite2")
    assert "compete by 5-fold cross-validated accuracy on the 244 training and validation photos" in plan.reason


def test_a_backbone_asked_for_by_name_never_competes(lite0):
    plan = plan_training(cpu(backbone="lite0"), lite0, 220, (0.95, 24), n_photos=400)
    assert plan.mode is Mode.HEAD and plan.backbone_candidates == ()
    assert "compete" not in plan.reason


def test_backbones_do_not_compete_past_the_budget(lite0):
    plan = plan_training(cpu(time_budget=5.0), lite0, 220, (0.95, 24), n_photos=400)
    assert plan.backbone_candidates == () and "over the budget of 5 s" in plan.reason


def test_a_budget_too_short_for_one_epoch_says_both_durations_as_they_are(lite0):
    plan = plan_training(cpu(time_budget=0.6), lite0, 54, (0.8, 54), n_photos=120)  # --time_budget 0.01 (minutes)
    assert not plan.live and "~2 s, over the budget of 0.6 s" in plan.reason


def test_the_plan_survives_a_json_round_trip_unchanged(lite0):
    # A cached fine-tuning is found by comparing the stored plan with this one: a tuple that comes back
    # as a list made every rerun fine-tune again.
    import json

    for plan in (plan_training(cpu(), lite0, 220, (0.95, 24), n_photos=400), plan_training(cpu(), lite0, 1000, (0.9, 200))):
        assert json.loads(json.dumps(plan.to_dict())) == plan.to_dict()


def test_if_the_head_stays_after_fine_tuning_the_lite_sizes_compete_within_the_budget(lite0):
    plan = plan_training(cpu(), lite0, 1000, (0.9, 200), n_photos=1400)
    assert plan.mode is Mode.FINETUNE and plan.backbone_candidates == ("lite0", "lite1", "lite2")
    assert "if the head stays, lite0, lite1, lite2 heads compete" in plan.reason
    assert plan.time_budget < AUTO_BUDGET_SECONDS  # the comparison's share is kept out of fine-tuning's


def test_no_comparison_after_fine_tuning_when_it_would_overrun_or_a_backbone_is_named(lite0):
    epoch_seconds = 1000 / CPU_IMAGES_PER_SECOND
    tight = plan_training(cpu(time_budget=2.5 * epoch_seconds), lite0, 1000, (0.9, 200), n_photos=1400)
    named = plan_training(cpu(backbone="lite0"), lite0, 1000, (0.9, 200), n_photos=1400)
    for plan in (tight, named):
        assert plan.mode is Mode.FINETUNE and plan.backbone_candidates == () and "compete" not in plan.reason
    assert named.time_budget == AUTO_BUDGET_SECONDS


def test_the_estimate_follows_the_plan_the_run_will_make():
    fast = TrainConfig(mode="head")
    small = [12, 12, 12]  # 3 validation photos: no fine-tuning; the Lite sizes compete instead
    seconds_head, plan = estimated_seconds(fast, small)
    assert plan.mode is Mode.HEAD and seconds_head > 0
    seconds_auto, plan = estimated_seconds(TrainConfig(), small)
    assert plan.mode is Mode.HEAD and plan.backbone_candidates and "too few" in plan.reason
    assert seconds_head < seconds_auto < seconds_head + 60  # the comparison's extraction, not a fine-tuning budget
    big = [600] * 6  # 360 validation photos: fine-tuning within the budget
    seconds_big, plan = estimated_seconds(TrainConfig(), big)
    assert plan.mode is Mode.FINETUNE and plan.device == "cpu"
    assert estimated_seconds(fast, big)[0] + AUTO_BUDGET_SECONDS * 0.5 < seconds_big
    assert seconds_big <= estimated_seconds(fast, big)[0] + AUTO_BUDGET_SECONDS + 60  # within the budget, startup aside


@pytest.mark.parametrize("config, named", [
    (TrainConfig(mode="head", finetune=FinetuneConfig(epochs=3)), "--epochs (epochs)"),
    (TrainConfig(mode="head", finetune=FinetuneConfig(device="cpu", unfreeze=2)), "--unfreeze (unfreeze), --device"),
    (TrainConfig(mode="head", resume=True), "--resume (resume)"),
])
def test_settings_a_head_run_never_reads_are_refused_by_the_api(config, named):
    with pytest.raises(UserError, match="only for training on live images") as refused:
        check_settings_apply(config)
    assert named in str(refused.value)


def test_head_settings_are_refused_for_a_scratch_backbone_which_trains_no_head():
    # What an auditor met: six head flags accepted with scratch-small and the two models bit-identical.
    config = TrainConfig(backbone="scratch-small", head=HeadConfig(learning_rate=0.5, steps=10, hidden_units=64))
    with pytest.raises(UserError, match="which a scratch backbone") as refused:
        check_settings_apply(config)
    for named in ("--how_many_training_steps (steps)", "--learning_rate (learning_rate)", "--hidden_units"):
        assert named in str(refused.value)
    check_settings_apply(TrainConfig(backbone="scratch-small", head=HeadConfig(seed=3)))  # the seed seeds more
    check_settings_apply(TrainConfig(head=HeadConfig(learning_rate=0.5)))  # a pretrained backbone's head reads it


def test_settings_that_are_read_pass():
    check_settings_apply(TrainConfig(mode="finetune", finetune=FinetuneConfig(epochs=3)))
    check_settings_apply(TrainConfig(mode="head", backbone="scratch-small", finetune=FinetuneConfig(epochs=3)))
    check_settings_apply(TrainConfig(time_budget=60.0))
    check_settings_apply(TrainConfig(mode="head", backbone="scratch-small", time_budget=60.0))
    for unread in (TrainConfig(mode="finetune", time_budget=60.0),
                   TrainConfig(time_budget=60.0, finetune=FinetuneConfig(augment=Augment(size=160)))):
        with pytest.raises(UserError, match="time_budget .* applies to --mode auto without distortion flags"):
            check_settings_apply(unread)


def test_fine_tuning_settings_the_default_does_not_use_are_named():
    config = TrainConfig(finetune=FinetuneConfig(epochs=5, unfreeze=2))
    plan = plan_training(config, get_backbone("lite0"), 20, (0.9, 4), 30)  # 4 validation photos: no fine-tuning
    assert not plan.live and plan.unused == ("--epochs (epochs)", "--unfreeze (unfreeze)")
    assert plan.describe().endswith("; not fine-tuning, so --epochs (epochs), --unfreeze (unfreeze) go unused")
    assert plan_training(TrainConfig(), get_backbone("lite0"), 20, (0.9, 4), 30).unused == ()
    assert plan_training(config, get_backbone("lite0"), 2000, (0.8, 300), 2600).live  # they are read here


def test_resume_and_a_budget_the_default_does_not_spend_are_named():
    lite0 = get_backbone("lite0")
    asked = TrainConfig(backbone="lite0", resume=True, time_budget=300.0)
    assert plan_training(asked, lite0, 20, (0.9, 4), 30).unused == ("--resume (resume)", "--time_budget (time_budget)")
    near_perfect = plan_training(asked, lite0, 2000, (1.0, 300), 2600)
    assert not near_perfect.live and "--time_budget (time_budget)" in near_perfect.unused
    # With the default backbone the Lite sizes compete on a small folder: the budget bounds that comparison.
    compared = plan_training(replace(asked, backbone="auto"), lite0, 20, (0.9, 4), 30)
    assert compared.backbone_candidates and compared.unused == ("--resume (resume)",)


def test_a_gpu_asked_for_where_there_is_none_is_refused_before_any_work():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    for config in (TrainConfig(finetune=FinetuneConfig(device="cuda")),
                   TrainConfig(backbone="scratch-small", scratch=FinetuneConfig(device="cuda"))):
        with pytest.raises(UserError, match="no CUDA GPU"):
            check_settings_apply(config)
    check_settings_apply(TrainConfig(finetune=FinetuneConfig(device="cpu")))
