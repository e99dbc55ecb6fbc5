"""Test-only: make accelerate take its DeepSpeed and FSDP branches on CPU gloo ranks.

accelerate enables DeepSpeed and FSDP only on accelerators (GPUs with NCCL). These shims let the
tests run the same branches on this CPU machine; nothing of zoscale is patched. Used in-process by
``tests/distributed/test_hf_trainer.py``, and in launched scripts through :data:`ENV`: a process
started with ``PYTHONPATH`` naming ``tests/distributed/shim_site/`` and ``ZOSCALE_TEST_ACCELERATE_ON_CPU``
set to ``deepspeed`` or ``fsdp`` applies the shim at interpreter start (``sitecustomize``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: The environment variable the ``sitecustomize`` of ``shim_site/`` reads: ``deepspeed`` or ``fsdp``.
ENV = "ZOSCALE_TEST_ACCELERATE_ON_CPU"


def cpu_as_a_device() -> None:
    """Let accelerate run DeepSpeed on these CPU gloo ranks, as it runs it on GPUs with NCCL.

    accelerate starts DeepSpeed only when not ``cpu`` and then takes the backend of the detected
    accelerator; with none (a CPU machine) it sets ``backend = None`` and counts one process, so
    ``TrainingArguments(deepspeed=...)`` computes every batch size for a world of 1 (and
    ``use_cpu=True`` drops DeepSpeed altogether). Test-only: the CPU is reported as the accelerator,
    gloo as its backend. Nothing of zoscale is patched.
    """
    import accelerate.state as state

    state.get_torch_accelerator_backend = lambda *args, **kwargs: ("cpu", None)
    state.get_distributed_backend = lambda device_type: "gloo"


def cpu_as_a_gpu_for_fsdp() -> None:
    """Let accelerate take its FSDP branch on these CPU gloo ranks, as it does on GPUs with NCCL.

    accelerate enables its FSDP plugin only for a multi-accelerator state (``MULTI_GPU`` and the
    like), never for ``MULTI_CPU``. Test-only: the state is reported as ``MULTI_GPU`` over gloo and
    its device set to the CPU. Nothing of zoscale is patched.
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType

    state.PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
        "gloo", DistributedType.MULTI_GPU)

    def set_device(self: Any) -> None:
        self.device = torch.device("cpu")

    state.PartialState.set_device = set_device


def apply_from_env() -> None:
    """Apply the shim :data:`ENV` names (nothing when unset)."""
    which = os.environ.get(ENV)
    if which == "deepspeed":
        cpu_as_a_device()
    elif which == "fsdp":
        cpu_as_a_gpu_for_fsdp()
    elif which:
        raise ValueError(f"{ENV}={which!r}: expected 'deepspeed' or 'fsdp'")
