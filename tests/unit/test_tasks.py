"""Tests of zoscale.data.tasks (templates, scoring, decoding, metrics, objectives, custom tasks) and
zoscale.data.splits, each against a reference written here: literal prompts from MeZO's prompt table (the README's Tasks table),
per-sequence unpadded forwards, a plain greedy loop, hand-computed EM/F1, and MeZO's sampling."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from zoscale.data.formats import read_split
from zoscale.data.splits import load_task_data, read_records
from zoscale.data.tasks import (
    TASKS, Classification, Encoder, Example, Generation, MultipleChoice, build_task, greedy_decode, option_logprobs,
    task_spec,
)
from zoscale.data.tasks.classification import choice_batch, choice_scores
from zoscale.data.tasks.metrics import best_em_f1, exact_match, f1, normalize_answer
from zoscale.models import tiny_llama, tiny_opt, tiny_tokenizer
from zoscale.train.config import DataConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FOLDERS = {
    "sst2": "SST-2", "rte": "RTE", "cb": "CB", "boolq": "BoolQ", "wsc": "WSC", "wic": "WiC", "multirc": "MultiRC",
    "copa": "COPA", "record": "ReCoRD", "winogrande": "winogrande", "squad": "squad", "drop": "drop",
}  # fmt: skip
TOK = tiny_tokenizer()
task_spec("sst2")  # registers the suite


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module", params=["llama", "opt"])
def model(request):
    return tiny_llama(seed=0) if request.param == "llama" else tiny_opt(seed=0)


def records(name: str, split: str = "train") -> list[tuple[dict, str]]:
    rows = read_split(str(FIXTURES / FOLDERS[name]), TASKS[name].dataset, split)
    if name == "sst2":  # GLUE's TSV cells are text
        rows = [({**r, "label": int(r["label"])}, w) for r, w in rows]
    return rows


def examples(name: str, n: int, split: str = "train") -> list[Example]:
    return [TASKS[name].template(r, w) for r, w in records(name, split)[:n]]


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def ref_option_logprob(model, prompt: str, candidate: str) -> torch.Tensor:
    """Mean log-prob of the candidate's tokens, from one unpadded forward of prompt + candidate."""
    p, full = ids(prompt), ids(prompt + candidate)
    assert full[: len(p)] == p and len(full) > len(p)
    logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    return torch.stack([logp[t - 1, full[t]] for t in range(len(p), len(full))]).mean()


def ref_scores(model, exs: list[Example]) -> torch.Tensor:
    width = max(len(ex.candidates) for ex in exs)
    out = torch.full((len(exs), width), float("-inf"))
    for i, ex in enumerate(exs):
        for j, c in enumerate(ex.candidates):
            out[i, j] = ref_option_logprob(model, ex.prompt, c)
    return out


def ref_cross_entropy(scores: torch.Tensor, labels: list[int]) -> torch.Tensor:
    return torch.stack([torch.logsumexp(s, 0) - s[y] for s, y in zip(scores, labels)]).mean()


def ref_greedy(model, prompt: str, budget: int) -> str:
    seq, out = ids(prompt), []
    for _ in range(budget):
        token = int(model(input_ids=torch.tensor([seq + out])).logits[0, -1].argmax())
        if token == TOK.eos_token_id:
            break
        out.append(token)
        if "\n" in TOK.decode([token]):
            break
    return TOK.decode(out, skip_special_tokens=True).split("\n")[0]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# 1. Templates -------------------------------------------------------------------------------

NO_YES, YES_NO = ("No", "Yes"), ("Yes", "No")
EXPECTED = {  # first record of each fixture: (prompt, candidates, correct, answers)
    "sst2": ("a dull and boring film . It was", (" terrible", " great"), (0,), ()),
    "rte": ("Anna moved to Paris in 1990 and now teaches history at a local school.\n"
            'Does this mean that "Anna lives in Paris." is true? Yes or No?\n', YES_NO, (0,), ()),
    "cb": ("Suppose B: I talked to Anna this morning. A: And? B: I'm quite sure that Anna sold the old blue car. "
           'Can we infer that "Anna sold the old blue car"? Yes, No, or Maybe?\n', ("Yes", "No", "Maybe"), (0,), ()),
    "boolq": ("Water -- Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees. "
              "Does water boil at 100 degrees celsius at sea level?\n", NO_YES, (1,), ()),
    "wsc": ("Anna thanked Kate because she had helped with the move.\n"
            'In the previous sentence, does the pronoun "she" refer to Kate? Yes or No?\n', NO_YES, (1,), ()),
    "wic": ('Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
            "She sat on the bank of the river.\nThe boat drifted toward the muddy bank.\n", NO_YES, (1,), ()),
    "multirc": ("Anna lives in Paris with a dog named Rex. She rides a blue bicycle. On Sundays she visits her sister "
                "in Rome.\nQuestion: Where does Anna's sister live?\n"
                'I found this answer "In Rome". Is that correct? Yes or No?\n', NO_YES, (1,), ()),
    "copa": ("Anna turned on the tap so", (" water flowed out.", " the pipe froze."), (0,), ()),
    "record": ("Anna opened a children's hospital in Paris on Monday, the Red Cross said.\n"
               "- Anna opened the hospital\n- The Red Cross paid for it\n- ",
               ("The hospital in Anna has 200 beds.", "The hospital in Paris has 200 beds.",
                "The hospital in Red Cross has 200 beds."), (1,), ()),
    "winogrande": ("Anna helped Kate with the homework because",
                   (" Anna was good at maths.", " Kate was good at maths."), (0,), ()),
    "squad": ("Title: Anna\nContext: Anna lives in Paris and drives a blue car to work every day.\n"
              "Question: Where does Anna live?\nAnswer:", (" Paris\n",), (0,), ("Paris",)),
    "drop": ("Passage: The Bears played the Falcons on January 1, 1990. Tom Reed kicked a 30-yard field goal, and "
             "the Bears scored 10 points.\nQuestion: How many points did the Bears score?\nAnswer:",
             (" 10\n",), (0,), ("10",)),
}  # fmt: skip


def test_every_fixture_task_has_an_expected_rendering() -> None:
    assert set(EXPECTED) == {name for name, spec in TASKS.items() if spec.dataset is not None}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_first_fixture_record_as_mezo_table(name: str) -> None:
    ex = examples(name, 1)[0]
    assert (ex.prompt, ex.candidates, ex.correct, ex.answers) == EXPECTED[name]


def test_template_case_rules_wsc_span2_lowered_copa_cause_keeps_i() -> None:
    row = {"text": "Kate thanked Anna.", "span1_text": "Anna", "span2_text": "She", "label": False}
    assert TASKS["wsc"].template(row, "w").prompt == (
        'Kate thanked Anna.\nIn the previous sentence, does the pronoun "she" refer to Anna? Yes or No?\n')
    row = {"premise": "The man fell.", "choice1": "I pushed him.", "choice2": "He slipped.", "question": "cause",
           "label": 1}
    ex = TASKS["copa"].template(row, "w")
    assert (ex.prompt, ex.candidates, ex.correct) == ("The man fell because", (" I pushed him.", " he slipped."), (1,))


# 2. Candidate scoring -----------------------------------------------------------------------

def test_option_logprobs_and_choice_scores_equal_per_sequence_reference(model) -> None:
    exs = examples("copa", 6) + examples("record", 2)  # 2 and 3 candidates: ragged groups
    enc = Encoder(TOK, 256)
    batch = MultipleChoice().eval_batch(exs, enc)
    ref = ref_scores(model, exs)
    flat = torch.cat([row[torch.isfinite(row)] for row in ref])
    torch.testing.assert_close(option_logprobs(model, batch), flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(choice_scores(model, batch), ref, rtol=1e-5, atol=1e-5)
    assert MultipleChoice().predict(model, batch, enc) == ref.argmax(-1).tolist()


def test_multi_token_classification_uses_general_path_and_ce_of_reference(model) -> None:
    exs = examples("rte", 6)
    assert [len(ids(c)) for c in exs[0].candidates] == [3, 2]
    batch = Classification().train_batch(exs, Encoder(TOK, 256))
    assert "label_ids" not in batch and batch["groups"].tolist() == [2] * 6
    ref = ref_scores(model, exs)
    torch.testing.assert_close(Classification().loss(model, batch), ref_cross_entropy(ref, [e.label for e in exs]),
                               rtol=1e-5, atol=1e-5)
    assert Classification().predict(model, batch, None) == ref.argmax(-1).tolist()


def test_single_token_fast_path_equals_general_path(model) -> None:
    exs = examples("sst2", 8)
    enc = Encoder(TOK, 256)
    fast, general = choice_batch(exs, enc), choice_batch(exs, enc, fast=False)
    assert "label_ids" in fast and "groups" in general and fast["input_ids"].shape[0] == 8
    family = Classification()
    torch.testing.assert_close(family.loss(model, fast), family.loss(model, general), rtol=1e-5, atol=1e-5)
    assert family.predict(model, fast, enc) == family.predict(model, general, enc)
    assert family.predict(model, fast, enc) == ref_scores(model, exs).argmax(-1).tolist()


# 3. Generation ------------------------------------------------------------------------------

def test_greedy_decode_equals_unpadded_reference_loop(llama) -> None:
    exs = examples("squad", 6)
    assert len({len(ids(e.prompt)) for e in exs}) > 1  # different lengths: real left padding
    batch = Encoder(TOK, 200).prompts(exs, reserve=6)
    got = greedy_decode(llama, batch, Encoder(TOK, 200), max_new_tokens=6)
    assert got == [ref_greedy(llama, e.prompt, 6) for e in exs]


def test_greedy_decode_keeps_stepping_until_sync_says_all_ranks_done(llama) -> None:
    exs = examples("squad", 4)
    enc = Encoder(TOK, 200)
    batch = enc.prompts(exs, reserve=8)
    first_two = [ref_greedy(llama, e.prompt, 2) for e in exs]  # before the hook
    forwards, newline = [0], ids("\n")[0]

    def hook(_module, _args, output):  # counts forwards; the 3rd ends every row: newline (even), EOS (odd)
        forwards[0] += 1
        if forwards[0] >= 3:
            output.logits[0::2, -1, newline] = 1e4
            output.logits[1::2, -1, TOK.eos_token_id] = 1e4
        return output

    handle = llama.register_forward_hook(hook)
    try:
        alone = greedy_decode(llama, batch, enc, max_new_tokens=8)
        assert forwards[0] == 3  # both stop rules end decoding before the budget
        assert alone == first_two
        forwards[0] = 0
        syncs = []

        def sync(local_done: bool) -> bool:  # another rank finishes at its 5th token
            syncs.append(local_done)
            return local_done and len(syncs) >= 5

        synced = greedy_decode(llama, batch, enc, max_new_tokens=8, sync=sync)
    finally:
        handle.remove()
    assert forwards[0] == len(syncs) == 5 and syncs[2:] == [True] * 3
    assert synced == alone


# 4. EM / F1 ---------------------------------------------------------------------------------

def test_normalize_answer_case_punctuation_articles_whitespace() -> None:
    assert normalize_answer("  The  Theatre,\tanother AN   a (Car)! ") == "theatre another car"
    assert normalize_answer("A.N. the-end") == "theend"  # punctuation first: "an" stays glued


@pytest.mark.parametrize("pred, gold, em, f", [
    ("the big red car", "red car", 0.0, 0.8),        # p 2/3, r 1
    ("red red car", "red car blue", 0.0, 2 / 3),     # common {red: 1, car: 1}: p 2/3, r 2/3
    ("The Car!", "car", 1.0, 1.0),
    ("blue", "red car", 0.0, 0.0),
    ("", "", 1.0, 1.0),                              # both empty (documented)
    ("", "car", 0.0, 0.0),
    ("the", "", 1.0, 1.0),                           # "the" normalises to nothing
])  # fmt: skip
def test_em_f1_hand_computed(pred: str, gold: str, em: float, f: float) -> None:
    assert exact_match(pred, gold) == em
    assert f1(pred, gold) == pytest.approx(f)


def test_best_em_f1_takes_max_over_gold_answers() -> None:
    assert best_em_f1("big red car", ["a car", "red car"]) == pytest.approx({"em": 0.0, "f1": 0.8})  # .5 vs .8
    assert best_em_f1("Paris", ["London", "paris."]) == {"em": 1.0, "f1": 1.0}
    with pytest.raises(ValueError, match="no gold answers"):
        best_em_f1("x", [])


# 5. Training objectives ---------------------------------------------------------------------

def test_multiple_choice_correct_option_loss(model) -> None:
    exs = examples("copa", 6)
    family = MultipleChoice()
    batch = family.train_batch(exs, Encoder(TOK, 256))
    ref = torch.stack([ref_option_logprob(model, e.prompt, e.candidates[e.label]) for e in exs]).mean()
    torch.testing.assert_close(family.loss(model, batch), -ref, rtol=1e-5, atol=1e-5)


def test_multiple_choice_cross_entropy_objective(model) -> None:
    exs = examples("copa", 6)
    family = build_task(DataConfig(task="copa", objective="cross_entropy")).family
    batch = family.train_batch(exs, Encoder(TOK, 256))
    expected = ref_cross_entropy(ref_scores(model, exs), [e.label for e in exs])
    torch.testing.assert_close(family.loss(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_generation_teacher_forcing_loss_on_first_answer_and_newline(model) -> None:
    rows = records("squad")[:6]
    exs = [TASKS["squad"].template(r, w) for r, w in rows]
    family = Generation(max_new_tokens=6)
    batch = family.train_batch(exs, Encoder(TOK, 256))
    ref = torch.stack([ref_option_logprob(model, e.prompt, f" {r['answers'][0]}\n") for e, (r, _) in zip(exs, rows)])
    torch.testing.assert_close(family.loss(model, batch), -ref.mean(), rtol=1e-5, atol=1e-5)


def test_generation_f1_objective_is_minus_mean_f1_of_greedy_decodes(llama) -> None:
    exs = examples("squad", 6)
    decodes = [ref_greedy(llama, e.prompt, 6) for e in exs]
    # Gold answers built from the reference decodes (odd rows: unrelated), so the value is not trivially 0.
    exs = [dataclasses.replace(e, answers=(d,) if i % 2 == 0 else ("zzz qqq",)) for i, (e, d) in
           enumerate(zip(exs, decodes))]
    expected = -sum(best_em_f1(d, e.answers)["f1"] for d, e in zip(decodes, exs)) / len(exs)
    assert -1.0 < expected < 0.0
    family = build_task(DataConfig(task="squad", objective="f1", max_new_tokens=6)).family
    loss = family.loss(llama, family.train_batch(exs, Encoder(TOK, 200)))
    assert float(loss) == pytest.approx(expected, abs=1e-6)


# 6. Bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("task, row", [
    ("sst2", {"sentence": "a film", "label": "1"}),
    ("rte", {"premise": "p", "hypothesis": "h", "label": 1.0}),
    ("rte", {"premise": "p", "hypothesis": "h", "label": True}),
])  # fmt: skip
def test_wrong_label_type_names_file_and_line(tmp_path: Path, task: str, row: dict) -> None:
    good = {"sst2": {"sentence": "ok", "label": 0}, "rte": {"premise": "p", "hypothesis": "h", "label": 0}}[task]
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, row])
    with pytest.raises(ValueError, match=rf"{path} line 3: label .* in field 'label'"):
        build_task(DataConfig(task=task)).examples(read_records(path))


def test_empty_data_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}: no records"):
        read_records(path)


def test_missing_field_and_label_outside_classes_are_named() -> None:
    task = build_task(DataConfig(task="rte"))
    with pytest.raises(ValueError, match=r"f line 7: missing field 'hypothesis'"):
        task.example({"premise": "p", "label": 0}, "f line 7")
    with pytest.raises(ValueError, match=r"f line 8: label 'maybe' .* not one of"):
        task.example({"premise": "p", "hypothesis": "h", "label": "maybe"}, "f line 8")
    with pytest.raises(ValueError, match=r"f line 9: label 2 .* not one of"):
        task.example({"premise": "p", "hypothesis": "h", "label": 2}, "f line 9")


def test_custom_errors_empty_candidates_and_unknown_template_field() -> None:
    mc = build_task(DataConfig(task="custom", family="multiple_choice", template="Q: {q}", candidates_field="opts"))
    with pytest.raises(ValueError, match=r"f line 2: field 'opts' must be a non-empty list"):
        mc.example({"q": "why", "opts": [], "label": 0}, "f line 2")
    clf = build_task(DataConfig(task="custom", template="{sentence} / {nope}", label_words=(" a", " b")))
    with pytest.raises(ValueError, match=r"f line 3: data.template names field 'nope'"):
        clf.example({"sentence": "s", "label": 0}, "f line 3")


def test_candidate_that_tokenises_to_nothing() -> None:
    with pytest.raises(ValueError, match=r"f line 4: candidate '' tokenises to nothing"):
        Encoder(TOK, 64).option_ids("a prompt", "", "f line 4")


def test_empty_prompt_without_bos_is_an_error() -> None:
    # Nothing would precede the first option token: its score would come from a padding position.
    ex = Example("", (" a b",), (0,), where="f line 5")
    with pytest.raises(ValueError, match=r"f line 5: the prompt is empty"):
        Encoder(TOK, 64).options([(ex, " a b")])
    with pytest.raises(ValueError, match=r"f line 5: the prompt is empty"):
        Encoder(TOK, 64).prompts([ex], reserve=4)


def test_long_prompt_is_left_truncated_keeping_option_whole_and_counted() -> None:
    enc = Encoder(TOK, 12)
    long, short = Example("0123456789abcdef", ("XY",), (0,)), Example("hi", ("XY",), (0,))
    batch = enc.options([(long, "XY"), (short, "XY")])
    assert batch["input_ids"][0].tolist() == ids("6789abcdefXY")  # 10 last prompt tokens + option
    assert batch["input_ids"][1].tolist() == [TOK.pad_token_id] * 8 + ids("hiXY")
    assert batch["option_lengths"].tolist() == [2, 2] and int(batch["truncated"]) == 1
    prompts = enc.prompts([long, short, long], reserve=4)
    assert prompts["input_ids"][0].tolist() == ids("89abcdef") and int(prompts["truncated"]) == 2


def test_unknown_task_and_option_for_wrong_family() -> None:
    with pytest.raises(ValueError, match=r"Unknown task 'nope'"):
        build_task(DataConfig(task="nope"))
    with pytest.raises(ValueError, match=r"'classification' takes no option\(s\) \['max_new_tokens'\]"):
        build_task(DataConfig(task="rte", max_new_tokens=5))
    with pytest.raises(ValueError, match=r"Invalid generation objective 'cross_entropy'"):
        build_task(DataConfig(task="squad", objective="cross_entropy"))


# 7. Custom tasks ----------------------------------------------------------------------------

def test_custom_three_class_classification_renders_fields_and_maps_labels() -> None:
    task = build_task(DataConfig(task="custom", template="{premise}\nQuestion: {hypothesis} ({n})?\n",
                                 label_words=("Yes", "No", "Maybe"), labels=["entailment", "contradiction", "neutral"]))
    exs = task.examples([({"premise": "P1", "hypothesis": "H1", "n": 3, "label": "neutral"}, "f line 1"),
                         ({"premise": "P2", "hypothesis": "H2", "n": 1.5, "label": "entailment"}, "f line 2")])
    assert [(e.prompt, e.candidates, e.correct) for e in exs] == [
        ("P1\nQuestion: H1 (3)?\n", ("Yes", "No", "Maybe"), (2,)),
        ("P2\nQuestion: H2 (1.5)?\n", ("Yes", "No", "Maybe"), (0,))]
    assert isinstance(task.family, Classification)
    with pytest.raises(ValueError, match="not one of"):
        task.example({"premise": "P", "hypothesis": "H", "n": 1, "label": 2}, "f line 3")  # raw labels only


def test_custom_multiple_choice_candidates_field() -> None:
    task = build_task(DataConfig(task="custom", family="multiple_choice", template="Q: {q}\nA:",
                                 candidates_field="options", label_field="answer"))
    ex = task.example({"q": "2+2?", "options": [" 3", " 4", " 5"], "answer": 1}, "f line 1")
    assert (ex.prompt, ex.candidates, ex.correct) == ("Q: 2+2?\nA:", (" 3", " 4", " 5"), (1,))
    assert isinstance(task.family, MultipleChoice)


@pytest.mark.parametrize("answer, answers", [("Paris", ("Paris",)), (["Paris", "paris city"], ("Paris", "paris city"))])
def test_custom_generation_answer_field_string_or_list(answer, answers) -> None:
    task = build_task(DataConfig(task="custom", family="generation", template="Where? {q}\nAnswer:",
                                 answer_field="a", max_new_tokens=7))
    ex = task.example({"q": "capital", "a": answer}, "f line 1")
    assert (ex.prompt, ex.candidates, ex.correct) == ("Where? capital\nAnswer:", (" Paris\n",), (0,))
    assert ex.answers == answers
    assert isinstance(task.family, Generation) and task.family.max_new_tokens == 7


# 8. Splits ----------------------------------------------------------------------------------

def _folder_data(seed: int, **kw):
    cfg = DataConfig(task="rte", path=str(FIXTURES / "RTE"), **kw)
    return load_task_data(build_task(cfg), cfg, seed)


def test_dataset_folder_sampling_is_mezo_shuffle_dev_then_train_and_validation_draw() -> None:
    task = build_task(DataConfig(task="rte"))
    train_split = task.examples(read_split(str(FIXTURES / "RTE"), "rte", "train"))
    validation = task.examples(read_split(str(FIXTURES / "RTE"), "rte", "validation"))
    for seed in (0, 1):
        order = list(train_split)
        random.Random(seed).shuffle(order)
        data = _folder_data(seed, n_train=10, n_dev=5, n_eval=8)
        assert data.dev == order[:5] and data.train == order[5:15]
        assert data.eval == random.Random(seed).sample(validation, 8)
        assert not {e.where for e in data.train} & {e.where for e in data.dev}
        assert all("val.jsonl" in e.where for e in data.eval) and data.notes == []
        assert _folder_data(seed, n_train=10, n_dev=5, n_eval=8) == data  # deterministic
    assert _folder_data(0, n_train=10, n_dev=5, n_eval=8).train != _folder_data(1, n_train=10, n_dev=5, n_eval=8).train


def test_dataset_folder_asking_for_more_uses_all_and_notes_it() -> None:
    data = _folder_data(0, n_train=100, n_dev=5, n_eval=50)
    assert len(data.dev) == 5 and len(data.train) == 32 - 5 and len(data.eval) == 16
    assert len(data.notes) == 2 and "27 examples, fewer than the 100" in data.notes[0]
    assert "16 examples, fewer than the 50" in data.notes[1]


def test_separate_files_are_used_as_given(tmp_path: Path) -> None:
    def rows(tag: str, n: int) -> list[dict]:
        return [{"sentence": f"{tag} {i}", "label": i % 2} for i in range(n)]

    train, held, dev = (write_jsonl(tmp_path / f"{t}.jsonl", rows(t, n)) for t, n in (("tr", 12), ("ev", 5), ("dv", 4)))
    cfg = DataConfig(task="sst2", path=str(train), eval_path=str(held), dev_path=str(dev), n_train=12, n_eval=5)
    data = load_task_data(build_task(cfg), cfg, seed=0)
    task = build_task(cfg)
    assert sorted(e.prompt for e in data.train) == sorted(e.prompt for e in task.examples(read_records(train)))
    assert data.eval == task.examples(read_records(held)) and data.dev == task.examples(read_records(dev))
    assert data.notes == []
