"""Expert-parallel inference groups of Ray actors: the numbers and tokens of one process,
from checkpoints written at EP 1 and EP 2, on tiny models whose answers are known."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sentence_models import SENTENCES
from test_eval import sentence_tasks  # noqa: F401  (a fixture)

from raymoe import cli
from raymoe.commands import checkpoints
from raymoe.eval import harness
from raymoe.eval.harness import EvalOptions, evaluate
from raymoe.eval.loading import load_model
from raymoe.eval.runner import evaluate_checkpoint
from raymoe.infer.group import GroupOptions, InferenceGroups
from raymoe.model.generation import Sampling, generate
from raymoe.model.resident import resident_bytes
from raymoe.runs import checkpoint_manifest
from raymoe.train.capacity import ClusterTooSmallError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [" ".join(s.split()[:2]) for s in SENTENCES[:3]] + ["h"]
TASKS = ["endings", "lambada", "triviaqa"]


def _options(files: dict[str, str]) -> EvalOptions:
    return EvalOptions(TASKS, files=files, batch_size=5, max_new_tokens=48)


@pytest.fixture(scope="module")
def one_process(moe_runs, sentence_tasks):  # noqa: F811
    results = evaluate_checkpoint(str(moe_runs[1]), _options(sentence_tasks), show_progress=False)
    loaded = load_model(str(moe_runs[1]))
    tokens = generate(loaded.model, loaded.tokenizer.encode_batch(PROMPTS), 24, Sampling())
    return results, tokens, resident_bytes(loaded.model)


@pytest.mark.slow
@pytest.mark.parametrize("written,ep,replicas", [(1, 4, 1), (2, 2, 2), (2, 4, 1)])
def test_an_ep_group_gives_the_numbers_and_tokens_of_one_process(
        ray_cluster, moe_runs, sentence_tasks, one_process, written, ep, replicas, monkeypatch):  # noqa: F811
    monkeypatch.setattr(harness, "CHUNK", 10)  # several chunks per task, shared by the replicas
    here, here_tokens, here_bytes = one_process
    options = _options(sentence_tasks)
    uri = checkpoint_manifest(str(moe_runs[written]))["uri"]
    with InferenceGroups(uri, GroupOptions(ep, replicas, cpus_per_rank=0.5)) as groups:
        spread = evaluate(options, groups.score(options), show_progress=False)
        prompts = groups.encode(PROMPTS)
        tokens = groups.generate_tokens(prompts, 24, Sampling(), stop_at_eot=False)
        resident = groups.resident
    assert [(m.task, m.metric, m.n) for m in spread.metrics] == [(m.task, m.metric, m.n) for m in here.metrics]
    assert [m.value for m in spread.metrics] == pytest.approx([m.value for m in here.metrics], rel=1e-5)
    assert tokens == here_tokens  # greedy: token for token
    assert len(resident) == replicas and all(len(g) == ep for g in resident)
    for rank in (r for g in resident for r in g):  # the dense part and 1/ep of the experts
        assert rank.dense == here_bytes.dense and rank.experts * ep == here_bytes.experts


@pytest.mark.parametrize("command,ep,message", [
    ("eval", 3, "--ep 3: must divide the checkpoint's 4 experts"),
    ("generate", 8, "--ep 8: must divide the checkpoint's 4 experts"),
    ("dense", 2, "--ep 2: .* is a dense model, it has no experts to spread")])
def test_a_bad_ep_size_is_refused_before_ray_starts(untrained_runs, sentence_tasks, monkeypatch,  # noqa: F811
                                                    capsys, command, ep, message):
    monkeypatch.setattr(checkpoints, "connect_ray", lambda *a, **k: pytest.fail("Ray was started"))
    run = str(untrained_runs[0 if command == "dense" else 4])
    argv = (["generate", run, "alice"] if command == "generate" else
            ["eval", run, "--task-file", f"lambada={sentence_tasks['lambada']}", "--tasks", "lambada"])
    assert cli.main([*argv, "--ep", str(ep)]) == 2
    assert re.search(message, capsys.readouterr().err)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """The raymoe command in a new driver (this process already holds the cluster)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "raymoe.cli", *argv], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.slow
def test_the_commands_print_one_process_results_and_each_ranks_bytes(
        ray_cluster, moe_runs, sentence_tasks, one_process, tmp_path, capsys):  # noqa: F811
    here, _, here_bytes = one_process
    run, address = str(moe_runs[2]), ray_cluster.address_info["address"]
    files = [f"--task-file={name}={sentence_tasks[name]}" for name in TASKS]
    out = _cli("eval", run, "--tasks", ",".join(TASKS), *files, "--batch-size", "5",
               "--max-new-tokens", "48", "--ep", "2", "--cpus-per-rank", "0.5", "--address", address,
               "--out", str(tmp_path / "results.json"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["value"] for r in saved["results"]] == pytest.approx([m.value for m in here.metrics], rel=1e-5)
    experts_mib = here_bytes.experts / 2 / 2**20
    assert [[r["experts"] for r in g] for g in saved["parameter_bytes"]] == [[here_bytes.experts // 2] * 2]
    assert "group 0 parameter bytes: rank 0: " in out.stdout and f"{experts_mib:.2f} MiB experts" in out.stdout

    assert cli.main(["generate", run, "alice keeps", "--greedy", "--max-new-tokens", "20"]) == 0
    expected = capsys.readouterr().out
    out = _cli("generate", run, "alice keeps", "--greedy", "--max-new-tokens", "20", "--ep", "2",
               "--cpus-per-rank", "0.5", "--address", address)
    assert out.stdout.startswith(expected) and "group 0 parameter bytes" in out.stdout


def test_groups_larger_than_the_cluster_are_refused(ray_cluster, moe_runs):
    uri = checkpoint_manifest(str(moe_runs[1]))["uri"]
    with pytest.raises(ClusterTooSmallError, match=r"needs 6 CPU \(12 workers x 0.5 CPU\); 8 of 12 "
                                                   r"workers fit .* with 4 CPU"):
        InferenceGroups(uri, GroupOptions(4, 3, cpus_per_rank=0.5))
