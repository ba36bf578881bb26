"""The study's report in the reference paper's form, from synthetic trials and metrics (no
Ray, no training): the MoE models' worth read off a fit over the dense models with its
spread over seeds, Table 2's matched dense model and throughput ratio, the learning-rate
search, the routers' health, Figure 1's axes and panels, the curves' CSV, and the whole
report from runs' metrics in storage."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from raymoe.config import load_config
from raymoe.runs import metrics_part, run_location
from raymoe.study.outcomes import LayerHealth, TrialOutcome, largest_rise, router_health, validation_curves
from raymoe.study.report import Report, build_report, y_limits
from raymoe.study.spec import ModelSpec, Study
from raymoe.study.tables import (
    ModelRow,
    comparisons,
    fit_dense,
    lr_search_table,
    router_table,
    stability_table,
    worth,
    worth_along,
)


def row(model: str, params: int, losses: list[float], *, active: int = 0, samples_per_s: float = 100.0,
        trials: int | None = None) -> ModelRow:
    """A model's row: dense unless ``active`` (its active non-embedding parameters) is given."""
    mean = sum(losses) / len(losses) if losses else math.nan
    return ModelRow(model=model, total_params=params + 1000, active_params=(active or params) + 1000,
                    non_embedding_params=params, active_non_embedding_params=active or params, lr=1e-3,
                    val_loss=mean, val_spread=max(losses) - min(losses) if losses else 0.0, val_losses=losses,
                    tokens_per_s=samples_per_s * 128, samples_per_s=samples_per_s, train_flops=1e12,
                    trials=len(losses) if trials is None else trials, failed=[], is_moe=bool(active))


def loss_at(params: float) -> float:
    """Dense losses exactly linear in log params."""
    return 10.0 - 0.5 * math.log(params)


def table_rows(markdown: str, first: str) -> list[list[str]]:
    """The cells of a markdown table's rows whose first cell is ``first``."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith(f"| {first} |")]


def test_worth_is_read_off_a_least_squares_fit_with_its_spread_over_seeds():
    dense = [row(f"dense-{n}", n, [loss_at(n)]) for n in (1_000_000, 4_000_000, 16_000_000)]
    seeds = [loss_at(30e6), loss_at(40e6)]
    moe = row("moe", 8_000_000, seeds, active=2_000_000)
    fit = fit_dense([*dense, moe])
    assert fit is not None and (fit.models, fit.low, fit.high) == (3, 1_000_000, 16_000_000)
    w = worth(fit, moe)
    mean_equivalent = math.exp((10.0 - sum(seeds) / 2) / 0.5)  # the geometric mean of 30M and 40M
    assert w.equivalent == pytest.approx(mean_equivalent)
    assert w.of_mean == pytest.approx(mean_equivalent / 2e6)
    assert w.seeds == pytest.approx([15.0, 20.0])  # 30M and 40M over its 2M active
    line = comparisons([*dense, moe])[1]
    assert line.startswith(f"moe (val {moe.val_loss:.4f}) is worth a dense model of "
                           f"{mean_equivalent / 1e6:.2f}M non-embedding parameters, "
                           f"{mean_equivalent / 2e6:.2f}x its 2.00M active ones (per seed: mean 17.50x, "
                           "range 15.00x-20.00x over 2 seeds)"), line
    assert "over 3 dense models (extrapolated beyond their 1.00M-16.00M)" in line


def test_the_fit_is_least_squares_over_all_dense_models_not_an_interpolation():
    sizes = [1e6, 2e6, 4e6, 8e6]
    losses = [5.0, 4.9, 4.3, 4.2]
    dense = [row(f"d{i}", int(n), [loss]) for i, (n, loss) in enumerate(zip(sizes, losses, strict=True))]
    moe = row("moe", 9_000_000, [4.6], active=1_000_000)
    slope, intercept = np.polyfit(np.log(sizes), losses, 1)
    fit = fit_dense([*dense, moe])
    assert fit is not None and (fit.slope, fit.intercept) == pytest.approx((slope, intercept))
    assert worth(fit, moe).of_mean == pytest.approx(math.exp((4.6 - intercept) / slope) / 1e6)
    assert "(within their range)" in comparisons([*dense, moe])[1]


def test_without_two_dense_sizes_there_is_no_worth():
    rows = [row("dense", 1_000_000, [5.0]), row("failed", 4_000_000, [], trials=0),
            row("moe", 8_000_000, [4.8], active=1_000_000)]
    assert fit_dense(rows) is None
    assert comparisons(rows)[1].startswith("moe (val 4.8000): no dense-equivalent size")


def test_worth_along_training_is_read_at_each_evaluation_from_that_evaluations_fit():
    """Dense losses linear in log params at every evaluation, the MoE model's equal to a
    dense model of 2x then 4x then 8x its active parameters; one MoE seed failed."""
    tokens = [1_000 * 2**i for i in range(12)]
    worth_at = {t: 2.0 ** (1 + i // 4) for i, t in enumerate(tokens)}

    def loss(params: float, t: int) -> float:
        return 10.0 - 0.5 * math.log(params) - 0.1 * math.log(t)

    trials = [TrialOutcome(f"dense-{n}-seed{s}", f"dense-{n}", s, curve=[(t, loss(n, t)) for t in tokens])
              for n in (1_000_000, 4_000_000) for s in (1, 2)]
    trials.append(TrialOutcome("moe-seed1", "moe", 1, curve=[(t, loss(1e6 * worth_at[t], t)) for t in tokens]))
    trials.append(TrialOutcome("moe-seed2", "moe", 2, curve=[(t, 0.0) for t in tokens], error="RuntimeError: boom"))
    rows = [row("dense-1000000", 1_000_000, [1.0]), row("dense-4000000", 4_000_000, [1.0]),
            row("moe", 8_000_000, [1.0], active=1_000_000)]
    along = worth_along(rows, trials, points=4)
    assert worth_along(rows, trials) == comparisons(rows, trials)[-1]
    cells = {t: table_rows(along, f"{t:,}") for t in tokens}
    shown = {t: cell[0][1] for t, cell in cells.items() if cell}
    assert list(shown) == [1_000, 16_000, 128_000, 2_048_000]  # evenly in log tokens, first and last
    assert shown == {t: f"{worth_at[t]:.2f}x" for t in shown}
    assert worth_along(rows[:2], trials) == ""  # no MoE model


def test_table2_names_the_smallest_dense_model_of_equal_quality_and_the_throughput_ratio():
    dense = [row("dense-s", 1_000_000, [loss_at(1e6)], samples_per_s=400.0),
             row("dense-m", 4_000_000, [loss_at(4e6)], samples_per_s=100.0),
             row("dense-l", 16_000_000, [loss_at(16e6)], samples_per_s=25.0)]
    moes = [row("moe", 8_000_000, [loss_at(4e6)], active=1_000_000, samples_per_s=300.0),
            row("moe-big", 64_000_000, [loss_at(64e6)], active=4_000_000, samples_per_s=50.0)]
    table = comparisons([*dense, *moes])[0]
    assert table.splitlines()[0] == ("| MoE model | its val loss | dense model of equal quality | its val loss | "
                                     "MoE samples/s | dense samples/s | MoE tokens/s | dense tokens/s | "
                                     "throughput ratio |")
    # equal loss counts; dense-l is better too, but dense-m is the smallest
    assert table_rows(table, "moe") == [["moe", f"{loss_at(4e6):.4f}", "dense-m", f"{loss_at(4e6):.4f}",
                                         "300.0", "100.0", "38,400", "12,800", "3.00x"]]
    (big,) = table_rows(table, "moe-big")  # better than every dense model: the fit's size
    assert big[2:] == ["none (better than every dense model); the fit's: 64.00M non-embedding params",
                       "-", "50.0", "-", "6,400", "-", "-"]


def test_table2_matches_no_dense_model_to_a_moe_model_worse_than_all_of_them():
    dense = [row("dense-s", 1_000_000, [loss_at(1e6)]), row("dense-m", 4_000_000, [loss_at(4e6)])]
    moe = row("moe", 8_000_000, [loss_at(0.5e6)], active=1_000_000)
    (worse,) = table_rows(comparisons([*dense, moe])[0], "moe")
    assert worse[2] == "none (worse than every dense model); the fit's: 0.50M non-embedding params"
    assert worse[3:] == ["-", "100.0", "-", "12,800", "-", "-"]


LR_SEARCH = {
    "tokens": 1_000_000, "seed": 7, "lrs": [1e-3, 3e-3],
    "trials": [
        {"model": "dense", "lr": 1e-3, "val_loss": 5.12341, "tokens": 1_000_000, "stopped_early": False,
         "error": ""},
        {"model": "dense", "lr": 3e-3, "val_loss": 5.30124, "tokens": 310_000, "stopped_early": True,
         "error": ""},
        {"model": "moe", "lr": 1e-3, "val_loss": None, "tokens": 0, "stopped_early": False,
         "error": "Traceback (most recent call last):\n  ...\nRuntimeError: loss is NaN | at step 3"},
        {"model": "moe", "lr": 3e-3, "val_loss": 4.9, "tokens": 1_000_000, "stopped_early": False,
         "error": ""},
    ],
    "chosen": {"dense": 1e-3, "moe": 3e-3},
}


def test_the_lr_search_is_a_row_per_model_and_a_column_per_rate_with_the_chosen_in_bold():
    text = lr_search_table(LR_SEARCH)
    assert text.splitlines()[0] == "| model | lr 1.00e-03 | lr 3.00e-03 |"
    assert table_rows(text, "dense") == [["dense", "**5.1234**", "5.3012 (stopped at 0.31M tokens)"]]
    assert "| moe | failed: RuntimeError: loss is NaN \\| at step 3 | **4.9000** |" in text
    assert text.endswith("Each model trained 1,000,000 tokens (seed 7) at each learning rate; in bold the rate "
                         "chosen for the study's trials.")


def records_of_a_moe_run() -> list[dict]:
    """Steps every 10 tokens up to 1050: layer 0 drops 90% up to 50 tokens (5% of 1000), then
    10% at odd steps and 30% at even ones; layer 1 never drops (no dropped share logged)."""
    records = []
    for step in range(1, 106):
        tokens = 10 * step
        dropped = 0.9 if tokens <= 50 else (0.3 if step % 2 == 0 else 0.1)
        records.append({"step": step, "tokens": tokens, "moe0/dropped": dropped, "moe0/load_cv": 2.0 if
                        tokens <= 50 else 0.2 + 0.2 * (step % 2), "moe1/load_cv": 0.5, "loss": 5.0})
    return records


def test_router_health_leaves_out_the_first_5_percent_of_the_tokens():
    layer0, layer1 = router_health(records_of_a_moe_run(), total_tokens=1000)
    assert layer0 == LayerHealth(0, pytest.approx(0.2), pytest.approx(0.3), pytest.approx(0.3))
    assert layer1 == LayerHealth(1, 0.0, 0.0, 0.5)


def test_the_router_table_shows_the_mean_over_seeds_and_the_worst_seed():
    trials = [TrialOutcome("moe-seed1", "moe", 1, router=[LayerHealth(0, 0.01, 0.05, 0.2)]),
              TrialOutcome("moe-seed2", "moe", 2, router=[LayerHealth(0, 0.03, 0.15, 0.4)]),
              TrialOutcome("quiet-seed1", "quiet", 1)]
    rows = [row("dense", 1_000_000, [5.0]), row("moe", 8_000_000, [4.0, 4.1], active=1_000_000),
            row("quiet", 8_000_000, [], active=1_000_000, trials=0)]
    table = router_table(trials, rows)
    assert table_rows(table, "moe") == [["moe", "0", "2.00% (worst 3.00%)", "10.00% (worst 15.00%)",
                                         "0.300 (worst 0.400)"]]
    assert table_rows(table, "quiet") == [["quiet", "-", "no router statistics", "-", "-"]]
    assert not table_rows(table, "dense")


def test_the_largest_rise_of_val_loss_against_the_criterion():
    assert largest_rise([(1, 5.0), (2, 4.0), (3, 4.1), (4, 3.9), (5, 3.95)]) == pytest.approx(0.1)
    assert largest_rise([(1, 5.0), (2, 4.0)]) == 0.0
    assert math.isnan(largest_rise([(1, 5.0)]))
    table = stability_table([TrialOutcome("a", "m", 1, max_val_rise=0.1), TrialOutcome("b", "m", 2, max_val_rise=0.0),
                             TrialOutcome("c", "m", 3)])
    assert [r[1:] for r in table_rows(table, "a") + table_rows(table, "b") + table_rows(table, "c")] == [
        ["0.1000", "no"], ["0.0000", "yes"], ["-", "-"]]


def test_validation_curves_split_the_extra_sets():
    records = [{"step": 1, "tokens": 100, "loss": 6.0},
               {"step": 2, "tokens": 200, "val_loss": 5.0, "val_loss/wiki": 5.5, "val_perplexity": 148.4},
               {"step": 4, "tokens": 400, "val_loss": 4.0, "val_loss/wiki": 4.5}]
    assert validation_curves(records) == {"own": [(200, 5.0), (400, 4.0)], "wiki": [(200, 5.5), (400, 4.5)]}


def curve(start: float, end: float) -> list[tuple[int, float]]:
    """A huge first evaluation, then a fall from ``start`` to ``end`` over 1M tokens."""
    return [(1000, 11.0), *((t, start + (end - start) * t / 1_000_000) for t in range(100_000, 1_000_001, 100_000))]


def two_model_report(extra: bool) -> Report:
    trials = [TrialOutcome(f"dense-seed{s}", "dense", s, curve=curve(5.0 + 0.1 * s, 4.5 + 0.1 * s),
                           extra_curves={"wiki": curve(6.0, 5.5)} if extra else {}) for s in (1, 2)]
    trials.append(TrialOutcome("moe-seed1", "moe", 1, curve=curve(4.8, 4.0)))
    trials.append(TrialOutcome("moe-seed2", "moe", 2, error="RuntimeError: boom"))
    rows = [row("dense", 1_000_000, [4.6, 4.7]), row("moe", 8_000_000, [4.0], active=1_000_000)]
    return Report("toy", trials, rows, comparisons(rows))


def test_y_limits_leave_out_the_first_evaluations_huge_losses():
    low, high = y_limits([curve(5.0, 4.5), curve(4.8, 4.0)])
    top = 5.0 - 0.5 * 0.1  # the highest point from 10% of the tokens on
    assert (low, high) == pytest.approx((4.0 - 0.05 * (top - 4.0), top + 0.05 * (top - 4.0)))
    assert y_limits([[(1, math.nan)]]) is None


def test_figure_1_has_a_log_token_axis_the_informative_range_and_a_panel_per_extra_set():
    fig = two_model_report(extra=True).figure()
    try:
        own, wiki = fig.axes
        assert own.get_xscale() == wiki.get_xscale() == "log"
        low, high = own.get_ylim()
        # from the MoE's last 4.0 to the dense seeds' mean at 10% of the tokens, 5.1; not 11.0
        assert (low, high) == pytest.approx((4.0 - 0.055, 5.1 + 0.055))
        assert [line.get_linestyle() for line in own.get_lines()] == ["--", "-"]
        assert wiki.get_title() == "validation set wiki"
        assert [line.get_label() for line in wiki.get_lines()] == ["dense (dense, 2 seeds)"]
    finally:
        plt.close(fig)
    assert len(two_model_report(extra=False).figure().axes) == 1
    plt.close("all")


def test_the_curves_csv_is_long_with_a_set_column():
    rows = list(csv.DictReader(io.StringIO(two_model_report(extra=True).curves_csv())))
    assert list(rows[0]) == ["trial", "model", "seed", "set", "tokens", "val_loss"]
    assert {(r["trial"], r["set"]) for r in rows} == {("dense-seed1", "own"), ("dense-seed2", "own"),
                                                     ("moe-seed1", "own"), ("dense-seed1", "wiki"),
                                                     ("dense-seed2", "wiki")}
    assert len(rows) == 5 * 11


def write_metrics(trial: dict, records: list[dict]) -> None:
    """A trial's metrics where its config puts them, as the trainer writes them (local storage)."""
    directory = Path(run_location(load_config(trial["config"], trial["overrides"])).metrics_uri)
    directory.mkdir(parents=True)
    (directory / metrics_part(0)).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_report_of_runs_in_storage(tmp_path):
    """A dense and a MoE model of two seeds, one MoE seed failed and a model with no
    metrics; the lr search passed in (the trials trained at its chosen rates): every file
    written, the new columns and sections."""
    study = Study(name="toy", storage=str(tmp_path), data=str(tmp_path / "data"), tokens=1000,
                  models=[ModelSpec("dense", "tiny"), ModelSpec("moe", "tiny-moe8"), ModelSpec("silent", "tiny")],
                  seeds=[1, 2])
    for trial in study.trials():
        if trial["model"] == "silent" or trial["name"] == "moe-seed2":
            continue
        base = -0.1 if trial["model"] == "dense" else 0.0
        records = [{**r, "tokens_per_s": 1280.0, "samples_per_s": 10.0, "val_loss": base + 5.0 - r["step"] / 100,
                    **({"val_loss/wiki": base + 6.0 - r["step"] / 100} if r["step"] % 10 == 0 else {})}
                   for r in records_of_a_moe_run()]
        if trial["model"] == "dense":
            records = [{k: v for k, v in r.items() if not k.startswith("moe")} for r in records]
        write_metrics(trial, records)
    report = build_report(study, {"moe-seed2": "RuntimeError: boom"}, lr_search=LR_SEARCH)
    report.write(str(tmp_path / "toy"))

    dense, moe = report.trials[0], report.trials[2]
    cfg = load_config("tiny").model
    embeddings = cfg.padded_vocab_size * cfg.d_model + cfg.seq_len * cfg.d_model
    assert dense.non_embedding_params == dense.total_params - embeddings
    assert moe.active_non_embedding_params == moe.active_params - embeddings < moe.non_embedding_params
    assert (dense.lr, moe.lr, report.trials[4].lr) == (1e-3, 3e-3, 2e-3)  # chosen, else the config's
    assert not dense.router and len(moe.router) == 2
    assert moe.extra_curves["wiki"][0] == (100, pytest.approx(5.9)) and dense.max_val_rise == 0.0

    md = (tmp_path / "toy" / "report.md").read_text()
    sections = [s.split("\n", 1)[0] for s in md.split("\n## ")]
    assert sections == ["# Study toy", "Learning-rate search", "MoE against dense (Table 2 form)", "Router health"]
    assert table_rows(md, "dense")[0][3:6] == [f"{dense.non_embedding_params:,}",
                                              f"{dense.non_embedding_params:,}", "1.00e-03"]
    assert re.search(r"^\| silent \| .* \| 0, failed: silent-seed1: no metrics were written", md, re.MULTILINE)
    assert "| moe | 0 | 20.00% | 30.00% | 0.300 |" in md  # one seed: no worst
    assert "| moe | 3.9500 | none (worse than every dense model) | - | 10.0 | - | 1,280 | - | - |" in md
    curves = list(csv.DictReader(io.StringIO((tmp_path / "toy" / "validation_curves.csv").read_text())))
    assert {r["set"] for r in curves} == {"own", "wiki"}
    assert json.loads((tmp_path / "toy" / "trials.json").read_text())[2]["router"][1]["layer"] == 1
    assert (tmp_path / "toy" / "validation_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_trial_stopped_before_its_tokens_is_incomplete_not_a_result(tmp_path):
    """A trial killed midway (its run resumes later) has a validation loss, but of fewer
    tokens than the others: the report says so and leaves it out of the model's row."""
    study = Study(name="toy", storage=str(tmp_path), data=str(tmp_path / "data"), tokens=1000,
                  models=[ModelSpec("moe", "tiny-moe8")], seeds=[1])
    records = [{**r, "val_loss": 5.0} for r in records_of_a_moe_run()]
    stopped = [r for r in records if r["tokens"] <= 500]
    write_metrics(study.trials()[0], stopped)
    report = build_report(study, {})
    assert report.trials[0].error == f"incomplete: evaluated at {stopped[-1]['tokens']:,} of its 1,000 tokens"
    assert report.models[0].trials == 0
