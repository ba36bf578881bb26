"""The dense-versus-MoE study on Ray Tune, end to end on the local cluster, with a trial
that fails (a config error) reported in the table while the others complete."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from raymoe.eval.runner import evaluate_checkpoint
from raymoe.eval.tasks import SAMPLE_DATA
from raymoe.study.run import run_study
from raymoe.study.spec import load_study


def test_tiny_study_writes_plot_csv_and_table(dataset, tmp_path):
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "the ship sailed into the harbour at dawn", "he wrote a long letter to his sister",
        "they walked along the quiet road")))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "mini", "storage": str(tmp_path / "runs"), "data": str(dataset), "tokens": 2048,
        "seeds": [1],
        "overrides": ["model.seq_len=32", "model.n_layer=2", "model.d_model=32", "model.n_head=2",
                      "train.global_batch=8", "train.micro_batch=4", "train.log_every=2",
                      "train.eval_every=4", "train.eval_batches=1", "optim.warmup_tokens=256"],
        "models": [{"name": "dense", "config": "tiny"},
                   {"name": "moe", "config": "tiny-moe8"},
                   {"name": "broken", "config": "tiny", "overrides": ["model.n_head=5"]}],
        "eval": {"tasks": ["lambada", "piqa"], "data_dir": str(SAMPLE_DATA),
                 "files": {"lambada": str(lambada)}, "limit": 6, "ep": 2},
    }))
    study = load_study(str(study_file))
    report = run_study(study)
    out = Path(study.uri)
    assert (out / "validation_loss.png").stat().st_size > 10_000
    with open(out / "validation_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["trial"] for r in rows} == {"dense-seed1", "moe-seed1"}
    assert {int(r["tokens"]) for r in rows} == {1024, 2048}
    table = (out / "report.md").read_text()
    main_table = table.split("## Zero-shot")[0]
    rows_of_table = [line for line in main_table.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows_of_table] == ["| dense", "| moe", "| broken"]
    broken = next(m for m in report.models if m.model == "broken")
    assert broken.trials == 0  # the user's error as one line, not Ray's remote traceback
    assert broken.failed == ["broken-seed1: ConfigError: model.n_head: 5 heads do not divide "
                             "model.d_model=32"]
    moe = next(m for m in report.models if m.model == "moe")
    dense = next(m for m in report.models if m.model == "dense")
    assert moe.is_moe and not dense.is_moe and moe.total_params > moe.active_params
    assert moe.trials == dense.trials == 1 and moe.val_loss > 0 and moe.samples_per_s > 0
    trials = json.loads((out / "trials.json").read_text())
    assert [t["error"] == "" for t in trials] == [True, True, False]
    assert any(line.startswith("moe (val") for line in report.comparisons)

    # Table 1's form: each trained model's final checkpoint evaluated zero-shot
    table1 = table.split("## Zero-shot evaluation (Table 1 form)")[1].strip().splitlines()
    assert table1[0] == "|  | dense | moe | broken |"
    assert [line.split(" | ")[0] for line in table1[2:]] == [
        "| total params", "| active params", "| validation loss", "| LAMBADA (acc)", "| PIQA (acc)"]
    for model in ("dense", "moe"):
        direct = evaluate_checkpoint(str(out / f"{model}-seed1"), study.eval.options, show_progress=False)
        row = next(m for m in report.models if m.model == model)
        assert row.eval == {"lambada": direct.value("lambada", "acc"), "piqa": direct.value("piqa", "acc")}
        saved = json.loads((out / "eval" / f"{model}-seed1.json").read_text())
        assert {(r["task"], r["n"]) for r in saved["results"]} == {("lambada", 3), ("piqa", 6)}
        # eval ep 2: the MoE model on one group of 2 ranks (the numbers of one process, above)
        assert len(saved.get("parameter_bytes", [[]])[0]) == (2 if model == "moe" else 0)
    assert table1[-1].endswith(" | - |")  # the broken model has no scores
