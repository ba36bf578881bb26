"""A study on the session's local Ray cluster: the learning-rate search chooses each model's
rate, the final trials train at it, and the console names models, not Tune's trials."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from raymoe import cli
from raymoe.study.run import run_study
from raymoe.study.spec import load_study

SMALL = ["model.seq_len=32", "model.d_model=32", "model.n_layer=2", "model.n_head=2",
         "train.global_batch=8", "train.micro_batch=8", "train.log_every=1", "train.eval_every=4",
         "train.eval_batches=1", "optim.warmup_tokens=256", "parallel.num_workers=1",
         "train.checkpoint_every=1000"]
TOKENS_PER_STEP = 8 * 32


def test_the_search_chooses_each_models_rate_and_its_trials_train_at_it(dataset, tmp_path, capsys):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "search", "storage": str(tmp_path / "runs"), "data": str(dataset),
        "tokens": 6 * TOKENS_PER_STEP, "seeds": [1], "overrides": SMALL,
        "lr_search": {"lrs": [1e-5, 3e-3], "tokens": 12 * TOKENS_PER_STEP},
        "models": [{"name": "dense", "config": "tiny"}, {"name": "moe", "config": "tiny-moe8"}]}))
    study = load_study(str(study_file))
    report = run_study(study)
    out = capsys.readouterr().out

    search = json.loads((tmp_path / "runs" / "search" / "lr_search.json").read_text())
    assert {(r["model"], r["lr"]) for r in search["trials"]} == {
        (m, lr) for m in ("dense", "moe") for lr in (1e-5, 3e-3)}
    for model in ("dense", "moe"):
        runs = [r for r in search["trials"] if r["model"] == model]
        assert all(r["tokens"] == 12 * TOKENS_PER_STEP and not r["stopped_early"] for r in runs), runs
        assert search["chosen"][model] == min(runs, key=lambda r: r["val_loss"])["lr"]
        # 12 steps at 1e-5 barely move the loss
        assert search["chosen"][model] == 3e-3
        manifests = sorted((tmp_path / "runs" / "search" / f"{model}-seed1").glob("step-*/manifest.json"))
        trained_at = json.loads(manifests[-1].read_text())["extra"]["config"]["optim"]["lr"]
        assert trained_at == search["chosen"][model]
        assert f"learning rate of {model}: 0.003 (validation loss after the search's runs: 1e-05: " in out
    assert [m.model for m in report.models if m.trials] == ["dense", "moe"]
    # a line per trial named by the study, none of Tune's status tables or trial ids
    for trial in ("dense-seed1", "moe-seed1", "search/dense-lr1e-05", "search/moe-lr0.003"):
        assert f"{trial} done in " in out, out
    for tune_line in ("Trial status", "_trial_", "Configuration for experiment", "View detailed results"):
        assert tune_line not in out, out

    # the report written again from storage alone is the same
    written = (tmp_path / "runs" / "search" / "report.md").read_text()
    assert cli.main(["compare", str(study_file), "--report-only"]) == 0
    assert (tmp_path / "runs" / "search" / "report.md").read_text() == written
    assert "## Learning-rate search" in written

    # run again: the search is not repeated (its choice is read back), the trials are complete
    runs_before = sorted(Path(tmp_path / "runs" / "search" / "search").rglob("manifest.json"))
    run_study(load_study(str(study_file)))
    assert sorted(Path(tmp_path / "runs" / "search" / "search").rglob("manifest.json")) == runs_before
    again = capsys.readouterr().out
    assert "learning rate of dense: 0.003" in again
    assert "_trial_" not in again, again  # Tune's "Trial ... completed. Last result:" of a finished run
