"""The study's report files in its storage (local or S3): report.md, validation_curves.csv,
trials.json and validation_loss.png (Figure 1's form), in the reference paper's form."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from raymoe.data.storage import locate
from raymoe.study.outcomes import OWN, Curve, TrialOutcome, read_outcome
from raymoe.study.spec import Study
from raymoe.study.tables import (
    ModelRow,
    comparisons,
    lr_search_table,
    main_table,
    model_rows,
    router_table,
    stability_table,
    table1,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FILES = ("report.md", "validation_curves.csv", "trials.json", "validation_loss.png")
SKIP_SHARE = 0.1
"""The y axis's top is the highest mean loss after the first 10% of the tokens."""
MARGIN = 0.05
"""The y range is widened by 5% of itself on each side."""


@dataclass
class Report:
    study: str
    trials: list[TrialOutcome]
    models: list[ModelRow]
    comparisons: list[str]
    """Table 2's form (a markdown table), then each MoE model's dense-equivalent worth."""
    eval_tasks: list[str] = field(default_factory=list)
    eval_failures: list[str] = field(default_factory=list)
    lr_search: dict[str, Any] | None = None
    """The learning-rate search that chose the models' rates (build_report's shape)."""
    note: str = ""
    """The study's own word on what it can show (its YAML's `note`)."""
    uri: str = ""
    """Where the report's files are written (the study's storage)."""

    def table(self) -> str:
        return main_table(self.models)

    def table1(self) -> str:
        return table1(self.models, self.eval_tasks)

    def validation_sets(self) -> list[str]:
        """OWN, then the extra validation sets any trial logged, by name."""
        return [OWN, *sorted({name for t in self.trials for name in t.extra_curves})]

    def markdown(self) -> str:
        parts = [f"# Study {self.study}", *([self.note] if self.note else []), self.table()]
        if self.lr_search:
            parts += ["## Learning-rate search", lr_search_table(self.lr_search)]
        parts += ["## MoE against dense (Table 2 form)", *self.comparisons,
                  "## Router health", router_table(self.trials, self.models), stability_table(self.trials)]
        if self.eval_tasks:
            parts += ["## Zero-shot evaluation (Table 1 form)", self.table1(), *self.eval_failures]
        return "\n\n".join(parts) + "\n"

    def curves_csv(self) -> str:
        """Every trial's curves, one row per evaluation; `set` is OWN or an extra set's name."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["trial", "model", "seed", "set", "tokens", "val_loss"])
        for name in self.validation_sets():
            for t in self.trials:
                writer.writerows([t.name, t.model, t.seed, name, tokens, loss] for tokens, loss in t.curve_of(name))
        return out.getvalue()

    def write(self, uri: str) -> None:
        """Every report file into the directory ``uri`` (a local path or s3://)."""
        directory = locate(uri)
        contents = {"report.md": self.markdown().encode(),
                    "validation_curves.csv": self.curves_csv().encode(),
                    "trials.json": json.dumps([asdict(t) for t in self.trials], indent=1).encode(),
                    "validation_loss.png": self.plot()}
        for name in FILES:
            directory.join(name).write_bytes(contents[name])

    def plot(self) -> bytes:
        """Figure 1's form as a PNG."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=120)
        plt.close(fig)
        return out.getvalue()

    def figure(self) -> Figure:
        """Figure 1's form: a panel per validation set (the trials' own, then each extra set),
        validation loss against training tokens on a log axis, a colour per model, its seeds'
        mean as a line and their range as a band; dense dashed, MoE solid. The y axis shows
        the informative range (y_limits)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sets = self.validation_sets()
        fig, axes = plt.subplots(len(sets), 1, figsize=(8, 5 * len(sets)), squeeze=False)
        for ax, name in zip(axes[:, 0], sets, strict=True):
            self._panel(ax, name)
        fig.tight_layout()
        return fig

    def _panel(self, ax: Axes, name: str) -> None:
        import matplotlib.pyplot as plt

        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        means = []
        for i, row in enumerate(self.models):
            curves = [t.curve_of(name) for t in self.trials if t.model == row.model and t.curve_of(name)]
            band = seed_band(curves)
            if band is None:
                continue
            xs, mean, low, high = band
            colour = colours[i % len(colours)]
            ax.plot(xs, mean, color=colour, linestyle="-" if row.is_moe else "--",
                    label=f"{row.model} ({'MoE' if row.is_moe else 'dense'}, {len(curves)} seeds)")
            if len(curves) > 1:
                ax.fill_between(xs, low, high, color=colour, alpha=0.2, linewidth=0)
            means.append(list(zip(xs, mean, strict=True)))
        ax.set_xscale("log")
        limits = y_limits(means)
        if limits is not None:
            ax.set_ylim(*limits)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{self.study}: validation loss against tokens (band: range over seeds)" if name == OWN
                     else f"validation set {name}")
        if means:
            ax.legend(fontsize=8)


def seed_band(curves: Sequence[Curve]) -> tuple[list[int], list[float], list[float], list[float]] | None:
    """At the token counts every curve has: the seeds' mean, min and max; None when none."""
    if not curves:
        return None
    points = [dict(c) for c in curves]
    xs = sorted(set.intersection(*(set(p) for p in points)))
    if not xs:
        return None
    seeds = [[p[x] for p in points] for x in xs]
    return xs, [sum(s) / len(s) for s in seeds], [min(s) for s in seeds], [max(s) for s in seeds]


def y_limits(curves: Sequence[Curve], skip: float = SKIP_SHARE, margin: float = MARGIN) -> tuple[float, float] | None:
    """Figure 1's y range from the models' mean curves: from the lowest finite loss of any to
    the highest any has after the first ``skip`` of the longest curve's tokens (the first
    evaluations' huge losses fall off the top), each widened by ``margin`` of the range
    (or of the loss, where the range is 0); None without a finite point."""
    finite = [(x, y) for curve in curves for x, y in curve if math.isfinite(y)]
    if not finite:
        return None
    end = max(x for x, _ in finite)
    late = [y for x, y in finite if x >= skip * end]
    low, high = min(y for _, y in finite), max(late)
    pad = margin * ((high - low) or abs(high) or 1.0)
    return low - pad, high + pad


def build_report(study: Study, errors: dict[str, str], eval_errors: dict[str, str] | None = None,
                 lr_search: dict[str, Any] | None = None) -> Report:
    """The study's report from its trials' runs. ``errors``: trial -> why it failed;
    ``eval_errors``: trial -> why its evaluation failed; ``lr_search``: the search that chose
    the learning rates, {"tokens", "seed", "lrs", "trials": [{"model", "lr", "val_loss",
    "tokens", "stopped_early", "error"}], "chosen": {model: lr}}; the trials trained at the
    chosen rates."""
    trials = [read_outcome(t, errors.get(t["name"], ""), study.eval_uri(t["name"]))
              for t in study.trials(lr_search["chosen"] if lr_search else None)]
    rows = model_rows(trials, study)
    return Report(study.name, trials, rows, comparisons(rows, trials),
                  study.eval.options.tasks if study.eval else [],
                  [f"evaluation of {name} failed: {why}" for name, why in (eval_errors or {}).items()],
                  lr_search, study.note, study.uri)
