"""benchmarks/bench_accuracy.py: its --quick mode end to end on the tiny model, resumption, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import accuracy_report  # noqa: E402
import bench_accuracy  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = ["--quick", "--model", "tiny-llama", "--steps", "3", "--n-train", "64", "--n-dev", "16", "--n-eval", "16"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench_accuracy")
    summary = bench_accuracy.main([*QUICK, "--out", str(out / "out"), "--figure", str(out / "figure.png")])
    return out, summary


def test_quick_runs_every_optimizer_and_writes_the_pngs(quick: tuple[Path, dict]) -> None:
    out, summary = quick
    rows = summary["tasks"]["sst2"]["rows"]
    assert list(rows) == list(bench_accuracy.OPTIMIZERS)
    records = bench_accuracy.load_runs(out / "out")
    assert sorted(r["optimizer"] for r in records) == sorted(bench_accuracy.OPTIMIZERS)
    for r in records:  # no sweep: each at the lr its shipped JSON holds
        if r["optimizer"] != "adamw":
            shipped = json.loads((BENCH.parent / "ds_configs" / f"zero3_{r['optimizer']}.json").read_text())
            assert r["lr"] == shipped["optimizer"]["params"]["lr"], r["optimizer"]
    for png in [*summary["pngs"], str(out / "figure.png")]:
        data = Path(png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, png
    assert {Path(p).name for p in summary["pngs"]} == {"accuracy_sst2.png", "memory.png", "headline.png"}
    assert (out / "figure.png").read_bytes() == (out / "out" / "headline.png").read_bytes()
    table = (out / "out" / "table.md").read_text()
    for label in accuracy_report.LABELS.values():
        assert f"| sst2 | {label} |" in table


def test_each_run_spends_the_forward_budget(quick: tuple[Path, dict]) -> None:
    out, _ = quick
    budget = 2 * 3
    for r in bench_accuracy.load_runs(out / "out"):
        assert r["diverged"] is None
        assert len(r["losses"]) == r["steps_run"]
        if r["optimizer"] == "adamw":  # one forward (and a backward) per step, `steps` steps
            assert r["forwards_per_step"] == 1 and r["steps_run"] == 3
        elif r["optimizer"] == "blockwise":  # two forwards per block: fewer steps for the budget
            assert r["forwards_per_step"] > 2 and r["curve"][-1]["forwards"] >= budget
        else:
            assert r["forwards_per_step"] == 2 and r["steps_run"] == 3
        forwards = [p["forwards"] for p in r["curve"]]
        own = 3 if r["optimizer"] == "adamw" else budget
        assert forwards[0] == 0 and forwards == sorted(forwards) and forwards[-1] >= own
        times = [p["train_s"] for p in r["curve"]]
        assert times == sorted(times) and times[-1] > 0


def test_every_run_starts_from_the_same_model(tmp_path: Path) -> None:
    """Runs share one process: a run built on the previous run's (trained) weights would give other losses."""
    spec = bench_accuracy.RunSpec("sst2", "mezo", 5e-5, 0, "final")
    budget = bench_accuracy.Budget("tiny-llama", 2, 16, 64, 16, 16, 64)
    first = bench_accuracy.run_one(spec, budget, tmp_path / "a")
    bench_accuracy._ZERO_SHOT.clear()  # the second run scores its own step 0, not the first run's
    again = bench_accuracy.run_one(spec, budget, tmp_path / "b")
    assert first["losses"] == again["losses"] and len(first["losses"]) == 2
    assert first["curve"][0] == again["curve"][0]


def test_a_second_start_resumes_without_rerunning(quick: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    out, first = quick
    runs = sorted((out / "out" / "runs").glob("*/*.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    again = bench_accuracy.main([*QUICK, "--out", str(out / "out"), "--figure", ""])
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    assert "kept from an earlier run" in capsys.readouterr().err
    assert again["tasks"]["sst2"]["mezo_final_test"] == first["tasks"]["sst2"]["mezo_final_test"]


def test_a_run_of_another_budget_is_refused(quick: tuple[Path, dict]) -> None:
    out, _ = quick
    with pytest.raises(SystemExit, match="was run with budget"):
        bench_accuracy.main([*QUICK[:-2], "--n-eval", "8", "--out", str(out / "out"), "--figure", ""])


def _record(opt: str, lr: float, dev: float | None, test: float | None = 0.5, dev_loss: float = 0.7) -> dict:
    return {"optimizer": opt, "lr": lr, "final_dev": dev, "final_dev_loss": dev_loss, "final_test": test,
            "stage": "sweep"}


def test_the_sweep_chooses_the_best_dev_and_never_a_diverged_run() -> None:
    records = [_record("mezo", 1e-5, 0.6), _record("mezo", 5e-5, 0.7), _record("mezo", 2e-4, None, None)]
    assert bench_accuracy.chosen_lr(records, "mezo") == 5e-5
    tie = [_record("lezo", 1e-5, 0.7), _record("lezo", 5e-5, 0.7)]
    assert bench_accuracy.chosen_lr(tie, "lezo") == 1e-5
    by_loss = [_record("lezo", 1e-5, 0.7, dev_loss=0.69), _record("lezo", 5e-5, 0.7, dev_loss=0.65),
               _record("lezo", 2e-4, 0.6, dev_loss=0.5)]
    assert bench_accuracy.chosen_lr(by_loss, "lezo") == 5e-5  # accuracy first, then the lower loss
    with pytest.raises(SystemExit, match="every sweep run of lozo diverged"):
        bench_accuracy.chosen_lr([_record("lozo", 1e-5, None, None)], "lozo")


def test_time_to_accuracy_is_the_first_point_reaching_the_target() -> None:
    curve = [{"train_s": 0.0, "forwards": 0, "test": 0.5, "dev": 0.5},
             {"train_s": 10.0, "forwards": 40, "test": 0.7, "dev": 0.6},
             {"train_s": 20.0, "forwards": 80, "test": 0.65, "dev": 0.6}]
    assert accuracy_report.first_reaching(curve, 0.65) == {"train_s": 10.0, "forwards": 40}
    assert accuracy_report.first_reaching(curve, 0.5) == {"train_s": 10.0, "forwards": 40}  # never step 0
    assert accuracy_report.first_reaching(curve, 0.71) is None
    runs = [{"curve": curve}, {"curve": [{**p, "test": p["test"] - 0.1} for p in curve]}]
    assert [p["test"] for p in accuracy_report.mean_curve(runs)] == pytest.approx([0.45, 0.65, 0.6])


def test_the_summary_is_json(quick: tuple[Path, dict]) -> None:
    out, summary = quick
    assert json.loads((out / "out" / "summary.json").read_text())["chosen_lr"] == summary["chosen_lr"]


def test_the_full_path_sweeps_then_runs_the_chosen_lr_on_every_seed(tmp_path: Path) -> None:
    argv = ["--model", "tiny-llama", "--optimizers", "mezo", "adamw", "--tasks", "sst2", "--seeds", "0", "1",
            "--steps", "2", "--sweep-steps", "1", "--n-train", "64", "--n-dev", "16", "--n-eval", "16",
            "--out", str(tmp_path), "--figure", ""]
    summary = bench_accuracy.main(argv)
    records = bench_accuracy.load_runs(tmp_path)
    sweep = [r for r in records if r["stage"] == "sweep"]
    final = [r for r in records if r["stage"] == "final"]
    assert sorted((r["optimizer"], r["lr"]) for r in sweep) == sorted(
        (name, lr) for name in ("mezo", "adamw") for lr in bench_accuracy.OPTIMIZERS[name][1])
    assert all(r["budget"]["steps"] == 1 for r in sweep) and all(r["budget"]["steps"] == 2 for r in final)
    assert sorted((r["optimizer"], r["seed"]) for r in final) == [("adamw", 0), ("mezo", 0), ("mezo", 1)]
    for name in ("mezo", "adamw"):
        chosen = bench_accuracy.chosen_lr(sweep, name)
        assert {r["lr"] for r in final if r["optimizer"] == name} == {chosen} == {summary["chosen_lr"][name]}
        assert len(summary["sweep_dev"][name]) == 3
    assert summary["tasks"]["sst2"]["rows"]["mezo"]["seeds"] == [0, 1]
    # Dev chooses, test reports: a sweep run's curve holds dev only, a final run's test only.
    assert all({"dev", "dev_loss"} <= set(p) and "test" not in p for r in sweep for p in r["curve"])
    assert all(len(r["curve"]) == 2 and 0 < r["final_dev_loss"] for r in sweep)
    assert all("test" in p and "dev" not in p for r in final for p in r["curve"])


def test_the_dev_scores_match_the_trainers_evaluation_and_loss(tmp_path: Path) -> None:
    """The sweep's own dev pass: its accuracy is evaluate_run's, its loss the task's training loss."""
    from zoscale.train.trainer import build, evaluate_run

    spec = bench_accuracy.RunSpec("sst2", "mezo", 5e-5, 0, "sweep")
    budget = bench_accuracy.Budget("tiny-llama", 2, 4, 64, 12, 16, 64)
    run = build(bench_accuracy.train_config(spec, budget, tmp_path / "a"))
    accuracy, loss = bench_accuracy._dev_accuracy_and_loss(run)
    assert accuracy == evaluate_run(run, run.data.dev, prefix="dev")[0]["dev_accuracy"]
    with torch.no_grad():
        losses = [float(run.task.family.loss(run.engine.module, run.task.family.train_batch(run.data.dev[i:i + 4],
                                                                                            run.encoder)))
                  for i in range(0, 12, 4)]
    assert loss == pytest.approx(sum(losses) / 3, rel=1e-5)
