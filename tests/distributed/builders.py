"""The tiny models, batches and engines that the distributed tests build on every rank.

Every spawned rank and the in-process reference must build the same model and batch to the bit,
so they are seeded here once: the tiny Llama with 263 vocabulary rows (FSDP2 shards them
unevenly, 132 + 131; tied embeddings), a 5 -> 7 -> n MLP whose odd sizes make ZeRO-3 cut rows and
FSDP2 leave empty shards, token batches from seed 3. And the engines around them: ZeRO-3 with
every tensor sharded (persistence threshold 0), FSDP2 over all ranks, and the full parameters
gathered back from either. DeepSpeed and FSDP2 are imported only when an engine is built.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from zoscale.models import tiny_llama

BATCH, SEQ, VOCAB = 8, 12, 263
MODELS = ("llama", "mlp")


def llama() -> torch.nn.Module:
    return tiny_llama(vocab_size=VOCAB, seed=0)


def mlp(outputs: int) -> torch.nn.Module:
    """5 -> 7 -> ``outputs``, seeded 0 (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, outputs))


def token_ids(vocab: int = VOCAB) -> torch.Tensor:
    """BATCH x SEQ token ids in [2, vocab)."""
    return torch.randint(2, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def rank_part(rank: int, world: int, batch: int = BATCH) -> slice:
    """This rank's rows of a global batch."""
    return slice(rank * batch // world, (rank + 1) * batch // world)


def lm_loss(forward: Callable[..., Any], ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: forward(input_ids=ids, labels=ids).loss


# ------------------------------------------------- "llama" or "mlp": the tiny Llama or a 1-output regression
def model(kind: str) -> torch.nn.Module:
    return llama() if kind == "llama" else mlp(1)


def batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of BATCH rows: token ids twice, or 5 features and one regression target."""
    if kind == "llama":
        ids = token_ids()
        return ids, ids
    g = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 1, generator=g)


def loss(kind: str, forward: Callable[..., Any], x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The closure: the language-model loss, or the MLP's mean squared error."""
    if kind == "llama":
        return lm_loss(forward, x)
    return lambda: torch.nn.functional.mse_loss(forward(x), y)


# ------------------------------------------------- data-parallel replicas: a float64 classifier
def replica_mlp() -> torch.nn.Module:
    """6 -> 8 -> 3 in float64, seeded 0."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def replica_batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` float64 inputs of 6 features and class labels in [0, 3)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (rows,), generator=g)


# ------------------------------------------------- engines
def zero3_config(micro: int, persist: int | None = 0) -> dict[str, Any]:
    """A ZeRO-3 config without optimizer section; ``persist`` None keeps DeepSpeed's default threshold."""
    zero: dict[str, Any] = {"stage": 3}
    if persist is not None:
        zero["stage3_param_persistence_threshold"] = persist
    return {"train_micro_batch_size_per_gpu": micro, "zero_optimization": zero}


def zero3(module: torch.nn.Module, micro: int, optimizer: type, persist: int | None = 0,
          **options: Any) -> tuple[Any, Any]:
    """``(engine, optimizer)``: ``module`` on ZeRO-3, ``optimizer(named, **options)`` on its shards."""
    from zoscale.engines import zero3_engine

    return zero3_engine(module, zero3_config(micro, persist), optimizer=lambda named: optimizer(named, **options))


def fsdp(module: torch.nn.Module, optimizer: type, mesh: Any = None, **options: Any) -> tuple[torch.nn.Module, Any]:
    """``(module, optimizer)``: ``module`` under FSDP2 (default mesh: all ranks), the optimizer on its shards."""
    from zoscale.engines import FSDPShards, apply_fsdp, build_mesh

    module = apply_fsdp(module, mesh if mesh is not None else build_mesh())
    return module, optimizer(module.named_parameters(), shards=FSDPShards(module=module), **options)


def full_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the whole parameters, gathered from ZeRO-3 partitions or FSDP2 shards (every rank must call)."""
    from torch.distributed.tensor import DTensor

    named = list(module.named_parameters())
    if any(hasattr(p, "ds_shape") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone().reshape(p.ds_shape) for n, p in named}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named}


def whole_views(provider: Any, params: list[torch.Tensor]) -> list[bool]:
    """Per parameter, whether ``provider``'s view is the whole tensor in the parameter's own storage.

    Raises AssertionError if the provider claims ``capabilities.whole_parameters`` and a view is not
    (collective for providers whose first view of a persistent ZeRO-3 parameter all-gathers).
    """
    views = [provider.view(p) for p in params]
    whole = [v.replicated and v.offset == 0 and v.local.numel() == v.numel and v.local.data_ptr() == p.data_ptr()
             for v, p in zip(views, params)]
    if provider.capabilities.whole_parameters:
        assert all(whole), (type(provider).__name__, whole)
    return whole


def assert_ranks_agree(runs: list[dict[str, Any]], label: Any, params: str = "params") -> None:
    """Every rank's run saw the same averaged losses (``"losses"``) and ends with the same full
    tensors (``runs[r][params]``), bit for bit."""
    first = runs[0]
    for other in runs[1:]:
        assert other["losses"] == first["losses"], label
        assert other[params].keys() == first[params].keys(), label
        for n, p in first[params].items():
            assert torch.equal(p, other[params][n]), (label, n)


def assert_near_one_process(run: dict[str, Any], ref_losses: list[float], ref_params: dict[str, torch.Tensor],
                            atol: float, label: Any, rel: float = 1e-5, params: str = "params") -> None:
    """A sharded run against one process on the whole batch: losses within ``rel``, every tensor
    of ``ref_params`` within ``atol`` (the callers say why their bounds hold)."""
    import pytest

    assert run["losses"] == pytest.approx(ref_losses, rel=rel, abs=0), label
    assert set(run[params]) == set(ref_params), label
    for n, p in ref_params.items():
        torch.testing.assert_close(run[params][n], p, rtol=0, atol=atol, msg=f"{label} {n}")
