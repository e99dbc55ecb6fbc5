"""Full checkpoints through DCP (issue 12), one process: a checkpoint that does not fit the model is
refused with the tensor named, before any parameter is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import optim_table as T
from zoscale.train.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True)
def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOSCALE_NOISE_BACKEND", "eager")


def _saved(tmp_path: Path) -> Path:
    m = T.model()
    opt = T.build(T.record("zo_adam"), m.named_parameters(), module=m)
    opt.step(T.closure(m, T.data()))
    return save_checkpoint(tmp_path, 1, opt, 0, 1, keep=1)


def _untouched(m: torch.nn.Module) -> None:
    base = T.model().to(next(m.parameters()).dtype)
    for (name, p), (_, q) in zip(m.named_parameters(), base.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), name


def test_a_checkpoint_of_other_tensors_is_refused_naming_them(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    m = T.model()
    frozen = sorted(n for n, p in m.named_parameters() if "layers.1." in n)
    for n, p in m.named_parameters():
        p.requires_grad_("layers.1." not in n)
    opt = T.build(T.record("zo_adam"), [(n, p) for n, p in m.named_parameters() if p.requires_grad], module=m)
    with pytest.raises(ValueError, match=rf"does not match the model: missing \[\], unexpected \['{frozen[0]}'"):
        load_checkpoint(path, opt, 0, 1)
    _untouched(m)


def test_a_checkpoint_of_another_dtype_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    m = T.model().to(torch.bfloat16)
    opt = T.build(T.record("zo_adam"), m.named_parameters(), module=m)
    first = next(n for n, _ in m.named_parameters())
    want = rf"{first} is \(\d+,\) torch.float32, the model has \d+ elements of torch.bfloat16"
    with pytest.raises(ValueError, match=want):
        load_checkpoint(path, opt, 0, 1)
    _untouched(m)


def test_what_a_checkpoint_holds(tmp_path: Path) -> None:
    """The shards and each state tensor at their global size, the rest as one object."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(_saved(tmp_path))).read_metadata().state_dict_metadata
    m = T.model()
    for name, p in m.named_parameters():
        assert tuple(saved[f"shards/{name}"].size) == (p.numel(),), name
        for moment in ("exp_avg", "exp_avg_sq"):
            assert tuple(saved[f"state/{name}/{moment}"].size) == (p.numel(),), (name, moment)
    assert "optimizer" in saved and not any(k.startswith("rank/") for k in saved)
