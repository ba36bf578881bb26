"""One source of truth for every setting: typed dataclasses, the presets, YAML and overrides.

A config is built from nested dicts (a YAML file, a preset, ``key.sub=value`` overrides);
every key is checked against the dataclass fields, every value against the field's type,
and then the cross-field rules in ``Config.validate`` run. Errors name the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raymoe.errors import RaymoeError


class ConfigError(RaymoeError, ValueError):
    """A configuration value or key is wrong; the message names the dotted key."""


Precision = Literal["auto", "fp32", "bf16"]
"""train.precision (raymoe.model.precision)."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (DeepSpeed-MoE semantics)."""

    num_experts: int = 0
    """0 means a dense model; otherwise the experts in every MoE layer."""
    every: int = 2
    """MoE replaces the FFN of layers every, 2*every, ... (1-indexed): 2 gives layers 2, 4, ..."""
    top_k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    use_rts: bool = True
    """Random token selection: an over-full expert keeps a random subset (else the first)."""
    noisy_gate_policy: Literal["Jitter", "RSample"] | None = None
    eval_drop_tokens: bool = False
    """Whether evaluation drops over-capacity tokens; off, as the reference evaluated."""
    second_expert_sampling: bool = True
    """Top-2 only: pick the second expert with Gumbel noise, as DeepSpeed does by default."""
    loss_coef: float = 0.01
    """Training loss = LM loss + loss_coef * sum of the layers' load-balancing l_aux."""
    z_loss_coef: float = 0.0
    """Router z-loss (ST-MoE); 0 turns it off."""
    bias_update_rate: float = 0.0
    """Loss-free balancing (DeepSeek-V3): a per-expert bias added to the router logits for
    the choice of expert only (the combine weight stays the unbiased softmax), moved after
    every step by this much toward equal loads: up for an expert under the step's mean
    load, down for one over it. 0 turns it off (DeepSpeed's gate)."""
    fixed_capacity_exchange: bool = True
    """With dropping, exchange fixed [experts x capacity, d] buffers: no count exchange,
    no host sync. False sends only the kept rows, sized by one host read of the counts
    (fewer bytes at a capacity factor well above 1)."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether 0-indexed layer ``layer_index`` has an MoE feed-forward."""
        return self.enabled and (layer_index + 1) % self.every == 0


@dataclass
class ModelConfig:
    """A GPT-2 style decoder; shapes of the reference models live in PRESETS."""

    vocab_size: int = 50257
    """The tokenizer's vocabulary; the embedding is padded up to a multiple of pad_vocab_to."""
    pad_vocab_to: int = 128
    seq_len: int = 2048
    n_layer: int = 24
    d_model: int = 1024
    n_head: int = 16
    ffn_mult: int = 4
    init_std: float = 0.014
    dropout: float = 0.0
    activation_checkpointing: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    @property
    def d_ffn(self) -> int:
        return self.ffn_mult * self.d_model


@dataclass
class ParallelConfig:
    num_workers: int | tuple[int, int] = 1
    """Training workers (GPUs): a number, or [MIN, MAX] for an elastic worker group that
    shrinks when nodes are lost and grows back when they return (raymoe.train.elastic)."""
    ep_size: int = 1
    """Expert-parallel group size: the experts are split over this many ranks. Elastic: the
    largest EP size used; each worker group size gets the largest that fits it."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """Ray CPUs each training worker reserves (a fraction lets workers share a core on a small
    machine, beside Ray's own actors)."""
    shard: Literal["none", "fsdp"] = "none"
    """fsdp: dense parameters, gradients and AdamW states sharded over the data-parallel
    ranks (FSDP2), experts over their expert-data-parallel group; none: replicated."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """The dtype gradients are reduced in where the compute is bf16 (train.precision)."""
    grad_sync: Literal["last_micro_batch", "every_micro_batch"] = "last_micro_batch"
    """shard fsdp with gradient accumulation: reduce-scatter the gradients once per step,
    after the last micro-batch (less traffic; each rank holds the unsharded fp32 gradients
    of its dense parameters and experts until then), or after every micro-batch (only
    sharded gradients are held, as in DeepSpeed ZeRO-3)."""
    resize_check_seconds: float = 60.0
    """Elastic: how often Ray Train checks whether the cluster now fits more workers."""

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, both measured in tokens."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_tokens: int = 375_000_000
    decay_tokens: int = 300_000_000_000


@dataclass
class BlendEntry:
    path: str = ""
    """Directory or s3:// prefix of a dataset written by `raymoe prepare`."""
    weight: float = 1.0
    """Relative share of every global batch (the weights need not sum to 1)."""


EXTRA_VALIDATION_NAME = re.compile(r"[A-Za-z0-9_-]+")
"""A name of data.extra_validation: one path segment of a metric and a TensorBoard tag."""


@dataclass
class DataConfig:
    path: str = ""
    """Directory or s3:// prefix of a dataset written by `raymoe prepare`."""
    blend: list[BlendEntry] = field(default_factory=list)
    """Instead of path: weighted datasets of one tokenizer and sequence length (Megatron's
    DATA_BLEND); each global batch holds them in proportion to their weights."""
    seed: int = 1234
    """Seed of the shard order and the shuffles."""
    shuffle_window: int = 64
    """Shards read together and shuffled into each other: a global batch mixes about
    min(shuffle_window, global batch) shards."""
    extra_validation: dict[str, str] = field(default_factory=dict)
    """NAME -> directory or s3:// prefix of another dataset written by `raymoe prepare` (same
    tokenizer and sequence length): every evaluation also reports its mean LM loss as
    val_loss/NAME, read from its validation split (its train split if it has none)."""

    def sources(self) -> list[BlendEntry]:
        """The datasets to train on with their weights (data.path: one of weight 1)."""
        return list(self.blend) if self.blend else [BlendEntry(self.path, 1.0)]


@dataclass
class TrainConfig:
    global_batch: int = 256
    """Sequences per optimizer step over all data-parallel ranks."""
    micro_batch: int = 4
    total_tokens: int = 300_000_000_000
    max_steps: int = 0
    """Stop after this many steps (0: when total_tokens are trained)."""
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 1000
    eval_batches: int = 20
    checkpoint_every: int = 1000
    checkpoint_every_minutes: float = 0.0
    """Also checkpoint when this many minutes passed since the last checkpoint (0: off),
    all ranks at the same step: on spot nodes the work lost to a preemption is the work
    since the last checkpoint."""
    keep_checkpoints: int = 3
    checkpoint_staging: str = ""
    """A fast local directory on every worker node (the NVMe disks of a p4d) where each rank
    writes its checkpoint files before they are uploaded to storage in the background;
    empty: the system's temporary directory."""
    max_failures: int = 3
    """Worker-group restarts after a worker error (a worker that died, a node lost without a
    warning), each from the latest checkpoint; -1: no limit. The user's errors (a corrupt
    shard, a config that does not fit, a storage permission error: raymoe.errors.RaymoeError)
    end the run at once and are never retried (raymoe.train.failures)."""
    max_preemptions: int = -1
    """Restarts after a node was preempted (a spot node warned and taken), counted apart
    from max_failures; -1: no limit."""
    preemption_save_seconds: float = 60.0
    """Seconds a just-in-time checkpoint needs, written and uploaded, before a warned node
    goes (AWS warns spot nodes 120 s ahead): the ranks save when the deadline is this
    close (and two steps), then hold until the node is gone (raymoe.train.preemption)."""
    nan_tolerance: int = 5
    """Consecutive steps with a non-finite loss or gradient that are skipped before stopping."""
    storage: str = "runs"
    """Where runs live: a local directory or an s3:// prefix."""
    run_name: str = ""
    """Defaults to the config's name; the same name and storage resume a run."""
    peak_flops: float = 0.0
    """Per-worker peak FLOP/s for MFU; 0 looks the GPU up (none on CPU)."""
    precision: Precision = "auto"
    """Compute precision: bf16 autocast (routers and log-probabilities in fp32; FSDP gathers
    bf16 parameters) or plain fp32. auto: bf16 on GPU, and on a CPU with native bf16 from
    model.d_model 256 on, where it is faster (raymoe.model.precision); bf16 on a CPU
    without native bf16 is an error."""


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        """Cross-field rules; raises ConfigError naming the offending key."""
        m, moe, par = self.model, self.model.moe, self.parallel
        _require(m.d_model % m.n_head == 0, "model.n_head",
                 f"{m.n_head} heads do not divide model.d_model={m.d_model}")
        for key in ("vocab_size", "seq_len", "n_layer", "d_model", "n_head", "ffn_mult", "pad_vocab_to"):
            _require(getattr(m, key) > 0, f"model.{key}", "must be > 0")
        _require(m.init_std > 0, "model.init_std", "must be > 0")
        _require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _require(moe.num_experts >= 0, "model.moe.num_experts", "must be >= 0 (0 = dense)")
        _require(moe.every >= 1, "model.moe.every", "must be >= 1")
        _require(moe.capacity_factor > 0, "model.moe.capacity_factor",
                 f"must be > 0, got {moe.capacity_factor}")
        _require(moe.eval_capacity_factor > 0, "model.moe.eval_capacity_factor",
                 f"must be > 0, got {moe.eval_capacity_factor}")
        _require(moe.min_capacity >= 0, "model.moe.min_capacity", "must be >= 0")
        _require(moe.top_k in (1, 2), "model.moe.top_k", f"must be 1 or 2, got {moe.top_k}")
        _require(moe.bias_update_rate >= 0, "model.moe.bias_update_rate",
                 f"must be >= 0 (0 = off), got {moe.bias_update_rate}")
        if moe.enabled:
            _require(moe.top_k <= moe.num_experts, "model.moe.top_k",
                     f"top_k={moe.top_k} exceeds model.moe.num_experts={moe.num_experts}")
            _require(moe.num_experts % par.ep_size == 0, "parallel.ep_size",
                     f"model.moe.num_experts={moe.num_experts} is not divisible by "
                     f"parallel.ep_size={par.ep_size}")
        else:
            _require(par.ep_size == 1, "parallel.ep_size", "must be 1 for a dense model")
        t = self.train
        _require(t.micro_batch >= 1, "train.micro_batch", "must be >= 1")
        _require(not t.checkpoint_staging or os.path.isabs(os.path.expanduser(t.checkpoint_staging)),
                 "train.checkpoint_staging", f"{t.checkpoint_staging!r} is not an absolute local "
                 "path (each worker stages its checkpoint files on its own disk, then they are "
                 "uploaded to train.storage)")
        for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "nan_tolerance"):
            _require(getattr(t, key) >= 1, f"train.{key}", "must be >= 1")
        _require(t.checkpoint_every_minutes >= 0, "train.checkpoint_every_minutes",
                 f"must be >= 0 (0: by steps only), got {t.checkpoint_every_minutes}")
        _require(t.preemption_save_seconds >= 0, "train.preemption_save_seconds",
                 f"must be >= 0, got {t.preemption_save_seconds}")
        for key in ("max_failures", "max_preemptions"):
            _require(getattr(t, key) >= -1, f"train.{key}", f"must be >= 0, or -1 for no limit, got {getattr(t, key)}")
        _require(par.ep_size >= 1, "parallel.ep_size", "must be >= 1")
        if par.elastic:
            _validate_elastic(self)
        else:
            _require(par.min_workers >= 1, "parallel.num_workers",
                     f"expected a number >= 1 or [MIN, MAX] with 1 <= MIN <= MAX, got {par.num_workers}")
            _require(par.min_workers % par.ep_size == 0, "parallel.ep_size",
                     f"parallel.ep_size={par.ep_size} must divide parallel.num_workers={par.num_workers}")
            _require(t.global_batch % (t.micro_batch * par.min_workers) == 0, "train.global_batch",
                     f"{t.global_batch} is not a multiple of train.micro_batch x parallel.num_workers "
                     f"= {t.micro_batch} x {par.num_workers}")
        d = self.data
        _require(not (d.path and d.blend), "data.blend", "give data.path or data.blend, not both")
        for i, entry in enumerate(d.blend):
            _require(bool(entry.path), f"data.blend[{i}].path", "must name a prepared dataset")
            _require(entry.weight > 0, f"data.blend[{i}].weight", f"must be > 0, got {entry.weight}")
        _require(d.shuffle_window >= 1, "data.shuffle_window", "must be >= 1 shard")
        for name, path in d.extra_validation.items():
            key = f"data.extra_validation.{name}"
            _require(EXTRA_VALIDATION_NAME.fullmatch(name) is not None, key,
                     f"the name {name!r} must be letters, digits, _ or - (the metric is val_loss/NAME)")
            _require(bool(path), key, "must name a prepared dataset (a directory or s3:// prefix)")
        o = self.optim
        _require(o.lr > 0, "optim.lr", "must be > 0")
        _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 turns clipping off)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _validate_elastic(cfg: Config) -> None:
    """[MIN, MAX]: every size from MIN up must be able to train (raymoe.train.elastic plans
    each), so MIN itself must keep the global batch."""
    par, t = cfg.parallel, cfg.train
    low, high = par.min_workers, par.max_workers
    _require(1 <= low <= high, "parallel.num_workers",
             f"expected [MIN, MAX] with 1 <= MIN <= MAX, got [{low}, {high}]")
    _require(t.global_batch % t.micro_batch == 0, "train.global_batch",
             f"{t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}")
    micro_batches = t.global_batch // t.micro_batch
    _require(micro_batches % low == 0, "parallel.num_workers",
             f"MIN={low} workers cannot keep the global batch: its {micro_batches} micro-batches "
             f"(train.global_batch / train.micro_batch = {t.global_batch} / {t.micro_batch}) do "
             f"not split evenly over {low}; choose a MIN that divides {micro_batches}")
    _require(par.resize_check_seconds > 0, "parallel.resize_check_seconds",
             f"must be > 0, got {par.resize_check_seconds}")


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns it (numbers widened)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        kinds = " or ".join(_describe(a) for a in args if a is not type(None))
        raise ConfigError(f"{key}: expected {kinds}, got {value!r}")
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of NAME: value, got {value!r}")
        return {_coerce(k, key_type, f"{key}.{k}"): _coerce(v, value_type, f"{key}.{k}")
                for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        number = _as_number(value)
        if number is None:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        if tp is int:
            if float(number) != int(number):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            return int(number)
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _describe(tp: Any) -> str:
    """A type as a config file spells it: int, [int, int], a list of str."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "[" + ", ".join(_describe(a) for a in typing.get_args(tp)) + "]"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _as_number(value: Any) -> float | int | None:
    """Numbers, and strings like '300e9' (YAML 1.1 reads those as strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint} (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "").validate()


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``model.moe.num_experts=32`` -> {'model': {'moe': {'num_experts': 32}}}."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, for example model.n_layer=12")
    key, _, raw_value = text.partition("=")
    value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(source: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset name or a YAML file, then dotted overrides, validated.

    A YAML file may name a preset to start from with ``preset: NAME``.
    """
    raw = _raw_source(source)
    for text in overrides:
        raw = _deep_merge(raw, parse_override(text))
    return config_from_dict(raw)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``cfg`` with dotted overrides applied, validated."""
    raw = cfg.to_dict()
    for text in overrides:
        raw = _deep_merge(raw, parse_override(text))
    return config_from_dict(raw)


def _raw_source(source: str) -> dict[str, Any]:
    if source in PRESETS:
        return PRESETS[source]
    path = Path(source)
    if not path.is_file():
        close = difflib.get_close_matches(source, list(PRESETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file{hint}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    base_name = raw.pop("preset", None)
    if base_name is None:
        return raw
    if base_name not in PRESETS:
        raise ConfigError(f"{path}: preset: {base_name!r} is not one of {', '.join(PRESETS)}")
    return _deep_merge(PRESETS[base_name], raw)


# ---------------------------------------------------------------------------- presets


def _reference(name: str, n_layer: int, d_model: int, n_head: int, *, lr: float, batch: int,
               init_std: float = 0.014, experts: int = 0,
               grad_sync: str = "last_micro_batch") -> dict[str, Any]:
    """A model of the DeepSpeed-MoE NLG paper with the public scripts' recipe (activation
    checkpointing on, as they ran), sharded (FSDP) so that it fits an A100 40 GB; on 128
    GPUs, elastic down to 64 (spot nodes), checkpointing every 30 minutes. Every model
    trains 300B tokens; the scripts decay a dense model's learning rate over 260B of them
    (GPT-3's schedule) to 10% of its peak, a MoE model's over all 300B to 1%."""
    moe = {"num_experts": experts, "every": 2, "top_k": 1, "capacity_factor": 1.0,
           "eval_capacity_factor": 1.0, "min_capacity": 4, "drop_tokens": True,
           "use_rts": True, "loss_coef": 0.01}
    decay_tokens = 300_000_000_000 if experts else 260_000_000_000
    return {
        "name": name,
        "model": {"vocab_size": 50257, "pad_vocab_to": 128, "seq_len": 2048, "n_layer": n_layer,
                  "d_model": d_model, "n_head": n_head, "init_std": init_std,
                  "activation_checkpointing": True, "moe": moe},
        "parallel": {"num_workers": [64, 128], "ep_size": min(experts, 128) if experts else 1,
                     "use_gpu": True, "shard": "fsdp", "grad_sync": grad_sync},
        "optim": {"lr": lr, "min_lr_ratio": 0.01 if experts else 0.1, "betas": [0.9, 0.95],
                  "weight_decay": 0.1, "grad_clip": 1.0, "warmup_tokens": 375_000_000,
                  "decay_tokens": decay_tokens},
        "train": {"global_batch": batch, "micro_batch": 2 if batch == 256 else 4,
                  "total_tokens": 300_000_000_000, "checkpoint_every_minutes": 30,
                  "checkpoint_staging": "/mnt/nvme/raymoe"},  # the NVMe RAID of cluster/aws.yaml
    }


def _tiny(name: str, *, d_model: int = 128, n_layer: int = 4, experts: int = 0) -> dict[str, Any]:
    """Models that train on 2 CPU cores in minutes, with a byte-level vocabulary."""
    return {
        "name": name,
        "model": {"vocab_size": 257, "pad_vocab_to": 128, "seq_len": 128, "n_layer": n_layer,
                  "d_model": d_model, "n_head": 4, "init_std": 0.02,
                  "moe": {"num_experts": experts, "every": 2, "min_capacity": 4}},
        "parallel": {"num_workers": 2, "ep_size": 1, "use_gpu": False, "cpus_per_worker": 0.5},
        "optim": {"lr": 2e-3, "min_lr_ratio": 0.1, "warmup_tokens": 50_000,
                  "decay_tokens": 5_000_000},
        "train": {"global_batch": 16, "micro_batch": 8, "total_tokens": 5_000_000,
                  "log_every": 10, "eval_every": 100, "eval_batches": 4, "checkpoint_every": 100},
    }


PRESETS: dict[str, dict[str, Any]] = {
    "gpt-350m": _reference("gpt-350m", 24, 1024, 16, lr=3e-4, batch=256),
    "gpt-1.3b": _reference("gpt-1.3b", 24, 2048, 16, lr=2e-4, batch=512),
    # two micro-batches per step at 128 workers: 27 GB of unsharded gradients would not fit
    "gpt-6.7b": _reference("gpt-6.7b", 32, 4096, 32, lr=1.2e-4, batch=1024, init_std=0.01,
                           grad_sync="every_micro_batch"),
    "gpt-350m-moe128": _reference("gpt-350m-moe128", 24, 1024, 16, lr=2e-4, batch=256, experts=128),
    "gpt-1.3b-moe128": _reference("gpt-1.3b-moe128", 24, 2048, 16, lr=1.2e-4, batch=512,
                                  experts=128),
    "tiny": _tiny("tiny"),
    "tiny-moe8": _tiny("tiny-moe8", experts=8),
}
