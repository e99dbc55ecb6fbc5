"""Test-only, for launched processes: applies ``tests.distributed.accelerate_on_cpu``'s shim at
interpreter start when ``ZOSCALE_TEST_ACCELERATE_ON_CPU`` is set (see that module)."""

import os

if os.environ.get("ZOSCALE_TEST_ACCELERATE_ON_CPU"):
    from tests.distributed.accelerate_on_cpu import apply_from_env

    apply_from_env()
