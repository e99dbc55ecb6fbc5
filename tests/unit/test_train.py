"""Config validation, the training loop end to end on a tiny model, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from zoscale.train import load_config, train
from zoscale.train.trainer import batches, trainable_parameters

ROOT = Path(__file__).resolve().parents[2]


def _jsonl(path: Path, n: int = 80) -> Path:
    words = {1: ["great", "lovely", "superb", "fun"], 0: ["awful", "dull", "bad", "boring"]}
    with path.open("w") as f:
        for i in range(n):
            label = i % 2
            f.write(json.dumps({"sentence": f"a {words[label][i % 4]} film number {i}", "label": label}) + "\n")
    return path


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["stepz=3"], "stepz"),
        (["model.nam=x"], "model.nam"),
        (["steps=0"], "'steps' must be a positive integer"),
        (["batch_size=-2"], "'batch_size'"),
        (["model.dtype=float8"], "'model.dtype'"),
        (["model.trainable=some"], "'model.trainable'"),
        (["data.label_words=[\" a\"]"], r"data\.label_words must be at least two distinct words"),
        (["steps"], "key=value"),
        (["model.peft.type=adapter"], "'model.peft.type'"),
        (["model.peft.type=lora", "model.peft.rank=4"], "'model.peft.rank'"),
        (["model.peft=3"], "'model.peft'"),
    ],
)
def test_bad_config_is_named(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_config_file_and_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"steps": 7, "optimizer": {"type": "mezo", "params": {"lr": 1e-4}}}))
    cfg = load_config(cfg_file, ["optimizer.params.eps=0.01", "data.n_eval=10"])
    assert cfg.steps == 7 and cfg.optimizer.params == {"lr": 1e-4, "eps": 0.01} and cfg.data.n_eval == 10
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{steps: 3}")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "unk.json").write_text(json.dumps({"data": {"pathh": "x"}}))
    with pytest.raises(ValueError, match="data.pathh"):
        load_config(tmp_path / "unk.json")


def test_batches_are_deterministic_and_cover_each_epoch() -> None:
    rows = [{"i": i} for i in range(10)]
    a = batches(rows, 3, seed=1)
    b = batches(rows, 3, seed=1)
    first = [next(a) for _ in range(6)]
    assert first == [next(b) for _ in range(6)]
    epoch0 = [r["i"] for batch in first[:3] for r in batch]
    assert len(set(epoch0)) == 9  # 3 full batches per epoch, no repeats within an epoch


def test_non_embedding_freezes_embeddings_and_tied_head() -> None:
    from zoscale.models import tiny_llama

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    names = [n for n, _ in trainable_parameters(model, "non_embedding")]
    assert names and not any("embed" in n or "lm_head" in n for n in names)
    assert len(trainable_parameters(model, "all")) == len(list(model.parameters()))


def test_train_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    data = _jsonl(tmp_path / "toy.jsonl")
    cfg = load_config(None, [
        "model.name=tiny-llama", "model.trainable=all", f"data.path={data}", "data.n_train=48", "data.n_eval=16",
        "data.label_words=[\" bad\", \" good\"]", "steps=30", "batch_size=8", "eval_every=10",
        f"output_dir={tmp_path / 'run'}", "optimizer.params.lr=0.001", "optimizer.params.eps=0.001",
    ])
    summary = train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("projected_grad", "lr", "perturb_s", "forward_s", "update_s", "communication_s",
                "examples_per_s", "peak_memory_mb"):
        assert all(key in r for r in steps), key
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 10, 20, 30]
    assert sum(r["loss"] for r in steps[-5:]) < sum(r["loss"] for r in steps[:5])
    reloaded = AutoModelForCausalLM.from_pretrained(summary["final_dir"])
    assert reloaded.config.num_hidden_layers == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 30


def test_malformed_data_stops_before_the_model_loads(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "", "label": 0}\n')
    cfg = load_config(None, ["model.name=/nonexistent/model", f"data.path={bad}", "data.n_train=1", "data.n_eval=1",
                             f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"bad.jsonl.*line 2"):
        train(cfg, progress=False)


def test_cli_reports_config_errors_with_exit_code_2() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "optimizer.type=adamz", "steps=0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "'steps' must be a positive integer" in out.stderr


def test_unknown_optimizer_type_is_named(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "toy.jsonl", 20)
    cfg = load_config(None, ["model.name=tiny-llama", f"data.path={data}", "data.n_train=8", "data.n_eval=4",
                             "optimizer.type=SuperZO", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="SuperZO"):
        train(cfg, progress=False)



def _tiny_cfg(tmp_path: Path, out: str, *extra: str):
    data = _jsonl(tmp_path / "toy.jsonl")
    return load_config(None, [
        "model.name=tiny-llama", "model.trainable=all", f"data.path={data}", "data.n_train=48", "data.n_eval=16",
        "data.label_words=[\" bad\", \" good\"]", "batch_size=8", "eval_every=0", f"output_dir={tmp_path / out}",
        "optimizer.params.lr=0.001", "optimizer.params.q=2", "optimizer.params.master_weights=true", *extra,
    ])


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    train(_tiny_cfg(tmp_path, "full", "steps=12"), progress=False)
    # "Interrupted" after step 8 (checkpoints at 4 and 8), then resumed to step 12.
    train(_tiny_cfg(tmp_path, "parts", "steps=8", "checkpoint_every=4", "save_final=false"), progress=False)
    summary = train(_tiny_cfg(tmp_path, "parts", "steps=12", "resume=true"), progress=False)
    assert summary["start_step"] == 8
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "parts" / "final")
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    losses = {}
    for run in ("full", "parts"):
        for line in (tmp_path / run / "metrics.jsonl").open():
            r = json.loads(line)
            if "loss" in r:
                losses.setdefault(run, {})[r["step"]] = r["loss"]
    assert losses["full"] == losses["parts"]  # steps 1-12 in both, the same values
    assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").glob("step_*")) == [
        "step_00000004", "step_00000008"]


def test_resume_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a step log .* nor a complete checkpoint"):
        train(_tiny_cfg(tmp_path, "none", "steps=2", "resume=true"), progress=False)


# ----------------------------------------------------------------------------- PEFT
_PEFT_SETTINGS = {"lora": ("0.02", "0.01"), "prefix": ("1.0", "0.1"), "prompt": ("0.1", "0.01")}  # lr, eps


def _peft_cfg(tmp_path: Path, out: str, mode: str, *extra: str):
    lr, eps = _PEFT_SETTINGS[mode]
    data = _jsonl(tmp_path / "toy.jsonl")
    return load_config(None, [
        "model.name=tiny-llama", f"model.peft.type={mode}", f"data.path={data}", "data.n_train=48", "data.n_eval=16",
        "data.label_words=[\" bad\", \" good\"]", "batch_size=8", "eval_every=0", f"output_dir={tmp_path / out}",
        f"optimizer.params.lr={lr}", f"optimizer.params.eps={eps}", *extra,
    ])


@pytest.mark.parametrize("mode", ["lora", "prompt"])
def test_peft_run_trains_and_checkpoints_only_adapters_and_resumes(tmp_path: Path, mode: str) -> None:
    import torch.distributed.checkpoint as dcp
    from peft import PeftModel
    from safetensors.torch import load_file

    from zoscale.models import tiny_llama

    train(_peft_cfg(tmp_path, "full", mode, "steps=8"), progress=False)
    train(_peft_cfg(tmp_path, "parts", mode, "steps=4", "checkpoint_every=4", "save_final=false"), progress=False)
    summary = train(_peft_cfg(tmp_path, "parts", mode, "steps=8", "resume=true"), progress=False)
    assert summary["start_step"] == 4
    # The checkpoint holds the adapters only (and their optimizer state), nothing of the base.
    saved = dcp.FileSystemReader(str(tmp_path / "parts" / "checkpoints" / "step_00000004")).read_metadata()
    shards = [k[len("shards/"):] for k in saved.state_dict_metadata if k.startswith("shards/")]
    base_names = {n for n, _ in tiny_llama().named_parameters()}
    assert shards and all("lora_" in k or k.startswith("prompt_encoder.") for k in shards)
    assert not set(shards) & base_names
    # The final output is a peft adapter folder, the same after resuming as uninterrupted.
    final = {run: tmp_path / run / "final" for run in ("full", "parts")}
    assert (final["full"] / "adapter_config.json").is_file() and not (final["full"] / "model.safetensors").exists()
    a, b = (load_file(final[r] / "adapter_model.safetensors") for r in ("full", "parts"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    losses = {}
    for run in ("full", "parts"):
        for line in (tmp_path / run / "metrics.jsonl").open():
            r = json.loads(line)
            if "loss" in r:
                losses.setdefault(run, {})[r["step"]] = r["loss"]
    assert losses["full"] == losses["parts"] and sorted(losses["full"]) == list(range(1, 9))
    # It loads with peft onto the base model, and the adapters did train (seed 0 made them).
    from zoscale.peft import apply_peft

    loaded = PeftModel.from_pretrained(tiny_llama(), final["full"])
    init = dict(apply_peft(tiny_llama(), {"type": mode}, seed=0).named_parameters())
    trained = {n: p for n, p in loaded.named_parameters() if "lora_" in n or n.startswith("prompt_encoder.")}
    assert trained and all(not torch.equal(p, init[n]) for n, p in trained.items())


def test_trainable_all_with_peft_warns_that_it_has_no_effect() -> None:
    with pytest.warns(UserWarning, match="'model.trainable' has no effect"):
        load_config(None, ["model.peft.type=lora", "model.trainable=all"])


def test_peft_prefix_run_end_to_end(tmp_path: Path) -> None:
    summary = train(_peft_cfg(tmp_path, "prefix", "prefix", "steps=3"), progress=False)
    assert (Path(summary["final_dir"]) / "adapter_model.safetensors").is_file()
    config = json.loads((Path(summary["final_dir"]) / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 5
