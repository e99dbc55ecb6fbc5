"""Selection policies: which tensors a step's queries move, and how many queries it has.

A policy turns this rank's trainable entries into the step's *plan*: a list of ``(query index,
entries)`` and the number the queries are averaged over (``count``). Policies work from the
names of every trainable parameter (not this rank's non-empty shards), so every rank plans the
same queries, which sharded engines need (each forward is collective); a rank that holds nothing
of a query's tensors only runs its forwards.

    AllTensors   q queries, every tensor (MeZO)                         count q
    RandomUnits  q queries, the transformer blocks drawn for the step (LeZO)   count q
    Blocks       one query per block of layers, in order (block-wise ZO)   count 1
"""

from __future__ import annotations

import hashlib
import random
import re
import struct
from dataclasses import dataclass
from typing import Any, Sequence

from zoscale.optim.directions import ShardEntry
from zoscale.shards import canonical_name

__all__ = ["Plan", "AllTensors", "RandomUnits", "Blocks", "unit_of", "REST"]

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
REST = "rest"


def unit_of(name: str) -> str:
    """The unit of a parameter: ``"block.<i>"`` for transformer block i, else ``"rest"``."""
    m = _BLOCK.search(canonical_name(name))
    return f"block.{int(m.group(1))}" if m else REST


@dataclass
class Plan:
    """A step's queries: ``(query index, entries)`` each, averaged over ``count``."""

    queries: list[tuple[int, list[ShardEntry]]]
    count: int


class AllTensors:
    """Every trainable tensor, in each of the step's ``q`` queries."""

    def refresh(self, names: Sequence[str]) -> None:
        """Called with every trainable parameter's stable id when the param groups change."""

    def plan(self, entries: list[ShardEntry], step: int, options: dict[str, Any]) -> Plan:
        chosen = self.select(entries, step, options)
        return Plan([(k, chosen) for k in range(options["q"])], options["q"])

    def select(self, entries: list[ShardEntry], step: int, options: dict[str, Any]) -> list[ShardEntry]:
        return entries

    def entries_for(self, entries: list[ShardEntry], step: int, query: int, options: dict[str, Any]) -> list[ShardEntry]:
        """The entries query ``query`` of ``step`` moved (for a replay)."""
        return self.select(entries, step, options)


class RandomUnits(AllTensors):
    """LeZO: each step, ``max(1, round((1 - sparsity) * units))`` units drawn without replacement.

    Units are the transformer blocks plus one ``"rest"`` (embeddings, final norm, head). The draw
    comes from a generator seeded by ``(seed, step)``: identical on every rank, independent of
    sharding, never torch's global RNG. All ``q`` queries of a step share it.
    """

    def __init__(self) -> None:
        #: Units in draw order (transformer blocks by index, then ``"rest"``).
        self.units: list[str] = []

    def refresh(self, names: Sequence[str]) -> None:
        blocks = sorted({u for u in map(unit_of, names) if u != REST}, key=lambda u: int(u.split(".")[1]))
        self.units = blocks + ([REST] if any(unit_of(n) == REST for n in names) else [])

    def active_count(self, sparsity: float) -> int:
        return max(1, round((1.0 - sparsity) * len(self.units)))

    def active_units(self, step: int, options: dict[str, Any]) -> list[str]:
        digest = hashlib.blake2b(struct.pack("<qq", options["seed"], step) + b"lezo", digest_size=8)
        rng = random.Random(int.from_bytes(digest.digest(), "little"))
        chosen = set(rng.sample(range(len(self.units)), self.active_count(options["sparsity"])))
        return [u for i, u in enumerate(self.units) if i in chosen]

    def select(self, entries: list[ShardEntry], step: int, options: dict[str, Any]) -> list[ShardEntry]:
        active = set(self.active_units(step, options))
        return [e for e in entries if unit_of(e.stable_id) in active]


class Blocks(AllTensors):
    """Block-wise ZO: one query per block, in a fixed order; ``layers_per_block`` layers each.

    Blocks: transformer blocks by layer index (``"block.<i>"``, or ``"block.<i>-<j>"`` when
    merged), then ``"rest"``. Query ``b`` moves block ``b`` only.
    """

    def __init__(self) -> None:
        self._units: set[str] = set()

    def refresh(self, names: Sequence[str]) -> None:
        self._units = {unit_of(n) for n in names}

    def layout(self, per_block: int) -> tuple[list[str], dict[str, str]]:
        """(block names in order, unit ``"block.<i>"`` / ``"rest"`` -> block name)."""
        layers = sorted(int(u.split(".")[1]) for u in self._units if u != REST)
        names, block_of = [], {}
        for start in range(0, len(layers), per_block):
            members = layers[start:start + per_block]
            name = f"block.{members[0]}" if len(members) == 1 else f"block.{members[0]}-{members[-1]}"
            names.append(name)
            block_of.update({f"block.{i}": name for i in members})
        if REST in self._units:
            names.append(REST)
            block_of[REST] = REST
        return names, block_of

    def block_entries(self, entries: list[ShardEntry], block: str, per_block: int) -> list[ShardEntry]:
        block_of = self.layout(per_block)[1]
        return [e for e in entries if block_of.get(unit_of(e.stable_id)) == block]

    def plan(self, entries: list[ShardEntry], step: int, options: dict[str, Any]) -> Plan:
        k = options["layers_per_block"]
        blocks = self.layout(k)[0]
        return Plan([(b, self.block_entries(entries, name, k)) for b, name in enumerate(blocks)], 1)

    def entries_for(self, entries: list[ShardEntry], step: int, query: int, options: dict[str, Any]) -> list[ShardEntry]:
        blocks = self.layout(options["layers_per_block"])[0]
        if not 0 <= query < len(blocks):
            raise ValueError(f"log record for step {step} names block {query}; this optimizer has "
                             f"{len(blocks)} blocks {blocks}")
        return self.block_entries(entries, blocks[query], options["layers_per_block"])
