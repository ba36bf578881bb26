"""Zero-shot evaluation, generation and export, on tiny models trained here on a few
sentences (so their answers are known) and on the published task files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import EVAL_DATA, needs_shared_data
from sentence_models import SENTENCES

from raymoe.cli import main
from raymoe.eval import harness
from raymoe.eval.harness import EvalOptions
from raymoe.eval.loading import load_model
from raymoe.eval.runner import evaluate_checkpoint
from raymoe.eval.scoring import Scorer
from raymoe.eval.tasks import TASKS, ChoiceExample, EvalDataError, load_examples
from raymoe.model.generation import Sampling, generate
from raymoe.runs import FORMAT, CheckpointError


@pytest.fixture(params=[0, 4], ids=["dense", "moe4"])
def sentence_run(request, sentence_runs) -> Path:
    return sentence_runs(request.param)


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _endings() -> list[tuple[str, str]]:
    return [tuple(s.rsplit(" ", 1)) for s in SENTENCES]


@pytest.fixture(scope="module")
def sentence_tasks(tmp_path_factory) -> dict[str, str]:
    """Tasks built from SENTENCES: two-choice endings (the true last word against each
    other sentence's), the same with random gold labels, last-word prediction, and
    question answering by generation."""
    root = tmp_path_factory.mktemp("sentence-tasks")
    endings = _endings()
    choice, shuffled = [], []
    rng = random.Random(7)
    for i, (context, word) in enumerate(endings):
        for j, (_, other) in enumerate(endings):
            if i != j:
                choices = [word, other] if (i + j) % 2 else [other, word]
                choice.append({"query": context, "choices": choices, "gold": choices.index(word)})
                shuffled.append({"query": context, "choices": choices, "gold": rng.randrange(2)})
    qa = [{"context": " ".join(s.split()[:2]), "answer": " ".join(s.split()[2:])} for s in SENTENCES]
    return {"endings": _write_jsonl(root / "endings.jsonl", choice),
            "shuffled": _write_jsonl(root / "shuffled.jsonl", shuffled),
            "lambada": _write_jsonl(root / "lambada.jsonl", [{"text": s} for s in SENTENCES]),
            "triviaqa": _write_jsonl(root / "qa.jsonl", qa)}


def _options(files: dict[str, str], tasks: list[str], **kwargs) -> EvalOptions:
    return EvalOptions(tasks, files=files, batch_size=5, max_new_tokens=48, **kwargs)


def test_known_answers_score_100_percent_and_shuffled_labels_score_chance(sentence_run, sentence_tasks):
    results = evaluate_checkpoint(str(sentence_run),
                                  _options(sentence_tasks, ["endings", "shuffled", "lambada", "triviaqa"]),
                                  show_progress=False)
    assert results.value("endings", "acc") == 1.0
    assert results.value("lambada", "acc") == 1.0
    assert results.value("lambada", "perplexity") < 1.5
    assert results.value("triviaqa", "exact_match") == 1.0
    truth = [r["gold"] for r in _read(sentence_tasks["endings"])]
    labels = [r["gold"] for r in _read(sentence_tasks["shuffled"])]
    # the model picks the true ending every time: on random labels it scores their agreement
    assert results.value("shuffled", "acc") == pytest.approx(sum(map(int.__eq__, truth, labels)) / 56)
    assert 0.3 < results.value("shuffled", "acc") < 0.7
    assert {m.n for m in results.metrics} == {56, 8}


def _read(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = model(ids[:, :-1]).logits[0, :, :257].float().log_softmax(-1)
    rows = log_probs[len(context) - 1:]
    return float(rows.gather(1, torch.tensor(continuation).unsqueeze(1)).sum())


def test_loglikelihoods_equal_a_direct_computation(sentence_run):
    loaded = load_model(str(sentence_run))
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=3)
    texts = [("alice keeps a", " red kite"), ("bob", " drives"), ("x", " yz"),
             ("carol bakes fresh bread every", " sunday morning"), ("henry reads maps of", " distant")]
    pairs = scorer.encode_pairs(texts)
    direct = [_direct_logprob(loaded.model, c, k) for c, k in pairs]
    assert [s.logprob for s in scorer.loglikelihoods(pairs)] == pytest.approx(direct, abs=1e-4)
    items = [(pairs[0][0], [k for _, k in scorer.encode_pairs([(texts[0][0], e) for e in
                                                               (" red kite", " blue", " x")])]),
             (pairs[3][0], [pairs[3][1], [ord(" ")]])]
    for use_cache in (True, False):
        scores = scorer.choice_loglikelihoods(items, use_cache=use_cache)
        for (context, continuations), item_scores in zip(items, scores, strict=False):
            assert [s.logprob for s in item_scores] == pytest.approx(
                [_direct_logprob(loaded.model, context, k) for k in continuations], abs=1e-4)
    assert scorer.loglikelihoods(pairs[:1])[0].greedy  # a memorised continuation is greedy


def test_greedy_generation_is_the_same_with_and_without_the_kv_cache(sentence_run):
    model = load_model(str(sentence_run)).model
    prompts = [list(b"alice"), list(b"grace feeds seven"), list(b"d")]
    cached = generate(model, prompts, 30)
    assert cached == generate(model, prompts, 30, use_cache=False)
    for prompt, tokens in zip(prompts, cached, strict=False):  # and the same as one prompt at a time
        ids = torch.tensor([prompt])
        for _ in range(30):
            with torch.no_grad():
                ids = torch.cat([ids, model(ids).logits[:, -1, :257].argmax(-1, keepdim=True)], dim=1)
        assert ids[0, len(prompt):].tolist() == tokens
    assert bytes(cached[1]).decode().startswith(" cats near the river")


def test_sampling_filters_and_seeds(sentence_run):
    model = load_model(str(sentence_run)).model
    prompts = [list(b"erin"), list(b"frank")]
    assert generate(model, prompts, 12, Sampling(temperature=1.0, top_k=1)) == generate(model, prompts, 12)
    seeded = [generate(model, prompts, 12, Sampling(1.5, top_k=20, top_p=0.9),
                       generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert seeded[0] == seeded[1]
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    picks = {int(Sampling(1.0, top_p=0.6).pick(logits, torch.Generator().manual_seed(s))) for s in range(50)}
    assert picks == {0}  # token 0 alone holds 0.66 of the probability
    picks = {int(Sampling(1.0, top_k=2).pick(logits, torch.Generator().manual_seed(s))) for s in range(200)}
    assert picks == {0, 1}
    for bad, match in (({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                       ({"top_k": -2}, "top_k")):
        with pytest.raises(ValueError, match=match):
            Sampling(**bad)


def test_ray_workers_give_the_numbers_of_one_process(ray_cluster, sentence_run, sentence_tasks, monkeypatch):
    monkeypatch.setattr(harness, "CHUNK", 10)  # several chunks per task, spread over 2 workers
    options = _options(sentence_tasks, ["endings", "lambada", "triviaqa"])
    here = evaluate_checkpoint(str(sentence_run), options, show_progress=False)
    monkeypatch.chdir(sentence_run.parent)  # a relative path reaches the workers absolute
    spread = evaluate_checkpoint(sentence_run.name, options, workers=2, show_progress=False)
    assert spread.checkpoint == here.checkpoint == str(sentence_run / "step-00000300")
    assert [(m.task, m.metric, m.n) for m in spread.metrics] == [(m.task, m.metric, m.n) for m in here.metrics]
    # equal up to float rounding (the workers run 1 thread, this process 2)
    assert [m.value for m in spread.metrics] == pytest.approx([m.value for m in here.metrics], rel=1e-6)
    assert [m.stderr for m in spread.metrics] == pytest.approx([m.stderr for m in here.metrics], abs=1e-7)


# ------------------------------------------------------------------------- task files


@needs_shared_data
@pytest.mark.parametrize("name,count", [("lambada", 5153), ("piqa", 1838), ("boolq", 3270),
                                        ("triviaqa", 3000), ("webqs", 2032)])
def test_every_task_reads_its_published_file(name, count):
    examples = load_examples(TASKS[name], EVAL_DATA / TASKS[name].default_file)
    assert len(examples) == count
    first = examples[0]
    if name == "piqa":
        assert first.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
        assert first.gold == 0 and len(first.choices) == 2
    if name == "boolq":
        assert first.context.endswith("Question: does ethanol take more energy make that produces?\nAnswer:")
        assert first.choices == ["no", "yes"] and first.gold == 0
    if name == "lambada":
        assert first.continuation == " signs" and first.context.endswith("I don't care about")
    if name == "webqs":
        assert first.context == "Question: what does jamaican people speak?\nAnswer:"
        assert first.answers == ["Jamaican Creole English Language", "Jamaican English"]
    if name == "triviaqa":
        assert "Onion" in first.answers and first.context.endswith("\nAnswer:")


@needs_shared_data
def test_the_bundled_sample_is_the_head_of_each_published_file():
    from raymoe.eval.tasks import SAMPLE_DATA

    for name in ("lambada", "piqa", "boolq", "triviaqa", "webqs"):
        sample = load_examples(TASKS[name], SAMPLE_DATA / TASKS[name].default_file)
        assert sample == load_examples(TASKS[name], EVAL_DATA / TASKS[name].default_file, limit=200)


RACE_ARTICLE = {
    "id": "high0001.txt",
    "article": "Tom grew apples on a small farm. Every autumn he sold them in town.",
    "questions": ["What did Tom grow?", "Tom sold his apples in  _  .", "When did Tom sell apples?"],
    "options": [["Pears", "Apples", "Corn", "Rice"], ["town", "school", "a river", "the sea"],
                ["In spring", "In summer", "In autumn", "In winter"]],
    "answers": ["B", "A", "C"],
}


def test_race_reads_the_published_json_format(tmp_path):
    high = tmp_path / "race" / "test" / "high"
    high.mkdir(parents=True)
    (high / "1.txt").write_text(json.dumps(RACE_ARTICLE))
    second = dict(RACE_ARTICLE, questions=["Who grew apples?"], options=[["Tom", "Ann", "Bo", "Al"]],
                  answers=["A"])
    (high / "2.txt").write_text(json.dumps(second))
    examples = load_examples(TASKS["race_h"], tmp_path / TASKS["race_h"].default_file)
    assert examples[0] == ChoiceExample(
        "Article: Tom grew apples on a small farm. Every autumn he sold them in town.\n\n"
        "Question: What did Tom grow?\nAnswer: Apples\n"
        " _  .town\n"  # lm-evaluation-harness keeps the last 5 characters of a cloze question
        "When did Tom sell apples?",
        ["In spring", "In summer", "In autumn", "In winter"], 2)
    assert examples[1].gold == 0 and examples[1].context.endswith("\n\nWho grew apples?")
    (high / "3.txt").write_text(json.dumps(dict(RACE_ARTICLE, answers=["B", "A", "E"])))
    with pytest.raises(EvalDataError, match=r"3\.txt: answer 'E' is not one of the options"):
        load_examples(TASKS["race_h"], high)


BAD_LINES = {
    "lambada": [{"text": "one two"}, {"text": "three four"}, {"txt": "five six"}],
    "boolq": [{"query": "q", "choices": ["no", "yes"], "gold": 0}] * 2 + [{"query": "q", "choices": ["no"], "gold": 3}],
    "triviaqa": [{"context": "Q", "answer": "A"}] * 2 + [{"context": "Q"}],
    "my_task": [{"query": "q", "choices": ["a", "b"], "gold": 1}] * 2 + [{"query": 5, "choices": ["a"], "gold": 0}],
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_a_malformed_line_is_named_with_its_file_and_line(name, tmp_path):
    from raymoe.eval.tasks import get_task

    path = tmp_path / f"{name}.jsonl"
    _write_jsonl(path, BAD_LINES[name])
    with pytest.raises(EvalDataError, match=rf"{path.name}:3: "):
        load_examples(get_task(name), path)
    path.write_text("\n".join(path.read_text().splitlines()[:2] + ["{not json"]) + "\n")
    with pytest.raises(EvalDataError, match=rf"{path.name}:3: not valid JSON"):
        load_examples(get_task(name), path)


def test_piqa_and_webqs_name_their_bad_input(tmp_path):
    piqa = tmp_path / "valid.jsonl"
    _write_jsonl(piqa, [{"goal": "g", "sol1": "a", "sol2": "b"}] * 3)
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(EvalDataError, match="valid-labels.lst: 2 labels for 3 items"):
        load_examples(TASKS["piqa"], piqa)
    webqs = tmp_path / "test.json"
    webqs.write_text('[{"qText": "q?", "answers": ["a"]},\n {"qText": "r?", "answers": []}]')
    with pytest.raises(EvalDataError, match=r"test.json: item 1: field 'answers' must be a non-empty list"):
        load_examples(TASKS["webqs"], webqs)
    webqs.write_text('[{"qText": "q?",\n "answers": ["a"]')
    with pytest.raises(EvalDataError, match=r"test.json:2: not valid JSON"):
        load_examples(TASKS["webqs"], webqs)


# ------------------------------------------------------------------------- CLI, checkpoints


def test_cli_eval_writes_results_json(sentence_run, sentence_tasks, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(sentence_run), "--tasks", "endings,lambada", "--limit", "20",
                 "--task-file", f"endings={sentence_tasks['endings']}",
                 "--task-file", f"lambada={sentence_tasks['lambada']}", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["step"] == 300 and results["checkpoint"].endswith("step-00000300")
    rows = {(r["task"], r["metric"]): r for r in results["results"]}
    assert set(rows) == {("endings", "acc"), ("endings", "acc_norm"), ("lambada", "acc"),
                         ("lambada", "perplexity")}
    assert rows["endings", "acc"]["n"] == 20 and rows["endings", "acc"]["value"] == 1.0
    assert set(rows["lambada", "perplexity"]) == {"task", "metric", "value", "stderr", "n"}
    assert "lambada      perplexity" in capsys.readouterr().out
    assert main(["eval", str(sentence_run), "--tasks", "piqa"]) == 2
    assert "task piqa: no file" in capsys.readouterr().err


def test_cli_generate_completes_a_known_sentence(sentence_run, capsys):
    assert main(["generate", str(sentence_run), "grace feeds", "--greedy", "--max-new-tokens", "26"]) == 0
    assert capsys.readouterr().out.startswith("grace feeds seven cats near the river")


def test_a_missing_or_foreign_checkpoint_is_named(tmp_path, sentence_run):
    with pytest.raises(CheckpointError, match=r"nowhere: does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        load_model(str(tmp_path / "empty"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": {}, "extra": {}}))
    with pytest.raises(CheckpointError, match="foreign: the manifest holds no model config"):
        load_model(str(foreign))


def test_a_trainer_checkpoint_records_its_tokenizer(dataset, tmp_path):
    from test_train import config

    from raymoe.train.loop import FileHooks, Trainer

    cfg = config(dataset, str(tmp_path), "tok", "parallel.num_workers=1", "train.max_steps=1",
                 "train.checkpoint_every=1")
    trainer = Trainer(cfg, FileHooks(tmp_path / "tok", keep=1, rank=0), torch.device("cpu"),
                      log=lambda _: None)
    trainer.run()
    loaded = load_model(str(tmp_path / "tok"))
    assert loaded.tokenizer.spec == "bytes" and loaded.step == 1
    ids = torch.randint(0, 257, (2, 16))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, trainer.model(ids).logits, atol=1e-6)


def test_a_checkpoint_on_s3_is_evaluated(s3_server, sentence_run, sentence_tasks):
    import pyarrow.fs as pafs

    target = f"{s3_server['bucket']}/eval-runs/{sentence_run.name}"
    pafs.copy_files(str(sentence_run), target, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_server["fs"])
    options = _options(sentence_tasks, ["lambada"])
    from_s3 = evaluate_checkpoint(f"s3://{target}", options, show_progress=False)
    local = evaluate_checkpoint(str(sentence_run), options, show_progress=False)
    assert [m.value for m in from_s3.metrics] == [m.value for m in local.metrics]
    assert from_s3.step == 300 and from_s3.checkpoint == f"s3://{target}/step-00000300"


def test_inputs_longer_than_the_model_lose_tokens_on_the_left(sentence_run):
    loaded = load_model(str(sentence_run))  # seq_len 128
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=2)
    long_context = list(range(200))
    context, continuation = scorer.fit(long_context, [5, 6, 7])
    assert context == long_context[-126:] and continuation == [5, 6, 7]
    long_continuation = [t % 250 for t in range(300)]
    context, continuation = scorer.fit([1, 2], long_continuation)  # scored on its last 128
    assert continuation == long_continuation[-128:] and context == long_continuation[-129:-128]
    pairs = [(long_context, [5, 6, 7]), ([1, 2], long_continuation)]
    direct = [_direct_logprob(loaded.model, *scorer.fit(c, k)) for c, k in pairs]
    assert [s.logprob for s in scorer.loglikelihoods(pairs)] == pytest.approx(direct, abs=1e-4)
    shared = scorer.choice_loglikelihoods([(long_context, [[5, 6, 7], [9]])])[0]
    assert shared[0].logprob == pytest.approx(direct[0], abs=1e-4)
    # one batch sharing contexts: they lose what its longest continuation (40) needs
    items = [(long_context, [[5], [6]]), (list(range(100, 200)), [[7] * 40, [8]])]
    scores = scorer.choice_loglikelihoods(items)
    assert scores[0][1].logprob == pytest.approx(
        _direct_logprob(loaded.model, long_context[-(129 - 40):], [6]), abs=1e-4)
    assert scores[1][0].logprob == pytest.approx(
        _direct_logprob(loaded.model, list(range(100, 200))[-(129 - 40):], [7] * 40), abs=1e-4)


def test_a_worker_error_reaches_the_user_without_ray_wrapping(ray_cluster, sentence_runs, sentence_tasks):
    with pytest.raises(FileNotFoundError, match="tokenizer 'no-such-tokenizer.json'"):
        evaluate_checkpoint(str(sentence_runs(0)), _options(sentence_tasks, ["lambada"]), workers=2,
                            tokenizer="no-such-tokenizer.json", show_progress=False)
