"""The command line's contract for errors: the user's own errors as one line and exit 2
(also from inside Ray's wrappers), bugs with their traceback, checks before any cluster."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sentence_models import save_sentence_model, sentence_config

from raymoe import cli
from raymoe.config import load_config
from raymoe.model import GPT
from raymoe.runs import CheckpointError
from raymoe.train.preflight import check_resume_fits


def test_a_user_error_is_one_line_and_exit_2(capsys):
    assert cli.main(["info", "tiny", "model.n_head=5"]) == 2
    err = capsys.readouterr().err
    assert err == "raymoe: config error: model.n_head: 5 heads do not divide model.d_model=128\n"


def test_debug_prints_the_traceback_of_a_user_error(capsys, monkeypatch):
    monkeypatch.setenv("RAYMOE_DEBUG", "1")
    assert cli.main(["info", "tiny", "model.n_head=5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise ConfigError' in err
    assert err.endswith("raymoe: config error: model.n_head: 5 heads do not divide model.d_model=128\n")


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path):
    """Anything that is not a RaymoeError is a bug: its traceback shows, exit status 1."""
    script = ("import sys; from raymoe import cli\n"
              "from raymoe.commands import info\n"
              "def broken(args): raise ZeroDivisionError('a bug, not the user')\n"
              "info.cmd_info = broken\n"
              "sys.exit(cli.main(['info', 'tiny']))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert out.stderr.rstrip().endswith("ZeroDivisionError: a bug, not the user")


@pytest.fixture
def no_joining(monkeypatch):
    """Joining a cluster fails the test (as a bug: exit status 1, not the user's 2)."""
    import ray

    def join(*args, **kwargs):
        raise AssertionError(f"joined a cluster: ray.init({args}, {kwargs})")

    monkeypatch.setattr(ray, "init", join)


def test_train_with_a_missing_dataset_fails_before_joining_a_cluster(tmp_path, no_joining, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["train", "tiny", f"data.path={missing}", f"train.storage={tmp_path}",
                     "--address", "127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == (f"raymoe: DatasetError: {missing}: no manifest.json; not a prepared "
                                       "dataset, or its preparation did not finish\n")


def test_resuming_a_run_of_another_shape_is_refused_on_the_driver(tmp_path):
    cfg = sentence_config()
    save_sentence_model(GPT(cfg.model), cfg, tmp_path / "run")
    check_resume_fits(cfg, str(tmp_path / "run"))  # the same shape: fine
    check_resume_fits(cfg, str(tmp_path / "no-run-yet"))  # nothing to resume: fine
    other = load_config("tiny", ["model.n_layer=2", "model.d_model=32", "model.n_head=4", "model.seq_len=128"])
    with pytest.raises(CheckpointError, match=r"step-0+300: the run's latest checkpoint is of another "
                                              r"model shape \(model\.d_model: checkpoint 64, config 32\)"):
        check_resume_fits(other, str(tmp_path / "run"))


@pytest.mark.ray
@pytest.mark.slow
def test_the_demo_trains_and_prints_none_of_rays_known_noise(tmp_path):
    """`raymoe demo` end to end (prepare the bundled sample, train on 2 Ray workers) with its
    own local Ray: the lines raymoe.console silences do not reach the user."""
    out = subprocess.run([sys.executable, "-m", "raymoe.cli", "demo", "--steps", "3",
                          "--workdir", str(tmp_path), "train.log_every=1"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "finished at step 3" in text and (tmp_path / "sample-bytes" / "manifest.json").is_file()
    for noise in ("Progress bars disabled", "Token authentication is enabled", "max_restarts > 0"):
        assert noise not in text, noise


def test_rays_dual_class_wrapper_gives_way_to_the_users_error():
    """A Ray task's error arrives as RayTaskError(ConfigError): an instance of both, whose
    text is the remote traceback; the user sees the ConfigError's own line."""
    from ray.exceptions import RayTaskError

    from raymoe.config import ConfigError
    from raymoe.errors import RaymoeError, find_cause

    try:
        load_config("tiny", ["model.n_head=5"])
    except ConfigError as err:
        inner = err
        wrapped = RayTaskError("trial", "Traceback (most recent call last): ...", err).as_instanceof_cause()
    assert isinstance(wrapped, ConfigError)
    assert find_cause(wrapped, RaymoeError) is inner
    assert cli.describe_error(inner) == "config error: model.n_head: 5 heads do not divide model.d_model=128"


def test_a_study_with_a_missing_dataset_fails_before_joining_a_cluster(tmp_path, no_joining, capsys):
    missing = tmp_path / "nowhere"
    study = tmp_path / "study.yaml"
    study.write_text(f"name: s\nstorage: {tmp_path}\ndata: {missing}\ntokens: 1000\n"
                     "models: [{name: dense, config: tiny}]\n")
    assert cli.main(["compare", str(study), "--address", "127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == (f"raymoe: DatasetError: {missing}: no manifest.json; not a prepared "
                                       "dataset, or its preparation did not finish\n")


def test_a_controller_failure_of_ray_train_gives_up_the_error_it_holds():
    """Ray Train's ControllerError keeps the controller's exception in an attribute of its
    own (not as a cause): a storage failure there is still found."""
    from ray.train import ControllerError

    from raymoe.errors import find_cause

    inner = OSError("When uploading part for key 'runs/cut/checkpoint_manager_snapshot.json'")
    assert find_cause(ControllerError(inner), OSError) is inner


def test_compare_prints_what_a_gpu_study_will_cost_before_joining_a_cluster(tmp_path, no_joining, capsys):
    import json

    import yaml

    from raymoe.data.shards import FORMAT, MANIFEST
    from raymoe.study.plan import format_study_plan, plan_study
    from raymoe.study.spec import load_study

    data = tmp_path / "data"
    data.mkdir()
    (data / MANIFEST).write_text(json.dumps({"format": FORMAT}))
    for config, billed in (("gpt-350m", True), ("tiny", False)):
        study = tmp_path / f"{config}.yaml"
        study.write_text(yaml.safe_dump({"name": "s", "storage": str(tmp_path), "data": str(data),
                                         "tokens": 10**9, "models": [{"name": "m", "config": config}]}))
        with pytest.raises(AssertionError, match="joined a cluster"):
            cli.main(["compare", str(study), "--address", "127.0.0.1:9"])
        summary = format_study_plan(plan_study(load_study(str(study)))) + "\n"
        assert capsys.readouterr().out == (summary if billed else "")  # a CPU study rents no GPUs
