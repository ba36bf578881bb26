"""Configs: presets, YAML files, dotted overrides, and errors that name the key."""

import pytest

from raymoe.config import PRESETS, ConfigError, load_config


def test_reference_presets_have_the_paper_shapes_and_recipe():
    cfg = load_config("gpt-1.3b-moe128")
    m = cfg.model
    assert (m.n_layer, m.d_model, m.n_head, m.seq_len) == (24, 2048, 16, 2048)
    assert (m.moe.num_experts, m.moe.every, m.moe.top_k, m.moe.capacity_factor) == (128, 2, 1, 1.0)
    assert (m.moe.min_capacity, m.moe.drop_tokens, m.moe.use_rts, m.moe.loss_coef) == (4, True, True, 0.01)
    assert cfg.optim.lr == 1.2e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.train.global_batch == 512 and cfg.optim.warmup_tokens == 375_000_000
    assert load_config("gpt-6.7b").model.init_std == 0.01
    # every model trains 300B tokens; a dense one decays its LR over 260B to 10%, a MoE one over 300B to 1%
    for name in PRESETS:
        if name.startswith("gpt-"):
            cfg = load_config(name)
            dense = not cfg.model.moe.enabled
            assert cfg.train.total_tokens == 300_000_000_000
            assert (cfg.optim.decay_tokens, cfg.optim.min_lr_ratio) == ((260e9, 0.1) if dense else (300e9, 0.01))


def test_every_preset_validates():
    for name in PRESETS:
        assert load_config(name).name == name


def test_yaml_file_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny-moe8\nmodel:\n  n_layer: 6\noptim:\n  decay_tokens: 3.0e+8\n")
    cfg = load_config(str(path), ["model.moe.num_experts=16", "optim.betas=[0.8, 0.9]",
                                  "train.total_tokens=2e6"])
    assert cfg.model.n_layer == 6 and cfg.model.moe.num_experts == 16
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.decay_tokens == 300_000_000
    assert cfg.train.total_tokens == 2_000_000 and isinstance(cfg.train.total_tokens, int)


@pytest.mark.parametrize("override,message", [
    (["model.moe.num_expert=4"], r"model\.moe\.num_expert: unknown key; did you mean 'model\.moe\.num_experts'\?"),
    (["modle.n_layer=2"], r"modle: unknown key; did you mean 'model'\?"),
    (["model.n_layer=abc"], r"model\.n_layer: expected int, got 'abc'"),
    (["model.n_layer=2.5"], r"model\.n_layer: expected an integer, got 2\.5"),
    (["model.moe.drop_tokens=maybe"], r"model\.moe\.drop_tokens: expected true or false"),
    (["model.n_head=5"], r"model\.n_head: 5 heads do not divide model\.d_model=128"),
    (["parallel.ep_size=3", "parallel.num_workers=3"], r"num_experts=8 is not divisible by parallel\.ep_size=3"),
    (["model.moe.capacity_factor=0"], r"model\.moe\.capacity_factor: must be > 0, got 0\.0"),
    (["model.moe.top_k=2", "model.moe.num_experts=1"], r"top_k=2 exceeds model\.moe\.num_experts=1"),
    (["model.moe.noisy_gate_policy=Gumbel"], r"noisy_gate_policy: 'Gumbel' is not one of"),
    (["parallel.num_workers=3"], r"train\.global_batch: 16 is not a multiple"),
    (["model.n_layer"], r"expected KEY=VALUE"),
    (["train.checkpoint_staging=s3://b/stage"], r"train\.checkpoint_staging: 's3://b/stage' is not an "
                                                r"absolute local path"),
    (["train.checkpoint_staging=nvme"], r"train\.checkpoint_staging: 'nvme' is not an absolute"),
])
def test_bad_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-moe8", override)


def test_unknown_preset_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'gpt-350m'"):
        load_config("gpt-350")


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(path))


def test_shipped_studies_load(monkeypatch):
    from pathlib import Path

    from raymoe.study.spec import load_study

    repo = Path(__file__).parents[1]
    monkeypatch.chdir(repo)  # studies name their model configs relative to the repository
    for path in sorted((repo / "jobs" / "configs").glob("study-*.yaml")):
        study = load_study(str(path))
        for trial in study.trials():
            cfg = load_config(trial["config"], trial["overrides"])
            # each model at the study's budget, its LR decaying over the share its own config does
            own = load_config(trial["config"])
            assert cfg.train.total_tokens == study.tokens
            assert cfg.optim.decay_tokens == round(study.tokens * own.optim.decay_tokens / own.train.total_tokens)
        for trial in study.search_trials() if study.lr_search else []:
            assert load_config(trial["config"], trial["overrides"]).train.total_tokens == study.lr_search.tokens
        # study-small's models score chance on the zero-shot tasks: it compares validation losses
        assert path.name == "study-small.yaml" or (study.eval is not None and study.eval.options.tasks)
    reference = load_study(str(repo / "jobs" / "configs" / "study-reference.yaml"))
    decays = {t["model"]: load_config(t["config"], t["overrides"]).optim.decay_tokens for t in reference.trials()}
    assert decays["gpt-6.7b"] == 260_000_000_000 and decays["gpt-1.3b-moe128"] == 300_000_000_000
    from raymoe.eval.harness import plan

    tasks, chunks = plan(load_study(str(repo / "jobs" / "configs" / "study-tiny.yaml")).eval.options)
    assert len(tasks) == 5 and sum(len(c.examples) for c in chunks) == 1000  # the bundled sample


def test_round_trip_through_to_dict():
    cfg = load_config("gpt-350m-moe128")
    from raymoe.config import config_from_dict
    assert config_from_dict(cfg.to_dict()) == cfg


def test_shipped_job_configs_load_and_keep_the_recipe():
    from pathlib import Path

    configs = [p for p in sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))
               if not p.name.startswith("study-")]
    assert {p.stem for p in configs} >= set(PRESETS)
    for path in configs:
        cfg = load_config(str(path))
        assert cfg == load_config(path.stem, [f"data.path={cfg.data.path}",
                                              f"train.storage={cfg.train.storage}"])
