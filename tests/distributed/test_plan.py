"""The memory planner against measurement (issue 13, item 4): for three Llama sizes (one with
grouped-query attention and tied embeddings) on DeepSpeed ZeRO-3 and on FSDP2 with 1, 2 and 4
gloo ranks, ``zoscale.plan`` predicts each rank's peak tensor bytes of a MeZO step (shard +
everything the step allocates, from the profiler's memory events) within 10%. One spawn per
(engine, world) measures all three sizes in turn."""

from __future__ import annotations

import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import gc  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.distributed.spawn import run  # noqa: E402
from tests.distributed.tensor_peak import tensor_peak_bytes  # noqa: E402
from zoscale.plan import PlanConfig, model_shape, plan  # noqa: E402

pytestmark = pytest.mark.distributed

BATCH, SEQ = 8, 32  # global batch, split over the ranks
SIZES = {  # 0.46M, 10.5M and 19.5M parameters
    "0.5M": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=2048, tie_word_embeddings=False),
    "10M": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False),
    "20M-gqa-tied": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=True),
}
TOLERANCE = 0.10


def _config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=256, rms_norm_eps=1e-5, **SIZES[size])


def _engine(kind: str, size: str, world: int):
    """(forward module, MeZO optimizer) of a random-weight model of ``size`` on ``kind``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "fsdp":
        from zoscale.engines import FSDPEngine
        from zoscale.optim import MeZO

        model = LlamaForCausalLM._from_config(_config(size))
        engine = FSDPEngine(model)
        return engine.module, MeZO(engine.module.named_parameters(), lr=1e-6, eps=1e-3, shards=engine.shards)
    from transformers.integrations import HfDeepSpeedConfig

    from tests.distributed.cpu_deepspeed import import_deepspeed
    from zoscale.engines import zero3_engine

    import_deepspeed()
    cfg = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "steps_per_print": 1 << 30, "optimizer": {"type": "MeZO", "params": {"lr": 1e-6, "eps": 1e-3}}}
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841  (alive while the model is built: partitioned at build)
    engine, opt = zero3_engine(LlamaForCausalLM._from_config(_config(size)), cfg)
    return engine, opt


def _shard_bytes(module: torch.nn.Module) -> int:
    total = 0
    for p in module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        total += t.numel() * t.element_size()
    return total


def _measure(rank: int, world: int, kind: str, out: str) -> None:
    records = {}
    for size in SIZES:
        fwd, opt = _engine(kind, size, world)
        module = getattr(fwd, "module", fwd)
        module.config.use_cache = False
        ids = torch.randint(0, SIZES[size]["vocab_size"], (BATCH // world, SEQ), generator=torch.Generator().manual_seed(1))

        def closure() -> torch.Tensor:
            with torch.no_grad():
                return fwd(input_ids=ids, labels=ids).loss

        opt.step(closure)  # the first step records DeepSpeed's trace and makes any state
        records[size] = {"shard": _shard_bytes(module), "step": tensor_peak_bytes(lambda: opt.step(closure))}
        del fwd, opt, module
        gc.collect()
    if rank == 0:
        Path(out).write_text(json.dumps(records))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_predicted_peak_is_within_10_percent_of_the_measured(tmp_path: Path, kind: str, world: int) -> None:
    out = tmp_path / "measured.json"
    run(_measure, world, kind, str(out))
    measured = json.loads(out.read_text())
    for size, rec in measured.items():
        p = plan(model_shape(_config(size)), PlanConfig(engine=kind, world=world, dtype="fp32",
                                                         micro_batch=BATCH // world, seq_len=SEQ))
        assert p.parts["weight_shard"] == rec["shard"], size  # the padding arithmetic is exact
        got = rec["shard"] + rec["step"]
        assert abs(p.peak / got - 1) <= TOLERANCE, (
            f"{kind} x{world} {size}: predicted {p.peak / 2**20:.2f} MiB ({p.peak_stage}: {p.parts}), "
            f"measured {got / 2**20:.2f} MiB")
