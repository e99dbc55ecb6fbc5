"""The memory planner behind ``zoscale plan``: per-rank memory of a ZO run, by part, before renting GPUs.

For a Hugging Face decoder config (Llama/Mistral/Qwen-style or OPT) x engine x world size x dtype
x master weights x PEFT x optimizer x micro-batch x sequence length it predicts each rank's peak
tensor bytes of one ZO step, split into parts:

* ``weight_shard``: the rank's slice of every parameter, with the engine's padding (FSDP2 pads
  dim 0 of each tensor to a multiple of the shard ranks, ZeRO-3 pads each flat tensor; ZeRO-3
  keeps parameters under ``stage3_param_persistence_threshold`` whole on every rank);
* ``master``: one fp32 copy of the trainable shard (``master_weights``);
* ``optimizer_state``: what the optimizer keeps or holds during a query (:data:`STATE_BYTES`);
* ``gathered``: full parameters alive at the peak moment (the engines' working set, prefetch
  included): FSDP2 holds the root module's parameters (embeddings, final norm, head) for the
  whole forward plus one block at a time; ZeRO-3 prefetches ``stage3_prefetch_bucket_size``
  elements ahead, so a model under that size is gathered whole at its first module;
* ``comm_buffers``: the all-gathers' own output buffers (FSDP2 keeps the previous all-gather's
  until the next one has copied out; ZeRO-3's flat coalesced buffer while it copies out), on 2+
  shard ranks;
* ``activations``: the live tensors of one no-grad forward at its peak: a block's attention or
  MLP, or the head (logits, their fp32 upcast, and cross-entropy's log-softmax over the vocabulary).

The peak is the largest of the forward's stages (:func:`stages`), each a sum of parts. The model
is validated against the profiler's tensor bytes of real steps (``tests/distributed/test_plan.py``,
three sizes x both engines x 1/2/4 ranks) and explained in the README. Traffic per step uses the
measured formulae of the README's scaling section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ENGINES", "OPTIMIZERS", "PEFT_TYPES", "STATE_BYTES", "ModelShape", "PlanConfig", "Plan",
           "model_shape", "plan", "format_plan"]

ENGINES = ("zero3", "fsdp", "hsdp", "replicas")
PEFT_TYPES = ("none", "lora", "prefix", "prompt")
#: Optimizer -> (bytes per trainable shard element in the accumulation dtype, bytes per element
#: regardless of dtype, low-rank factors?). ZO-Adam keeps two moments, ZO-SGD-MMT one momentum,
#: Sparse MeZO a 1-bit mask during a query, LOZO its factors U (shard rows x r) and V (cols x r)
#: during a query, LOZO-M also a momentum of U's shape.
STATE_BYTES: dict[str, tuple[int, float, int]] = {
    "mezo": (0, 0.0, 0), "lezo": (0, 0.0, 0), "zo_sgd_sign": (0, 0.0, 0), "zo_sgd_cons": (0, 0.0, 0),
    "blockwise": (0, 0.0, 0), "zo_sgd_mmt": (1, 0.0, 0), "zo_adam": (2, 0.0, 0),
    "sparse_mezo": (0, 1 / 8, 0), "lozo": (0, 0.0, 2), "lozo_m": (0, 0.0, 3),
}
OPTIMIZERS = tuple(STATE_BYTES)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = float(1 << 30)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: parameter shapes by group, and the activation sizes."""

    name: str
    blocks: tuple[tuple[tuple[int, ...], ...], ...]  # per block, its parameters' shapes
    root: tuple[tuple[int, ...], ...]  # parameters outside the blocks (tied ones once)
    hidden: int
    heads: int
    kv_dim: int  # key/value width (heads' share for grouped-query attention)
    ffn: int
    vocab: int
    gated_mlp: bool  # Llama's SiLU(gate) * up; OPT's fc1 -> ReLU
    layers: int = 0

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Every parameter's shape, the root's first."""
        return [*self.root, *(s for b in self.blocks for s in b)]

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def model_shape(config: Any, name: str = "") -> ModelShape:
    """The :class:`ModelShape` of a ``transformers`` config, from its model built on the meta device."""
    from zoscale.dry_run import meta_model
    from zoscale.engines.fsdp import find_blocks

    model = meta_model(config)
    blocks = find_blocks(model)
    in_block = {id(p) for b in blocks for p in b.parameters()}
    root = tuple(tuple(p.shape) for p in model.parameters() if id(p) not in in_block)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    ffn = getattr(config, "intermediate_size", None) or config.ffn_dim
    return ModelShape(name=name or getattr(config, "name_or_path", "") or config.model_type,
                      blocks=tuple(tuple(tuple(p.shape) for p in b.parameters()) for b in blocks), root=root,
                      hidden=config.hidden_size, heads=heads, kv_dim=kv * head_dim, ffn=ffn,
                      vocab=config.vocab_size, gated_mlp=hasattr(config, "intermediate_size"), layers=len(blocks))


@dataclass(frozen=True)
class PlanConfig:
    """One configuration to plan (see ``launch/plan.py --help`` for each field)."""

    engine: str = "zero3"
    world: int = 8
    gpus_per_node: int = 8
    dtype: str = "bf16"
    master_weights: bool = False
    peft: str = "none"
    optimizer: str = "mezo"
    micro_batch: int = 1
    seq_len: int = 512
    lora_rank: int = 8
    virtual_tokens: int = 5
    lowrank_rank: int = 2
    queries: int = 1
    persistence_threshold: int = 0  # ZeRO-3: parameters with fewer elements stay whole
    prefetch_bucket: int = 50_000_000  # ZeRO-3 stage3_prefetch_bucket_size (DeepSpeed's default)
    max_live: int = 1_000_000_000  # ZeRO-3 stage3_max_live_parameters (DeepSpeed's default)

    def __post_init__(self) -> None:
        for key, value, allowed in (("engine", self.engine, ENGINES), ("dtype", self.dtype, tuple(DTYPES)),
                                    ("peft", self.peft, PEFT_TYPES), ("optimizer", self.optimizer, OPTIMIZERS)):
            if value not in allowed:
                raise ValueError(f"plan: {key} {value!r} is not one of {', '.join(allowed)}")
        for key in ("world", "gpus_per_node", "micro_batch", "seq_len", "queries"):
            if getattr(self, key) < 1:
                raise ValueError(f"plan: {key} must be >= 1, got {getattr(self, key)}")
        if self.engine == "hsdp" and self.world % self.gpus_per_node:
            raise ValueError(f"plan: HSDP needs world ({self.world}) to be a multiple of gpus_per_node "
                             f"({self.gpus_per_node})")

    @property
    def shard_world(self) -> int:
        """The ranks one parameter is sharded over."""
        return {"hsdp": self.gpus_per_node, "replicas": 1}.get(self.engine, self.world)

    @property
    def bytes(self) -> int:
        return DTYPES[self.dtype].itemsize


@dataclass
class Plan:
    """A plan's result: per-rank bytes by part at the peak stage, every stage, and the traffic."""

    model: str
    config: PlanConfig
    params: int
    trainable: int
    parts: dict[str, int]
    peak_stage: str
    stages: dict[str, int]
    traffic: dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "config": self.config.__dict__, "params": self.params,
                "trainable": self.trainable, "peak_bytes": self.peak, "peak_gib": round(self.peak / GIB, 3),
                "peak_stage": self.peak_stage, "parts_bytes": self.parts, "stages_bytes": self.stages,
                "traffic_bytes_per_step": self.traffic}


# ---------------------------------------------------------------------- shards
def _fsdp_shard(shape: tuple[int, ...], world: int) -> int:
    rows = -(-shape[0] // world) if shape else 1
    return rows * math.prod(shape[1:])


def _zero3_shard(shape: tuple[int, ...], world: int, threshold: int) -> int:
    numel = math.prod(shape)
    return numel if numel < threshold else -(-numel // world)


def _shard_elements(m: ModelShape, cfg: PlanConfig) -> int:
    w = cfg.shard_world
    if cfg.engine == "zero3":
        return sum(_zero3_shard(s, w, cfg.persistence_threshold) for s in m.shapes)
    return sum(_fsdp_shard(s, w) for s in m.shapes)


def _adapter_shapes(m: ModelShape, cfg: PlanConfig) -> list[tuple[int, ...]]:
    """peft's trainable parameters (zoscale's defaults: LoRA on q and v, prefix, prompt)."""
    if cfg.peft == "lora":
        r = cfg.lora_rank
        return [s for _ in range(m.layers) for s in ((r, m.hidden), (m.hidden, r), (r, m.hidden), (m.kv_dim, r))]
    if cfg.peft == "prefix":
        return [(cfg.virtual_tokens, m.layers * 2 * m.hidden)]
    if cfg.peft == "prompt":
        return [(cfg.virtual_tokens, m.hidden)]
    return []


# ---------------------------------------------------------------------- activations
def _block_activations(m: ModelShape, tokens: int, seq: int, micro: int, a: int) -> int:
    """Live bytes at a block's peak in a no-grad forward (the larger of attention and MLP)."""
    h, kv = m.hidden, m.kv_dim
    rope = (h + kv) if m.gated_mlp else 0  # rotated q and k
    expand = 2 * h if kv < h else 0  # repeat_kv for grouped-query attention
    attention = tokens * (2 * h + h + 2 * kv + rope + expand + h) + micro * m.heads * seq * seq
    mlp = tokens * (2 * h + (3 if m.gated_mlp else 2) * m.ffn)
    return max(attention, mlp) * a


def _head_activations(m: ModelShape, tokens: int, a: int) -> int:
    """Live bytes at the head: hidden states, logits, their fp32 upcast, the log-softmax."""
    upcast = 4 if a != 4 else 0
    return tokens * (2 * m.hidden * a + m.vocab * (a + upcast + 4))


# ---------------------------------------------------------------------- stages
def _engine_stages(m: ModelShape, cfg: PlanConfig, act_block: int, act_head: int) -> dict[str, dict[str, int]]:
    """Stage -> parts (gathered, comm_buffers, activations) of the forward on ``cfg``'s engine."""
    b, w = cfg.bytes, cfg.shard_world
    root = sum(math.prod(s) for s in m.root) * b
    block = max((sum(math.prod(s) for s in blk) for blk in m.blocks), default=0) * b
    if cfg.engine == "replicas" or (cfg.engine == "zero3" and w == 1):
        # Nothing to gather: a replica holds whole parameters; ZeRO-3 on one rank uses the
        # partition in place.
        held = {"gathered": 0, "comm_buffers": 0}
        return {"block": {**held, "activations": act_block}, "head": {**held, "activations": act_head}}
    if cfg.engine == "zero3":
        return _zero3_stages(m, cfg, act_block, act_head)
    return _fsdp_stages(w, root, block, act_block, act_head)


def _fsdp_stages(w: int, root: int, block: int, act_block: int, act_head: int) -> dict[str, dict[str, int]]:
    """FSDP2 (``fully_shard`` per block and on the root, resharding after forward). The root's
    parameters stay unsharded for the whole forward. On 2+ ranks each all-gather's output buffer
    lives until the next all-gather has copied out (FSDP2 keeps the previous all-gather's state),
    so a block's all-gather holds the previous buffer, its own and the unsharded block. On one
    rank the all-gather output is the unsharded parameter (no buffer)."""
    if w == 1:
        return {"block": {"gathered": root + block, "comm_buffers": 0, "activations": act_block},
                "head": {"gathered": root, "comm_buffers": 0, "activations": act_head}}
    return {"root all-gather": {"gathered": root, "comm_buffers": root, "activations": 0},
            "first block all-gather": {"gathered": root + block, "comm_buffers": root + block, "activations": 0},
            "block all-gather": {"gathered": root + block, "comm_buffers": 2 * block, "activations": 0},
            "block": {"gathered": root + block, "comm_buffers": block, "activations": act_block},
            "head": {"gathered": root, "comm_buffers": block, "activations": act_head}}


def _zero3_stages(m: ModelShape, cfg: PlanConfig, act_block: int, act_head: int) -> dict[str, dict[str, int]]:
    """ZeRO-3 on 2+ ranks. A model under the prefetch bucket is all-gathered whole (one coalesced
    buffer) at its first module and stays gathered (measured: 2x the model at that moment); a
    larger one holds the current leaf module plus up to a bucket ahead, bounded by ``max_live``
    (not measured here: every model small enough to run here is under the default bucket); and because DeepSpeed's ``reset_step`` zeroes its
    count of gathered parameters after each no-grad forward without releasing the prefetched ones,
    a ZO step's second forward can hold one more bucket (the ZO step's excess over a forward)."""
    b = cfg.bytes
    numel = m.params
    if numel <= cfg.prefetch_bucket:
        whole = numel * b
        return {"prefetch all": {"gathered": whole, "comm_buffers": whole, "activations": 0},
                "block": {"gathered": whole, "comm_buffers": 0, "activations": act_block},
                "head": {"gathered": whole, "comm_buffers": 0, "activations": act_head}}
    # DeepSpeed fetches leaf modules (each Linear), so the current fetch is at most the largest
    # parameter; its flat buffer is alive while it copies out.
    largest = max(math.prod(s) for s in m.shapes) * b
    bucket = min(cfg.prefetch_bucket, cfg.max_live) * b
    live = min(numel * b, largest + 2 * bucket)
    return {"fetch": {"gathered": live, "comm_buffers": largest, "activations": 0},
            "block": {"gathered": live, "comm_buffers": 0, "activations": act_block},
            "head": {"gathered": live, "comm_buffers": 0, "activations": act_head}}


def stages(m: ModelShape, cfg: PlanConfig) -> dict[str, dict[str, int]]:
    """Every stage of a ZO step's forward with its parts (the peak is the largest sum)."""
    per_rank = cfg.micro_batch
    tokens = per_rank * cfg.seq_len
    a = cfg.bytes
    return _engine_stages(m, cfg, _block_activations(m, tokens, cfg.seq_len, per_rank, a),
                          _head_activations(m, tokens, a))


# ---------------------------------------------------------------------- the plan
def _trainable_shard(m: ModelShape, cfg: PlanConfig) -> tuple[int, int, list[tuple[int, ...]]]:
    """(trainable elements in total, on this rank, the trainable 2-D shapes per rank for LOZO)."""
    adapters = _adapter_shapes(m, cfg)
    if adapters:  # small: replicated (FSDP2 shards them with their block; counted whole: an upper bound)
        return sum(math.prod(s) for s in adapters), sum(math.prod(s) for s in adapters), adapters
    w = cfg.shard_world
    local = [((-(-s[0] // w)),) + s[1:] for s in m.shapes]
    return m.params, _shard_elements(m, cfg), local


def _state_bytes(cfg: PlanConfig, elements: int, shapes: list[tuple[int, ...]]) -> int:
    per_acc, per_elem, factors = STATE_BYTES[cfg.optimizer]
    acc = 4 if cfg.bytes <= 4 else cfg.bytes
    total = per_acc * acc * elements + int(per_elem * elements)
    if factors:  # U: rows x r and V: cols x r per 2-D tensor; LOZO-M: + momentum of U's shape
        r = cfg.lowrank_rank
        for s in shapes:
            if len(s) == 2:
                total += acc * r * (s[0] + s[1] + (s[0] if factors == 3 else 0))
    return total


def traffic(m: ModelShape, cfg: PlanConfig) -> dict[str, float]:
    """Bytes per rank per step, by the README's measured formulae (2 forwards per query)."""
    p_bytes = m.params * cfg.bytes
    w, g, q = cfg.world, cfg.gpus_per_node, cfg.queries
    ws = cfg.shard_world
    gather = 0.0 if cfg.engine == "replicas" else 2 * q * (ws - 1) / ws * p_bytes
    inter = 0.0
    if cfg.engine in ("zero3", "fsdp") and w > g:
        inter = 2 * q * (w - g) / w * p_bytes
    return {"all_gather_received": gather, "all_gather_from_other_nodes": inter,
            "optimizer_all_reduce_payload": 16.0 * q}


def plan(m: ModelShape, cfg: PlanConfig) -> Plan:
    """Per-rank peak memory of one ZO step of ``m`` under ``cfg``, by part."""
    shard = _shard_elements(m, cfg) * cfg.bytes
    trainable, local, shapes = _trainable_shard(m, cfg)
    adapters = trainable * 4 if cfg.peft != "none" else 0  # adapters are built in fp32 by peft
    master = local * 4 if cfg.master_weights else 0
    state = _state_bytes(cfg, local, shapes)
    sts = stages(m, cfg)
    totals = {k: sum(v.values()) for k, v in sts.items()}
    top = max(totals, key=totals.get)
    parts = {"weight_shard": shard + adapters, "master": master, "optimizer_state": state, **sts[top]}
    return Plan(model=m.name, config=cfg, params=m.params, trainable=trainable, parts=parts, peak_stage=top,
                stages=totals, traffic=traffic(m, cfg))


def format_plan(p: Plan) -> str:
    """A plan as a text table (GiB per rank)."""
    c = p.config
    head = (f"{p.model}: {p.params / 1e9:.2f}B parameters, {c.engine} on {c.world} ranks "
            f"({c.gpus_per_node} per node), {c.dtype}{' + fp32 master' if c.master_weights else ''}, "
            f"peft {c.peft}, {c.optimizer}, micro-batch {c.micro_batch} x {c.seq_len} tokens")
    rows = [f"  {k:<18}{v / GIB:>10.3f} GiB" for k, v in p.parts.items()]
    rows.append(f"  {'peak per rank':<18}{p.peak / GIB:>10.3f} GiB   (at: {p.peak_stage})")
    t = p.traffic
    rows.append(f"  traffic per step: all-gather {t['all_gather_received'] / GIB:.2f} GiB received "
                f"({t['all_gather_from_other_nodes'] / GIB:.2f} GiB from other nodes), "
                f"optimizer {t['optimizer_all_reduce_payload']:.0f} B")
    return "\n".join([head, *rows])
