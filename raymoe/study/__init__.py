"""The dense-versus-MoE study (`raymoe compare STUDY.yaml`), one job per module, imports
pointing one way: spec (the study YAML) <- outcomes (a trial's metrics and eval results
read back from storage) <- tables (Table 1 and Table 2 forms) <- report (the files:
report.md, CSV, JSON, PNG) <- evaluate (zero-shot, one actor per node) <- run (Ray Tune)."""
