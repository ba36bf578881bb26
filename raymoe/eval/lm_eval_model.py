"""raymoe checkpoints as an lm-evaluation-harness model, so that any of the harness's
tasks runs on them: ``raymoe-lm-eval --model raymoe --model_args checkpoint=PATH,ep=N
--tasks ...`` (or ``lm_eval.simple_evaluate(model="raymoe", ...)`` after importing this
module).

lm-evaluation-harness 0.4 finds only its built-in models from its command line (it has no
plugin entry point), so ``raymoe-lm-eval`` is the harness's own command with this module
imported first, which registers the model as "raymoe".

The model scores in one process (``ep=1``, the default) or on an expert-parallel inference
group of ``ep`` Ray actors (raymoe.infer), each holding the dense part and 1/ep of the
experts. Both use raymoe's Scorer, so the numbers are those of ``raymoe eval``; the token
conventions (context encoded alone, spaces moved to the continuation, inputs cut on the
left) are the harness's own. Generation is greedy, as the harness's zero-shot tasks ask.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

try:
    import lm_eval.models  # noqa: F401  (the built-in models stay registered beside ours)
    from lm_eval import utils as harness_utils
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # an optional extra
    raise ImportError("the lm-evaluation-harness adapter needs lm-eval: "
                      "pip install 'raymoe[lmeval]'") from err
from tqdm import tqdm

from raymoe.data.tokenizers import Tokenizer
from raymoe.errors import RaymoeError
from raymoe.eval.scoring import Score, ScoringModel, TokenPair, encode_pairs

T = TypeVar("T")
R = TypeVar("R")
REQUESTS_PER_CALL = 256
"""Requests scored per call (one progress step; on a group, one Ray round trip)."""


class HarnessArgumentError(RaymoeError, ValueError):
    """A --model_args value the raymoe model cannot take."""


class ScoringBackend(Protocol):
    """Where the forwards run: this process, or an expert-parallel group."""

    def loglikelihoods(self, pairs: list[TokenPair], batch_size: int) -> list[Score]: ...

    def generate_until(self, contexts: list[str], stop: tuple[str, ...], max_new_tokens: int,
                       batch_size: int) -> list[str]: ...


def _group_backend(checkpoint: str, ep: int, device: str, tokenizer: str | None,
                   cpus_per_rank: float) -> tuple[Any, Tokenizer, int]:
    """An inference group of ``ep`` Ray actors (joining RAY_ADDRESS's cluster, or starting
    a local one), with the checkpoint's tokenizer and context length for this process."""
    import ray

    from raymoe.config import config_from_dict
    from raymoe.console import connect_ray
    from raymoe.infer.group import GroupOptions, InferenceGroups, check_group_shape
    from raymoe.runs import checkpoint_manifest, checkpoint_tokenizer

    manifest = checkpoint_manifest(checkpoint)
    check_group_shape(manifest, ep)  # before any actor starts
    if not ray.is_initialized():
        connect_ray(None)
    groups = InferenceGroups(manifest["uri"], GroupOptions(ep, 1, cpus_per_rank, device, tokenizer))
    seq_len = config_from_dict(manifest["extra"]["config"]).model.seq_len
    return groups, checkpoint_tokenizer(manifest["uri"], manifest["extra"], tokenizer), seq_len


def _positive_int(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise HarnessArgumentError(f"{name}={value!r}: expected a positive integer"
                                   + (" (the raymoe model has no automatic batch size)"
                                      if name == "batch_size" else ""))
    return number


def _available(device: str | None) -> str:
    """The device asked for; CPU when none is, or when CUDA is asked for (the harness's
    command line asks for cuda:0 unless told otherwise) and this torch has none, as the
    harness's own hf model does."""
    import torch

    if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            print(f"raymoe model: {device} is not available; running on cpu", file=sys.stderr)
        return "cpu"
    return device


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@register_model("raymoe")
class RaymoeLM(LM):
    """model_args: ``checkpoint`` (a checkpoint or run directory, local or s3://), ``ep``
    (expert-parallel group size; 1 = this process), ``tokenizer`` (override), ``device``,
    ``batch_size``, ``max_gen_toks`` (default for generation tasks that give none),
    ``cpus_per_rank`` (with ep > 1)."""

    def __init__(self, checkpoint: str, ep: int | str = 1, batch_size: int | str = 16,
                 device: str | None = None, tokenizer: str | None = None,
                 max_gen_toks: int | str = 256, cpus_per_rank: float | str = 1.0):
        super().__init__()
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.ep = _positive_int("ep", ep)
        device = _available(device)
        self.backend: ScoringBackend
        if self.ep == 1:
            from raymoe.eval.loading import load_model

            loaded = load_model(checkpoint, device, tokenizer)
            self.backend = ScoringModel(loaded.model, loaded.tokenizer)
            self.tokenizer, self.seq_len = loaded.tokenizer, loaded.config.model.seq_len
        else:
            groups, self.tokenizer, self.seq_len = _group_backend(checkpoint, self.ep, device, tokenizer,
                                                                  float(cpus_per_rank))
            self.backend = groups
            weakref.finalize(self, groups.close)

    # ------------------------------------------------------------ the harness's three calls

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = encode_pairs(self.tokenizer, [tuple(r.args) for r in requests])
        scores = self._in_calls(pairs, lambda part: self.backend.loglikelihoods(part, self.batch_size),
                                "loglikelihood", disable_tqdm)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood from the end-of-text token on, in the harness's
        rolling windows of the model's context (each token predicted once)."""
        windows: list[TokenPair] = []
        counts = []
        for text in self.tokenizer.encode_batch([r.args[0] for r in requests]):
            own = [harness_utils.make_disjoint_window(w) for w in harness_utils.get_rolling_token_windows(
                token_list=text, prefix_token=self.tokenizer.eot_id, max_seq_len=self.seq_len, context_len=1)]
            windows += own
            counts.append(len(own))
        scores = iter(self._in_calls(windows, lambda part: self.backend.loglikelihoods(part, self.batch_size),
                                     "loglikelihood_rolling", disable_tqdm))
        return [sum(next(scores).logprob for _ in range(n)) for n in counts]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations; requests with the same stop strings and length go together."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        contexts = []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            contexts.append(context)
            groups.setdefault(self._generation_settings(kwargs), []).append(i)
        outputs = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for (stop, max_new), indices in groups.items():
            for part in _chunks(indices, REQUESTS_PER_CALL):
                texts = self.backend.generate_until([contexts[i] for i in part], stop, max_new, self.batch_size)
                for i, text in zip(part, texts, strict=True):
                    outputs[i] = text
                bar.update(len(part))
        bar.close()
        return outputs

    # ------------------------------------------------------------ helpers

    def _generation_settings(self, kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int]:
        kwargs = kwargs or {}
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
            raise HarnessArgumentError(f"generation settings {kwargs}: the raymoe model decodes "
                                       "greedily (do_sample false, temperature 0)")
        until = kwargs.get("until") or []
        stop = (until,) if isinstance(until, str) else tuple(until)
        return stop, _positive_int("max_gen_toks", kwargs.get("max_gen_toks", self.max_gen_toks))

    @staticmethod
    def _in_calls(items: list[T], call: Callable[[list[T]], list[R]], what: str,
                  disable_tqdm: bool) -> list[R]:
        out: list[R] = []
        with tqdm(total=len(items), disable=disable_tqdm, desc=what) as bar:
            for part in _chunks(items, REQUESTS_PER_CALL):
                out += call(list(part))
                bar.update(len(part))
        return out


def main() -> None:
    """The harness's command line with the raymoe model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
