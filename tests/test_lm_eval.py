"""The lm-evaluation-harness adapter: harness tasks defined over local files give the
numbers `raymoe eval` gives on the same files, through the harness's own command line, in
one process and on an expert-parallel group."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from sentence_models import SENTENCES
from test_eval import sentence_tasks  # noqa: F401  (a fixture)

from raymoe.eval.harness import EvalOptions
from raymoe.eval.loading import load_model
from raymoe.eval.runner import evaluate_checkpoint
from raymoe.eval.scoring import Scorer

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
from raymoe.eval.lm_eval_model import HarnessArgumentError, RaymoeLM  # noqa: E402

QA_STOP = ["\n", ".", ","]


def _task_yaml(name: str, data: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def harness_tasks(sentence_tasks, tmp_path_factory) -> Path:  # noqa: F811
    """The sentence tasks as harness task YAMLs: multiple choice (random gold labels, so
    acc is not trivially 1), last-word prediction as lambada_openai defines it, greedy
    question answering, and rolling perplexity of whole sentences."""
    root = tmp_path_factory.mktemp("harness-tasks")
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    tasks = {
        "rm_shuffled": _task_yaml("rm_shuffled", sentence_tasks["shuffled"],
                                  "output_type: multiple_choice\ndoc_to_text: '{{query}}'\n"
                                  "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
                                  "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "rm_lambada": _task_yaml("rm_lambada", sentence_tasks["lambada"],
                                 "output_type: loglikelihood\n"
                                 "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                                 "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
                                 "target_delimiter: ''\n"
                                 "metric_list:\n  - metric: acc\n  - metric: perplexity\n"),
        "rm_qa": _task_yaml("rm_qa", sentence_tasks["triviaqa"],
                            "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
                            "doc_to_target: '{{answer}}'\n"
                            f"generation_kwargs:\n  until: {json.dumps(QA_STOP)}\n  max_gen_toks: 48\n"
                            "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"),
        "rm_rolling": _task_yaml("rm_rolling", str(texts),
                                 "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                                 "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: byte_perplexity\n"),
    }
    for name, text in tasks.items():
        (root / f"{name}.yaml").write_text(text)
    return root


def _run_harness(checkpoint: Path, tasks: Path, out: Path, **model_args: object) -> tuple[dict, dict]:
    """`raymoe-lm-eval` (the harness's command line) on the four tasks: its metrics by
    task and its logged samples by task."""
    args = ",".join(f"{k}={v}" for k, v in {"checkpoint": checkpoint, **model_args}.items())
    command = [str(Path(sys.executable).parent / "raymoe-lm-eval"), "--model", "raymoe",
               "--model_args", args, "--tasks", "rm_shuffled,rm_lambada,rm_qa,rm_rolling",
               "--include_path", str(tasks), "--batch_size", "5", "--log_samples",
               "--output_path", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()),
                               key=lambda s: s["doc_id"])
    return results, samples


def _metric(results: dict, task: str, metric: str) -> float:
    return results[task][f"{metric},none"]


@pytest.mark.slow
def test_harness_tasks_give_the_numbers_of_raymoe_eval(sentence_runs, sentence_tasks,  # noqa: F811
                                                       harness_tasks, tmp_path):
    run = sentence_runs(4)
    results, samples = _run_harness(run, harness_tasks, tmp_path / "out")
    ours = evaluate_checkpoint(str(run), EvalOptions(["shuffled", "lambada"], files=sentence_tasks,
                                                     batch_size=5), show_progress=False)
    for task, metric in [("shuffled", "acc"), ("shuffled", "acc_norm"), ("lambada", "acc"),
                         ("lambada", "perplexity")]:
        assert _metric(results, f"rm_{task}", metric) == pytest.approx(ours.value(task, metric), rel=1e-6)
    assert 0.2 < _metric(results, "rm_shuffled", "acc") < 0.8  # random labels: not a trivial 1

    loaded = load_model(str(run))
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=5)
    contexts = [s["doc"]["context"] for s in samples["rm_qa"]]
    generated = [s["filtered_resps"][0] for s in samples["rm_qa"]]
    assert generated == scorer.generate_until(contexts, tuple(QA_STOP), 48)
    assert [g.strip() for g in generated] == [s["target"] for s in samples["rm_qa"]]  # it learnt them

    # Rolling: each sentence's log-likelihood from the end-of-text token, in one window.
    tokens = loaded.tokenizer.encode_batch(SENTENCES)
    whole = scorer.loglikelihoods([([loaded.tokenizer.eot_id], t) for t in tokens])
    expected = math.exp(-sum(s.logprob for s in whole) / sum(len(s.encode()) for s in SENTENCES))
    assert _metric(results, "rm_rolling", "byte_perplexity") == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_an_ep_group_gives_the_harness_numbers_of_one_process(ray_cluster, moe_runs, harness_tasks):
    """Written at EP 2, scored in one process and on a group of 2 Ray actors (this process
    is connected to the test's cluster, which the adapter then uses)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    def run(**model_args: object) -> dict:
        return simple_evaluate(model="raymoe", model_args={"checkpoint": str(moe_runs[2]), **model_args},
                               tasks=["rm_shuffled", "rm_lambada", "rm_qa", "rm_rolling"], batch_size=5,
                               task_manager=TaskManager(include_path=str(harness_tasks)), log_samples=True)

    here, spread = run(), run(ep=2, cpus_per_rank=0.5)
    for task, metrics in here["results"].items():
        for key, value in metrics.items():
            if key.endswith(",none") and "stderr" not in key:
                assert spread["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
    assert ([s["filtered_resps"] for s in spread["samples"]["rm_qa"]]
            == [s["filtered_resps"] for s in here["samples"]["rm_qa"]])


@pytest.mark.parametrize("args,message", [
    ({"batch_size": "auto"}, "batch_size='auto': expected a positive integer"),
    ({"ep": 0}, "ep=0: expected a positive integer"),
])
def test_bad_model_args_are_named(sentence_runs, args, message):
    with pytest.raises(HarnessArgumentError, match=message):
        RaymoeLM(str(sentence_runs(0)), **args)


def test_sampling_is_refused_with_the_settings_named(sentence_runs):
    from lm_eval.api.instance import Instance

    model = RaymoeLM(str(sentence_runs(0)))
    request = Instance("generate_until", {}, ("alice keeps", {"until": ["."], "do_sample": True}), 0)
    with pytest.raises(HarnessArgumentError, match="do_sample.*decodes greedily"):
        model.generate_until([request])
