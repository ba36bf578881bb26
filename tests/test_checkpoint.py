"""The checkpoint: any (world, EP size, shard mode) loads any checkpoint, optimizer
included, and the next steps match an uninterrupted run; incomplete checkpoints (a manifest
missing, or a file it lists) are ignored; another model's checkpoint is refused by name."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_distributed
from test_expert_parallel import build, global_batch, shards, tiny_config

from raymoe.model import GPT
from raymoe.parallel import Mesh
from raymoe.parallel.build import build_model
from raymoe.parallel.checkpoint import load_checkpoint, save_checkpoint
from raymoe.runs import CheckpointError, find_checkpoint, latest_checkpoint, resumable, step_directory
from raymoe.train.optim import build_optimizer
from raymoe.train.step import train_step

NO_DROP = False  # without dropping, capacity (a function of local tokens) cannot matter
MICRO_BATCHES = 4  # every world size sees the same micro-batches, so l_aux terms agree


def my_micro_batches(cfg, seed: int, rank: int, world: int):
    per_rank = MICRO_BATCHES // world
    return shards(global_batch(cfg, seed), MICRO_BATCHES)[rank * per_rank:(rank + 1) * per_rank]


def continue_training(model, opt, mesh, cfg, rank: int, world: int) -> list[float]:
    """Steps 3 and 4: the step-4 loss depends on the optimizer state used by step 3."""
    return [train_step(model, opt, mesh, my_micro_batches(cfg, seed, rank, world), 1.0).loss
            for seed in (3, 4)]


def setup(ep: int, shard: str, seed: int = 0):
    cfg = tiny_config(NO_DROP)
    cfg.parallel.shard = shard
    mesh = Mesh(ep)
    torch.manual_seed(seed)
    model = build_model(cfg, mesh, torch.device("cpu"))  # as training builds it
    return cfg, mesh, model, build_optimizer(model, cfg.optim)


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def snapshot(model: GPT, opt, mesh: Mesh) -> dict:
    """Parameters and optimizer state gathered whole (experts: this EP rank's block)."""
    return {"params": {n: whole(p) for n, p in model.named_parameters()},
            "optim": {n: {k: whole(v) for k, v in opt.state[p].items()}
                      for n, p in model.named_parameters()},
            "experts": list(mesh.global_expert_ids(model.cfg.moe.num_experts))}


def train_save_continue(rank: int, world: int, ep: int, shard: str, root: str) -> dict:
    """Two steps, save, two more: returns the state at the save and the last losses."""
    cfg, mesh, model, opt = setup(ep, shard)
    for seed in (1, 2):
        train_step(model, opt, mesh, my_micro_batches(cfg, seed, rank, world), 1.0)
    save_checkpoint(step_directory(root, 2), model, mesh, opt, extra={"step": 2})
    return {"saved": snapshot(model, opt, mesh),
            "losses": continue_training(model, opt, mesh, cfg, rank, world)}


def load_and_continue(rank: int, world: int, ep: int, shard: str, root: str,
                      resave_to: str | None = None) -> dict:
    """Load into other weights (the load must overwrite them all), optionally save again
    in this layout, then two steps."""
    cfg, mesh, model, opt = setup(ep, shard, seed=123)
    extra = load_checkpoint(latest_checkpoint(root), model, mesh, opt)
    if resave_to is not None:
        save_checkpoint(step_directory(resave_to, 2), model, mesh, opt, extra=extra)
    return {"loaded": snapshot(model, opt, mesh) | {"extra": extra},
            "losses": continue_training(model, opt, mesh, cfg, rank, world)}


def full_view(rank_states: list[dict], key: str) -> dict[str, dict]:
    """Reassemble per-expert entries by global id from the ranks' slices."""
    out: dict[str, dict] = {}
    for state in rank_states:
        for name, value in state[key].items():
            if ".experts." not in name:
                out[name] = value
                continue
            for i, gid in enumerate(state["experts"]):
                out[f"{name}#{gid}"] = ({k: (v[i] if v.ndim else v) for k, v in value.items()}
                                        if isinstance(value, dict) else value[i])
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            assert a[name].keys() == b[name].keys(), name
            for k in a[name]:
                assert torch.allclose(a[name][k], b[name][k], atol=1e-7), (name, k)
        else:
            assert torch.allclose(a[name], b[name], atol=1e-7), name


def assert_loaded_as_saved(saved: list[dict], loaded: list[dict]) -> None:
    for key in ("params", "optim"):
        assert_same(full_view([r["saved"] for r in saved], key),
                    full_view([r["loaded"] for r in loaded], key))
    for rank in loaded:
        assert rank["losses"] == pytest.approx(saved[0]["losses"], abs=1e-5)


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory):
    """Written sharded (FSDP) at world 4, EP 2."""
    root = tmp_path_factory.mktemp("ckpt")
    results = run_distributed(train_save_continue, 4, root, 2, "fsdp", str(root / "run"))
    return root / "run", results


@pytest.mark.slow  # 4 processes: minutes on 2 cores
def test_fsdp_world_4_ep_2_loads_in_one_process(fsdp_checkpoint):
    root, saved = fsdp_checkpoint
    loaded = load_and_continue(0, 1, 1, "none", str(root))
    assert loaded["loaded"]["extra"] == {"step": 2}
    assert_loaded_as_saved(saved, [loaded])


@pytest.mark.slow  # 4 processes: minutes on 2 cores
def test_fsdp_world_4_ep_2_to_unsharded_world_2_ep_1_and_back(fsdp_checkpoint, tmp_path):
    root, saved = fsdp_checkpoint
    back = tmp_path / "back"
    loaded = run_distributed(load_and_continue, 2, tmp_path, 1, "none", str(root), str(back))
    assert_loaded_as_saved(saved, loaded)
    again = run_distributed(load_and_continue, 4, tmp_path, 4, "fsdp", str(back))
    assert_loaded_as_saved(saved, again)


def test_checkpoint_without_manifest_is_ignored(tmp_path):
    cfg = tiny_config(True)
    mesh = Mesh(1)
    model, opt = build(cfg, mesh)
    save_checkpoint(step_directory(tmp_path, 1), model, mesh, opt)
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    save_checkpoint(step_directory(tmp_path, 2), model, mesh, opt)
    (step_directory(tmp_path, 2) / "manifest.json").unlink()  # a crash before the manifest
    assert latest_checkpoint(str(tmp_path)) == str(step_directory(tmp_path, 1))
    with pytest.raises(CheckpointError, match="no manifest.json; the checkpoint is incomplete"):
        load_checkpoint(step_directory(tmp_path, 2), model, mesh)
    fresh, _ = build(cfg, mesh)
    load_checkpoint(latest_checkpoint(str(tmp_path)), model, mesh)
    assert torch.equal(model.wte.weight, fresh.wte.weight)


def test_checkpoint_of_another_shape_names_the_parameter(tmp_path):
    mesh = Mesh(1)
    model, _ = build(tiny_config(True), mesh)
    save_checkpoint(tmp_path / "c", model, mesh)
    wider = tiny_config(True)
    wider.model.d_model = 64
    other, _ = build(wider, mesh)
    with pytest.raises(CheckpointError, match=r"parameter wte.weight has shape \(384, 32\) in the "
                                              r"checkpoint but \(384, 64\) in the model"):
        load_checkpoint(tmp_path / "c", other, mesh)
    more_experts = tiny_config(True)
    more_experts.model.moe.num_experts = 16
    other, _ = build(more_experts, mesh)
    with pytest.raises(CheckpointError, match=r"blocks.0.mlp.router.weight has shape \(8, 32\)"):
        load_checkpoint(tmp_path / "c", other, mesh)
    dense = tiny_config(True)
    dense.model.moe.num_experts = 0
    other, _ = build(dense, mesh)
    with pytest.raises(CheckpointError, match="checkpoint of another model: missing parameters"):
        load_checkpoint(tmp_path / "c", other, mesh)


def test_missing_data_file_is_named(tmp_path):
    mesh = Mesh(1)
    model, _ = build(tiny_config(True), mesh)
    save_checkpoint(tmp_path / "c", model, mesh)
    (tmp_path / "c" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="could not be read: .*__0_0.distcp"):
        load_checkpoint(tmp_path / "c", model, mesh)


def test_a_checkpoint_missing_or_short_a_listed_file_is_not_complete(tmp_path):
    """As an upload cut short leaves it: the manifest in storage, another rank's file
    missing or partly written. Resume and eval skip it and say why."""
    mesh = Mesh(1)
    model, opt = build(tiny_config(True), mesh)
    for step in (1, 2, 3):
        save_checkpoint(step_directory(tmp_path, step), model, mesh, opt)
    (step_directory(tmp_path, 3) / "__0_0.distcp").unlink()
    metadata = step_directory(tmp_path, 2) / ".metadata"
    size = metadata.stat().st_size
    metadata.write_bytes(metadata.read_bytes()[:100])
    said: list[str] = []
    assert latest_checkpoint(str(tmp_path), log=said.append) == str(step_directory(tmp_path, 1))
    assert said == [f"skipping the incomplete checkpoint {step_directory(tmp_path, 3)}: missing __0_0.distcp",
                    f"skipping the incomplete checkpoint {step_directory(tmp_path, 2)}: incomplete "
                    f".metadata (100 of {size} bytes)"]
    said.clear()
    assert resumable(str(step_directory(tmp_path, 3)), log=said.append) == str(step_directory(tmp_path, 1))
    assert said[-1] == (f"not resuming from {step_directory(tmp_path, 3)}: incomplete (missing "
                        f"__0_0.distcp); resuming from {step_directory(tmp_path, 1)}, the latest "
                        "complete checkpoint before it")
    with pytest.raises(CheckpointError, match="an incomplete checkpoint: missing __0_0.distcp"):
        find_checkpoint(str(step_directory(tmp_path, 3)))
    assert find_checkpoint(str(tmp_path), log=said.append) == str(step_directory(tmp_path, 1))
