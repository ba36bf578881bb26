"""Expert-parallel inference groups of Ray actors: the numbers and tokens of one process,
from checkpoints written at EP 1 and EP 2, on tiny models whose answers are known. Each
rank of a group computes its own block of the rows, so the calls here give the ranks
rows of very different lengths, and fewer rows than ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from sentence_models import SENTENCES
from test_eval import sentence_tasks  # noqa: F401  (a fixture)

from raymoe import cli
from raymoe.commands import checkpoints
from raymoe.eval import harness
from raymoe.eval.harness import EvalOptions, EvalResults, evaluate
from raymoe.eval.loading import load_model
from raymoe.eval.runner import evaluate_checkpoint
from raymoe.eval.scoring import Score, Scorer, TokenPair
from raymoe.infer.group import GroupOptions, InferenceGroups
from raymoe.model.generation import Sampling, generate
from raymoe.model.resident import ResidentBytes, resident_bytes
from raymoe.runs import checkpoint_manifest
from raymoe.train.capacity import ClusterTooSmallError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [" ".join(s.split()[:2]) for s in SENTENCES[:3]] + ["h", " ".join(SENTENCES[3:6])]
"""1 to 115 bytes: the short rows of a rank's KV cache are left-padded by up to 114, and
the longest prompt leaves room for 13 new tokens in the model's 128, which bounds every
row (in one process, and on every rank of a group)."""
PAIRS: list[TokenPair] = [(list(p.encode()), list(s[len(p):].encode())) for p, s in
                          [("a", SENTENCES[0]), ("bob drives a green truck", SENTENCES[1]),
                           (SENTENCES[2], SENTENCES[2] + " " + SENTENCES[3]), ("d", "d.")]]
TASKS = ["endings", "lambada", "triviaqa"]
NEW = 24
"""New tokens asked for per prompt."""


def _options(files: dict[str, str]) -> EvalOptions:
    return EvalOptions(TASKS, files=files, batch_size=5, max_new_tokens=48)


@dataclass
class OneProcess:
    """What one process answers: the reference of every group."""

    results: EvalResults
    tokens: list[list[int]]
    """The greedy tokens of each of PROMPTS, in one batch."""
    alone: list[int]
    """Those of the longest prompt alone."""
    scores: list[Score]
    """Of PAIRS."""
    stop: tuple[str, ...]
    """A stop string that ends the rows of generate_until at different steps."""
    until: list[str]
    """PROMPTS' greedy continuations, cut at ``stop``."""
    resident: ResidentBytes


@pytest.fixture(scope="module")
def one_process(moe_runs, sentence_tasks) -> OneProcess:  # noqa: F811
    results = evaluate_checkpoint(str(moe_runs[1]), _options(sentence_tasks), show_progress=False)
    loaded = load_model(str(moe_runs[1]))
    prompts = loaded.tokenizer.encode_batch(PROMPTS)
    tokens = generate(loaded.model, prompts, NEW, Sampling())
    assert {len(t) for t in tokens} == {13}, "the longest prompt no longer bounds every row"
    alone = generate(loaded.model, prompts[-1:], NEW, Sampling())[0]
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=2)
    stop = (scorer.generate_until(PROMPTS[1:2], (), NEW)[0][:1],)  # ends row 1 at its first token
    until = scorer.generate_until(PROMPTS, stop, NEW)
    assert len({len(text) for text in until}) > 1, f"{stop} ends every row alike: {until}"
    return OneProcess(results, tokens, alone, scorer.loglikelihoods(PAIRS), stop, until,
                      resident_bytes(loaded.model))


@pytest.mark.slow
@pytest.mark.parametrize("written,ep,replicas", [(1, 4, 1), (2, 2, 2), (2, 4, 1)])
def test_an_ep_group_gives_the_numbers_and_tokens_of_one_process(
        ray_cluster, moe_runs, sentence_tasks, one_process, written, ep, replicas, monkeypatch):  # noqa: F811
    monkeypatch.setattr(harness, "CHUNK", 10)  # several chunks per task, shared by the replicas
    here = one_process
    options = _options(sentence_tasks)
    uri = checkpoint_manifest(str(moe_runs[written]))["uri"]
    with InferenceGroups(uri, GroupOptions(ep, replicas, cpus_per_rank=0.5)) as groups:
        spread = evaluate(options, groups.score(options), show_progress=False)
        prompts = groups.encode(PROMPTS)
        tokens = groups.generate_tokens(prompts, NEW, Sampling(), stop_at_eot=False)
        alone = groups.generate_tokens(prompts[-1:], NEW, Sampling(), stop_at_eot=False)
        scores = groups.loglikelihoods(PAIRS, 2)
        score_alone = groups.loglikelihoods(PAIRS[1:2], 2)
        until = groups.generate_until(PROMPTS, here.stop, NEW, 2)
        with pytest.raises(ValueError, match="prompt token id 999 is outside the vocabulary"):
            groups.generate_tokens([prompts[0]] * (ep - 1) + [[999]], NEW, Sampling())  # on the last rank
        after_the_error = groups.generate_tokens(prompts, NEW, Sampling(), stop_at_eot=False)
        resident = groups.resident
    assert [(m.task, m.metric, m.n) for m in spread.metrics] == [(m.task, m.metric, m.n) for m in here.results.metrics]
    assert [m.value for m in spread.metrics] == pytest.approx([m.value for m in here.results.metrics], rel=1e-5)
    assert tokens == here.tokens == after_the_error  # greedy: token for token
    assert alone == [here.alone]  # one row, ep - 1 ranks with none
    _assert_close(scores, here.scores)
    _assert_close(score_alone, here.scores[1:2])  # one pair, ep - 1 ranks with none
    assert until == here.until  # rows ending at different steps, on different ranks
    assert len(resident) == replicas and all(len(g) == ep for g in resident)
    for rank in (r for g in resident for r in g):  # the dense part and 1/ep of the experts
        assert rank.dense == here.resident.dense and rank.experts * ep == here.resident.experts


def _assert_close(scores: list[Score], expected: list[Score]) -> None:
    assert [s.logprob for s in scores] == pytest.approx([s.logprob for s in expected], rel=1e-5)
    assert [s.greedy for s in scores] == [s.greedy for s in expected]


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
    here, here_bytes = one_process.results, one_process.resident
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
