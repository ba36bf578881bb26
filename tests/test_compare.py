"""The dense-versus-MoE study on Ray Tune, end to end on the local cluster, with a trial
that fails (a config error) reported in the table while the others complete."""

from __future__ import annotations

import csv
import json

import yaml

from raymoe.compare import load_study, run_study



def test_tiny_study_writes_plot_csv_and_table(dataset, tmp_path):
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
    }))
    study = load_study(str(study_file))
    report = run_study(study)
    out = study.directory
    assert (out / "validation_loss.png").stat().st_size > 10_000
    with open(out / "validation_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["trial"] for r in rows} == {"dense-seed1", "moe-seed1"}
    assert {int(r["tokens"]) for r in rows} == {1024, 2048}
    table = (out / "report.md").read_text()
    rows_of_table = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows_of_table] == ["| dense", "| moe", "| broken"]
    broken = next(m for m in report.models if m.model == "broken")
    assert broken.trials == 0 and "5 heads do not divide model.d_model=32" in broken.failed[0]
    moe = next(m for m in report.models if m.model == "moe")
    dense = next(m for m in report.models if m.model == "dense")
    assert moe.is_moe and not dense.is_moe and moe.total_params > moe.active_params
    assert moe.trials == dense.trials == 1 and moe.val_loss > 0 and moe.samples_per_s > 0
    trials = json.loads((out / "trials.json").read_text())
    assert [t["error"] == "" for t in trials] == [True, True, False]
    assert any(line.startswith("moe (val") for line in report.comparisons)
