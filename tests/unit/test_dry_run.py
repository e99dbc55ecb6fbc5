"""True-scale dry runs (issue 13, item 5): OPT-66B and Llama-2-70B built on the meta device, sharded
as FSDP2 (``fully_shard`` on torch's fake process group) and DeepSpeed ZeRO-3 (its partition
arithmetic) shard them for 8 and 64 ranks; every tensor's shard views, as zoscale's providers and
a MeZO optimizer give them on each rank, tile its global indices exactly once, the stable ids are
unique and the noise keys differ per tensor. No weight is allocated."""

from __future__ import annotations

import pytest

from zoscale import dry_run
from zoscale.dry_run import check_layout, meta_model
from zoscale.model_configs import BUILTIN_CONFIGS, builtin_config

# Published parameter counts (tied embeddings counted once).
PARAMS = {"opt-66b": 65_719_701_504, "llama-2-70b": 68_976_648_192}


@pytest.fixture(scope="module")
def models():
    return {name: meta_model(builtin_config(name)) for name in PARAMS}


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("engine,world", [("zero3", 8), ("zero3", 64), ("fsdp", 8)])
def test_shard_views_tile_every_tensor_once_at_true_scale(models, name: str, engine: str, world: int) -> None:
    report = check_layout(models[name], engine, world)
    assert report.elements == PARAMS[name]
    assert report.views >= report.tensors * world - 1  # at most FSDP2's empty tail rows go without a view
    assert report.largest_view * world >= max(p.numel() for p in models[name].parameters())


@pytest.mark.extended
@pytest.mark.parametrize("name", list(PARAMS))
def test_fsdp2_on_64_ranks(models, name: str) -> None:  # ~25 s each: fully_shard once per rank
    assert check_layout(models[name], "fsdp", 64).elements == PARAMS[name]


def test_a_wrong_partition_is_caught(models, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check fails for a provider that places every rank's partition where rank 0's is."""
    import zoscale.engines.deepspeed as ds

    right = ds._partition
    monkeypatch.setattr(ds, "_partition", lambda p: (0, *right(p)[1:]))
    with pytest.raises(AssertionError, match="held twice"):
        check_layout(models["llama-2-70b"], "zero3", 8)


def test_the_built_in_configs() -> None:
    counts = {name: sum(p.numel() for p in meta_model(builtin_config(name)).parameters())
              for name in ("opt-1.3b", "llama-2-7b", "llama-3-8b")}
    assert counts == {"opt-1.3b": 1_315_758_080, "llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248}
    assert len(BUILTIN_CONFIGS) == 11
    with pytest.raises(ValueError, match="unknown built-in model 'opt-175b'.*opt-66b"):
        builtin_config("opt-175b")
