"""DeepSpeed for the tests' CPU gloo ranks: the CPU accelerator, and no JIT build of its shm comm op.

DeepSpeed reads ``DS_ACCELERATOR`` when it is first imported, and would build its shared-memory
comm op (about 70 s on a new machine; gloo is used anyway) at ``init_distributed``. Call
:func:`import_deepspeed` at the top of a test module, before anything imports DeepSpeed; it skips
the module where DeepSpeed is not installed.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest


def import_deepspeed() -> ModuleType:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = pytest.importorskip("deepspeed")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed
