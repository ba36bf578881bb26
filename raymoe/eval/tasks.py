"""The zero-shot tasks: their file formats, prompts and metrics.

Prompts follow EleutherAI lm-evaluation-harness v0.4 (the task YAMLs of its 0.4.x
releases):
- lambada (the OpenAI version, lambada_openai): context = the text up to its last word,
  continuation = " " + the last word; accuracy (every token of the word greedy) and
  perplexity of the word.
- piqa: "Question: {goal}\\nAnswer:" + " " + solution; acc and acc_norm.
- boolq: "{passage}\\nQuestion: {question}?\\nAnswer:" + " no"/" yes"; acc.
- race_h: one example per article, as the harness: the article, its earlier questions
  with their answers, then the last question; choices are its four options; acc.
- triviaqa: "Question: {question}?\\nAnswer:", webqs: "Question: {question}\\nAnswer:";
  greedy generation until "\\n", "." or ",", exact match against any answer after
  normalisation (GPT-3's way of scoring them; the harness scores webqs by log-likelihood).
- any other name: a jsonl of {"query", "choices", "gold"}, scored like piqa.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymoe.errors import RaymoeError


class EvalDataError(RaymoeError, ValueError):
    """A task file is missing or malformed; the message names the file (and line)."""


@dataclass
class ChoiceExample:
    """Pick the choice with the highest log-likelihood given the context."""

    context: str
    choices: list[str]
    gold: int


@dataclass
class CompletionExample:
    """Score one continuation: is it the greedy one, and how likely is it."""

    context: str
    continuation: str


@dataclass
class GenerationExample:
    """Generate greedily; correct when it matches any answer after normalisation."""

    context: str
    answers: list[str]


Example = ChoiceExample | CompletionExample | GenerationExample


@dataclass
class Task:
    name: str
    kind: str
    """"choice", "completion" or "generation"."""
    default_file: str
    """Where the file lies in an eval data directory (the layout of the published sets)."""
    load: Callable[[Path], list[Example]]
    metrics: tuple[str, ...]
    primary: str
    """The metric of the reference's Table 1."""
    title: str
    """The name Table 1 gives it."""
    stop: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------- reading


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise EvalDataError(f"{path}:{number}: expected a JSON object")
            yield number, record


def _json_file(path: Path) -> Any:
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def _field(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or (kind is list and not value):
        expected = {str: "a string", list: "a non-empty list", int: "an integer"}[kind]
        raise EvalDataError(f"{where}: field {key!r} must be {expected}, got {value!r}")
    return value


def _first_field(record: dict[str, Any], keys: tuple[str, ...], kind: type, where: str) -> Any:
    key = next((k for k in keys if k in record), keys[0])
    return _field(record, key, kind, where)


def _choice(record: dict[str, Any], context: str, where: str) -> ChoiceExample:
    choices = _field(record, "choices", list, where)
    gold = _field(record, "gold", int, where)
    if not all(isinstance(c, str) for c in choices) or not 0 <= gold < len(choices):
        raise EvalDataError(f"{where}: expected string choices and 0 <= gold < "
                            f"{len(choices)}, got gold {gold}")
    return ChoiceExample(context, choices, gold)


# ---------------------------------------------------------------------------- tasks


def load_multiple_choice(path: Path) -> list[Example]:
    """A jsonl of {"query", "choices", "gold"}: the form for tasks added without code."""
    return [_choice(r, _field(r, "query", str, f"{path}:{n}"), f"{path}:{n}")
            for n, r in _json_lines(path)]


def load_lambada(path: Path) -> list[Example]:
    examples: list[Example] = []
    for n, record in _json_lines(path):
        text = _field(record, "text", str, f"{path}:{n}").strip()
        if " " not in text:
            raise EvalDataError(f"{path}:{n}: text has no last word to predict")
        context, word = text.rsplit(" ", 1)
        examples.append(CompletionExample(context, " " + word))
    return examples


def load_piqa(path: Path) -> list[Example]:
    """PIQA's X.jsonl with its labels in X-labels.lst next to it."""
    labels_path = path.with_name(path.stem + "-labels.lst")
    if not labels_path.is_file():
        raise EvalDataError(f"{labels_path}: no such file (PIQA keeps its labels there)")
    labels = labels_path.read_text().split()
    records = list(_json_lines(path))
    if len(labels) != len(records):
        raise EvalDataError(f"{labels_path}: {len(labels)} labels for {len(records)} items in {path}")
    examples: list[Example] = []
    for (n, record), label in zip(records, labels, strict=False):
        where = f"{path}:{n}"
        goal = _field(record, "goal", str, where)
        choices = [_field(record, k, str, where) for k in ("sol1", "sol2")]
        if label not in ("0", "1"):
            raise EvalDataError(f"{labels_path}:{n}: label {label!r}, expected 0 or 1")
        examples.append(ChoiceExample(f"Question: {goal}\nAnswer:", choices, int(label)))
    return examples


def load_boolq(path: Path) -> list[Example]:
    """SuperGLUE's {"passage", "question", "label"} or the {"query", "choices", "gold"} form
    (whose query ends with the question; the harness's "\\nAnswer:" is added)."""
    examples: list[Example] = []
    for n, record in _json_lines(path):
        where = f"{path}:{n}"
        if "query" in record:
            query = _field(record, "query", str, where)
            if not query.rstrip().endswith("Answer:"):
                query = query.rstrip() + "\nAnswer:"
            examples.append(_choice(record, query, where))
            continue
        passage = _field(record, "passage", str, where)
        question = _field(record, "question", str, where)
        label = record.get("label", record.get("answer"))
        if not isinstance(label, (bool, int)):
            raise EvalDataError(f"{where}: field 'label' must be true/false or 0/1, got {label!r}")
        examples.append(ChoiceExample(f"{passage}\nQuestion: {question}?\nAnswer:",
                                      ["no", "yes"], int(label)))
    return examples


RACE_LETTERS = "ABCD"


def _race_articles(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """RACE as published: a directory of per-article JSON .txt files (or one such file),
    or a jsonl with one article per line."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".json"))
        if not files:
            raise EvalDataError(f"{path}: no RACE article files (*.txt) in it")
        for file in files:
            yield str(file), _json_file(file)
    elif path.suffix == ".jsonl":
        for n, record in _json_lines(path):
            yield f"{path}:{n}", record
    else:
        yield str(path), _json_file(path)


def _race_answer(options: list[str], letter: str, where: str) -> str:
    if letter not in RACE_LETTERS or RACE_LETTERS.index(letter) >= len(options):
        raise EvalDataError(f"{where}: answer {letter!r} is not one of the options A-D")
    return options[RACE_LETTERS.index(letter)]


def load_race(path: Path) -> list[Example]:
    examples: list[Example] = []
    for where, record in _race_articles(path):
        article = _field(record, "article", str, where)
        questions = _field(record, "questions", list, where)
        options = _field(record, "options", list, where)
        answers = _field(record, "answers", list, where)
        if not len(questions) == len(options) == len(answers):
            raise EvalDataError(f"{where}: {len(questions)} questions, {len(options)} option "
                                f"lists and {len(answers)} answers; expected as many of each")
        text = "Article: " + article + "\n\n"
        for question, opts, letter in zip(questions[:-1], options[:-1], answers[:-1], strict=False):
            answer = _race_answer(opts, letter, where)
            if question[-6:] == "  _  .":  # a cloze question (the harness keeps its tail)
                text += question[-5:] + answer + "\n"
            else:
                text += "Question: " + question + "\nAnswer: " + answer + "\n"
        _race_answer(options[-1], answers[-1], where)
        examples.append(ChoiceExample(text + questions[-1], list(options[-1]),
                                      RACE_LETTERS.index(answers[-1])))
    return examples


def _aliases(record: dict[str, Any], where: str) -> list[str]:
    answer = record.get("answer")
    if isinstance(answer, dict):  # the TriviaQA release: {"value", "aliases", ...}
        aliases = answer.get("aliases", []) + [answer.get("value", "")]
    else:
        aliases = list(record.get("aliases", [])) + ([answer] if isinstance(answer, str) else [])
    aliases = [a for a in aliases if isinstance(a, str) and a]
    if not aliases:
        raise EvalDataError(f"{where}: no answer: expected 'answer' and/or 'aliases'")
    return aliases


def load_triviaqa(path: Path) -> list[Example]:
    """{"context" (the prompt) or "question", "answer", "aliases"} per line."""
    examples: list[Example] = []
    for n, record in _json_lines(path):
        where = f"{path}:{n}"
        if "context" in record:
            context = _field(record, "context", str, where)
        else:
            context = f"Question: {_field(record, 'question', str, where)}?\nAnswer:"
        examples.append(GenerationExample(context, _aliases(record, where)))
    return examples


def load_webqs(path: Path) -> list[Example]:
    """The WebQuestions JSON array of {"qText", "answers"} (or a jsonl of
    {"question", "answers"}, the Hugging Face form)."""
    if path.suffix == ".jsonl":
        records = [(f"{path}:{n}", r) for n, r in _json_lines(path)]
    else:
        items = _json_file(path)
        if not isinstance(items, list):
            raise EvalDataError(f"{path}: expected a JSON array of questions")
        records = [(f"{path}: item {i}", r) for i, r in enumerate(items)]
    examples: list[Example] = []
    for where, record in records:
        if not isinstance(record, dict):
            raise EvalDataError(f"{where}: expected a JSON object")
        question = _first_field(record, ("qText", "question"), str, where)
        answers = _field(record, "answers", list, where)
        examples.append(GenerationExample(f"Question: {question}\nAnswer:", answers))
    return examples


SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample" / "eval"
"""The bundled sample: the first 200 examples of five tasks, in the published layout."""

QA_STOP = ("\n", ".", ",")

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("lambada", "completion", "lambada/lambada_test.jsonl", load_lambada,
         ("acc", "perplexity"), "acc", "LAMBADA"),
    Task("piqa", "choice", "piqa/valid.jsonl", load_piqa, ("acc", "acc_norm"), "acc", "PIQA"),
    Task("boolq", "choice", "boolq/boolq.jsonl", load_boolq, ("acc",), "acc", "BoolQ"),
    Task("race_h", "choice", "race/test/high", load_race, ("acc",), "acc", "RACE-h"),
    Task("triviaqa", "generation", "triviaqa/triviaqa_sm_sub.jsonl", load_triviaqa,
         ("exact_match",), "exact_match", "TriviaQA", QA_STOP),
    Task("webqs", "generation", "webquestions/test.json", load_webqs,
         ("exact_match",), "exact_match", "WebQs", QA_STOP),
)}
REFERENCE_TASKS = tuple(TASKS)


def get_task(name: str) -> Task:
    """A built-in task, or a multiple-choice task of that name read from a jsonl."""
    if name in TASKS:
        return TASKS[name]
    return Task(name, "choice", f"{name}.jsonl", load_multiple_choice, ("acc", "acc_norm"), "acc", name)


def task_file(task: Task, data_dir: str | None, files: dict[str, str]) -> Path:
    """The file of ``task``: given on the command line, or in the eval data directory."""
    if task.name in files:
        return Path(files[task.name]).expanduser()
    if data_dir is None:
        raise EvalDataError(f"task {task.name}: no file; give its path ({task.name}=PATH) or an "
                            f"eval data directory holding {task.default_file}")
    return Path(data_dir).expanduser() / task.default_file


def load_examples(task: Task, path: Path, limit: int | None = None) -> list[Example]:
    if not path.exists():
        raise EvalDataError(f"task {task.name}: {path}: no such file or directory")
    examples = task.load(path)
    if not examples:
        raise EvalDataError(f"task {task.name}: {path} holds no examples")
    return examples[:limit] if limit else examples
