"""The study's report files in its storage (local or S3): report.md, validation_curves.csv,
trials.json and validation_loss.png (Figure 1's form)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field

from raymoe.data.storage import locate
from raymoe.study.outcomes import TrialOutcome, read_outcome
from raymoe.study.spec import Study
from raymoe.study.tables import ModelRow, comparisons, main_table, model_rows, table1

FILES = ("report.md", "validation_curves.csv", "trials.json", "validation_loss.png")


@dataclass
class Report:
    study: str
    trials: list[TrialOutcome]
    models: list[ModelRow]
    comparisons: list[str]
    eval_tasks: list[str] = field(default_factory=list)
    eval_failures: list[str] = field(default_factory=list)

    def table(self) -> str:
        return main_table(self.models)

    def table1(self) -> str:
        return table1(self.models, self.eval_tasks)

    def markdown(self) -> str:
        parts = [f"# Study {self.study}", self.table(), *self.comparisons]
        if self.eval_tasks:
            parts += ["## Zero-shot evaluation (Table 1 form)", self.table1(), *self.eval_failures]
        return "\n\n".join(parts) + "\n"

    def curves_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["trial", "model", "seed", "tokens", "val_loss"])
        for t in self.trials:
            writer.writerows([t.name, t.model, t.seed, tokens, loss] for tokens, loss in t.curve)
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
        """Figure 1's form: validation loss against tokens, a colour per model, its seeds'
        mean as a line and their range as a band; dense dashed, MoE solid."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, row in enumerate(self.models):
            curves = [dict(t.curve) for t in self.trials if t.model == row.model and t.curve]
            if not curves:
                continue
            xs = sorted(set.intersection(*(set(c) for c in curves)))
            if not xs:
                continue
            seeds = [[c[x] for c in curves] for x in xs]
            colour = colours[i % len(colours)]
            ax.plot(xs, [sum(s) / len(s) for s in seeds], color=colour,
                    linestyle="-" if row.is_moe else "--",
                    label=f"{row.model} ({'MoE' if row.is_moe else 'dense'}, {len(curves)} seeds)")
            if len(curves) > 1:
                ax.fill_between(xs, [min(s) for s in seeds], [max(s) for s in seeds],
                                color=colour, alpha=0.2, linewidth=0)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{self.study}: validation loss against tokens (band: range over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=120)
        plt.close(fig)
        return out.getvalue()


def build_report(study: Study, errors: dict[str, str],
                 eval_errors: dict[str, str] | None = None) -> Report:
    trials = [read_outcome(t, errors.get(t["name"], ""), study.eval_uri(t["name"]))
              for t in study.trials()]
    rows = model_rows(trials, study)
    return Report(study.name, trials, rows, comparisons(rows),
                  study.eval.options.tasks if study.eval else [],
                  [f"evaluation of {name} failed: {why}" for name, why in (eval_errors or {}).items()])
