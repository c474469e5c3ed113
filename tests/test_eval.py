"""`mdkd eval`: metrics against hand-computed values, teachers read from the cache on the student's positions,
the teachers a run was trained with, runs and model folders, and the demo's summary of eval.json."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import train_config, write_config

from mdkd.cli import cli
from mdkd.demo import summary
from mdkd.pipeline.cache.reader import CacheReader
from mdkd.pipeline.cache.shards import CachedPredictions
from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.evaluation import (
    KINDS,
    Comparison,
    HeldOutWindows,
    MetricSums,
    compare_on_windows,
    position_kinds,
    position_metrics,
    score_windows,
    teacher_sums,
)
from mdkd.stages import demo
from mdkd.stages import evaluate as evaluate_stage
from mdkd.stages import report as report_stage


def test_model_metrics_by_hand():
    # Four model tokens; the teacher can emit the first three only.
    logits = torch.log(torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.1, 0.3, 0.5, 0.1], [0.5, 0.2, 0.2, 0.1]]))
    labels = torch.tensor([0, 1, -1])  # the third label cannot be spelled by the model: left out
    teacher_ids = torch.tensor([[0, 1], [2, 0], [-1, 0]])
    teacher_logprobs = torch.log(torch.tensor([[0.6, 0.2], [0.5, 0.5], [0.9, 0.1]]))
    support = torch.tensor([True, True, True, False])
    result = position_metrics(logits, labels, teacher_ids, teacher_logprobs, support=support).sums().result()
    assert result["positions"] == 2 and result["accuracy"] == 0.5
    assert result["perplexity"] == pytest.approx(math.exp(-(math.log(0.6) + math.log(0.3)) / 2), rel=1e-5)
    assert result["agreement"] == 1.0  # rows 1 and 2: top-1 0 == 0 and 2 == 2; row 3 has no teacher top-1
    # Exact KL at tau = 1 over the teacher's top-k, the rest of its own tokens (row 1: token 2 with 0.2; row 2:
    # nothing left), and the token it cannot emit with teacher mass 0 (no term, but the model's 0.1 there is in
    # no bucket of the teacher's).
    expected_kl = (0.2 * math.log(0.2 / 0.1) + 0.5 * math.log(0.5 / 0.1)) / 2
    assert result["kl"] == pytest.approx(expected_kl, rel=1e-4)
    assert result["outside_mass"] == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("k", [4, 30])  # a weak teacher's top-4 (most of its mass outside), and its whole vocabulary
def test_model_metrics_match_a_dense_float64_reference(k):
    """Every model figure against a float64 recomputation from the whole softmax, row by row, with the buckets
    written out as sets: teacher twins (two teacher ids, one model token), a teacher token the model lacks, a
    label the model cannot spell, and a row whose rest bucket underflows float32's exponentials."""
    generator = torch.Generator().manual_seed(k)
    vocab, teacher_vocab, rows = 40, 30, 12
    target_map = torch.randperm(vocab, generator=generator)[:teacher_vocab]
    target_map[3] = target_map[4]  # twins
    target_map[5] = -1  # the model lacks this teacher token
    support = torch.zeros(vocab, dtype=torch.bool)
    support[target_map[target_map >= 0]] = True
    logits = torch.randn(rows, vocab, generator=generator) * 3
    teacher = torch.log_softmax(torch.randn(rows, teacher_vocab, generator=generator), dim=1)
    cached = teacher.topk(k, dim=1)
    teacher_ids, teacher_logprobs = target_map[cached.indices], cached.values
    labels = torch.randint(vocab, (rows,), generator=generator)
    labels[0] = -1
    # Row 1: the teacher's top-1 far above everything else, so exp(x - max) is 0 in float32 on the whole rest.
    logits[1] = -200.0
    logits[1, teacher_ids[1].clamp(min=0)] = 0.0
    temperatures = [1.0, 2.0]

    expected = MetricSums(topk_mass=dict.fromkeys(temperatures, 0.0))
    for row in range(rows):
        x = logits[row].double().numpy()
        probability = {tau: np.exp(x / tau - np.logaddexp.reduce(x / tau)) for tau in temperatures}
        s = probability[1.0]
        kept: dict[int, float] = {}
        for j in range(k):
            token = int(teacher_ids[row, j])
            if token >= 0:
                kept[token] = kept.get(token, 0.0) + math.exp(float(teacher_logprobs[row, j]))
        rest_tokens = [v for v in range(vocab) if support[v] and v not in kept]
        teacher_rest = max(1.0 - sum(kept.values()), 0.0) if rest_tokens else 0.0
        label = int(labels[row])
        if label >= 0:
            expected.positions += 1
            expected.correct += float(np.argmax(x) == label)
            expected.nll += -math.log(s[label])
            for tau in temperatures:
                expected.topk_mass[tau] += sum(probability[tau][v] for v in kept)
        if teacher_ids[row, 0] >= 0:
            expected.agreement_positions += 1
            expected.agreements += float(np.argmax(x) == int(teacher_ids[row, 0]))
            kl = sum(t * math.log(t / s[v]) for v, t in kept.items() if t > 0)
            if teacher_rest > 0:
                kl += teacher_rest * math.log(teacher_rest / sum(s[v] for v in rest_tokens))
            expected.kl += kl
            expected.outside_mass += sum(s[v] for v in range(vocab) if not support[v])

    found = position_metrics(logits, labels, teacher_ids, teacher_logprobs, temperatures, support).sums()
    for name in ("positions", "correct", "agreement_positions", "agreements"):
        assert getattr(found, name) == getattr(expected, name), name
    for name in ("nll", "kl", "outside_mass"):
        assert getattr(found, name) == pytest.approx(getattr(expected, name), rel=1e-5), name
    assert found.topk_mass == pytest.approx(expected.topk_mass, rel=1e-5)


def test_teacher_metrics_by_hand():
    ids = np.array([[5, 3, 9], [2, 4, 8], [1, 0, 6]])
    logprobs = np.log(np.array([[0.5, 0.3, 0.1], [0.4, 0.2, 0.1], [0.6, 0.2, 0.05]]))
    labels = np.array([5, 4, 7])  # top-1 hit, in the top-k at rank 2, outside the top-k
    result = teacher_sums(ids, logprobs, labels).result()
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["perplexity"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.2) + math.log(0.05)) / 3))


def test_sums_pool_across_batches():
    a, b = MetricSums(positions=2, correct=1, nll=2.0), MetricSums(positions=3, correct=3, nll=1.0)
    a.add(b)
    assert a.result()["accuracy"] == 0.8 and a.result()["perplexity"] == pytest.approx(math.exp(3 / 5))


# A hand-made cached row in teacher ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, ordinary tokens 5, 6, 7. The model
# (any student) has every teacher token but 7, so positions labelled 7 cannot be scored on it.
MASK, UNK = 4, 1
TARGET_MAP = np.array([0, 1, 2, 3, 4, 5, 6, -1])
INPUT_MAP = np.where(TARGET_MAP < 0, UNK, TARGET_MAP)
ROW = CachedPredictions(
    input_ids=np.array([2, 4, 6, 7, 4, 5, 3]),
    positions=np.array([1, 2, 3, 4, 5]),
    # pos 1 masked, 2 kept, 3 kept (label 7: left out), 4 masked (label 7: left out), 5 random (5 in place of 6)
    labels=np.array([5, 6, 7, 7, 6]),
    # the teacher's top-1: right, wrong, right, right, right
    topk_ids=np.array([[5, 6], [5, 6], [7, 5], [7, 6], [6, 5]]),
    topk_logprobs=np.log(np.array([[0.6, 0.3]] * 5)),
    log_partitions=None,
)
MODEL_TOP1 = [5, 6, 0, 0, 5]  # right, right (copies the kept token), -, -, wrong (copies the random token)


def _hand_made_logits(input_ids, attention_mask, rows, cols):
    logits = torch.zeros(len(cols), 7)
    logits[torch.arange(len(cols)), torch.tensor(MODEL_TOP1)[: len(cols)]] = 5.0
    return logits


def test_position_kinds_come_from_the_cached_input_and_the_mask_id():
    inputs, labels = np.array([4, 6, 5, 7]), np.array([5, 6, 6, 7])
    assert [KINDS[k] for k in position_kinds(inputs, labels, MASK)] == ["mask", "keep", "random", "keep"]
    assert [KINDS[k] for k in position_kinds(inputs, labels, None)] == ["random", "keep", "random", "keep"]


def test_student_and_teacher_share_one_denominator():
    """Labels the student cannot spell leave both sides. The old scoring dropped them from the student's sums only:
    teacher 4/5 = 0.8 against the student's 2/3 on other positions; on the same 3 positions the teacher has 2/3."""
    windows = HeldOutWindows("t", "de", [ROW])
    model, teacher = score_windows(_hand_made_logits, windows, INPUT_MAP, TARGET_MAP, [])
    assert model.positions == teacher.positions == 3
    assert model.result()["accuracy"] == pytest.approx(2 / 3)
    assert teacher.result()["accuracy"] == pytest.approx(2 / 3)

    result = compare_on_windows(_hand_made_logits, windows, INPUT_MAP, TARGET_MAP, [], MASK, unk_id=UNK).result()
    assert (result["positions"], result["left_out"], result["accuracy_ratio"]) == (3, 2, pytest.approx(1.0))
    assert result["unknown_input_share"] == pytest.approx(1 / 7)  # the input token 7
    by_kind = {
        kind: (r["positions"], r["left_out"], r["model"].get("accuracy"), r["teacher"].get("accuracy"))
        for kind, r in result["by_kind"].items()
    }
    assert by_kind == {"mask": (1, 1, 1.0, 1.0), "random": (1, 0, 0.0, 1.0), "keep": (1, 1, 1.0, 0.0)}


def test_a_teacher_is_right_when_its_cached_token_is_the_labels_twin():
    """Stage one names a token by its smallest id, the label keeps the id the text had: with 8 a twin of 5 (both map
    to model token 5), the teacher whose cached top-1 is 5 is right on a label 8, and its log-probability of the
    label is that of the cached token (its twins' mass included), not the k-th's."""
    target_map = np.append(TARGET_MAP, 5)  # id 8 spells what 5 spells
    twin_row = CachedPredictions(
        input_ids=np.array([2, 4, 3]),
        positions=np.array([1]),
        labels=np.array([8]),
        topk_ids=np.array([[5, 6]]),
        topk_logprobs=np.log(np.array([[0.6, 0.3]])),
        log_partitions=None,
    )
    input_map = np.where(target_map < 0, UNK, target_map)
    _, teacher = score_windows(_hand_made_logits, HeldOutWindows("t", "de", [twin_row]), input_map, target_map, [])
    assert teacher.result()["accuracy"] == 1.0
    assert teacher.result()["perplexity"] == pytest.approx(1 / 0.6)


def test_a_summary_over_teachers_is_position_weighted_on_both_sides():
    one, two = Comparison(), Comparison()
    one.model["mask"], one.teacher["mask"] = MetricSums(positions=10, correct=1), MetricSums(positions=10, correct=5)
    two.model["keep"], two.teacher["keep"] = MetricSums(positions=30, correct=27), MetricSums(positions=30, correct=3)
    one.add(two)
    result = one.result()
    assert result["positions"] == result["model"]["positions"] == result["teacher"]["positions"] == 40
    assert result["model"]["accuracy"] == pytest.approx(28 / 40)
    assert result["teacher"]["accuracy"] == pytest.approx(8 / 40)
    assert result["accuracy_ratio"] == pytest.approx(28 / 8)


def test_windows_are_batched_by_length_and_score_as_they_do_one_at_a_time():
    """Held-out windows go to the model in batches of like length (less padding to run), and each position keeps
    its own window's logits: the figures equal those of scoring one window at a time, where nothing is padded."""
    generator = np.random.default_rng(0)
    lengths = [9, 3, 8, 4, 7, 5, 9, 3]
    rows = []
    for length in lengths:
        positions = np.sort(generator.choice(np.arange(1, length - 1), size=min(2, length - 2), replace=False))
        rows.append(
            CachedPredictions(
                input_ids=generator.integers(5, 7, size=length),
                positions=positions,
                labels=generator.integers(5, 7, size=len(positions)),
                topk_ids=np.tile([[5, 6]], (len(positions), 1)),
                topk_logprobs=np.log(np.tile([[0.6, 0.3]], (len(positions), 1))),
                log_partitions=None,
            )
        )
    windows = HeldOutWindows("t", "de", rows)
    padded = []

    def logits_fn(input_ids, attention_mask, rows, cols):
        # A model whose logits depend on the token at the position and on its window's length, not on padding.
        padded.append(input_ids.numel())
        length = attention_mask.sum(dim=1)[rows].float()
        logits = torch.zeros(len(cols), 7)
        logits[torch.arange(len(cols)), input_ids[rows, cols]] = 1.0 + length / 10
        logits[:, 5] += length / 20
        return logits

    one_at_a_time = compare_on_windows(logits_fn, windows, INPUT_MAP, TARGET_MAP, [], MASK, batch_size=1).result()
    assert sum(padded) == sum(lengths)
    padded.clear()
    in_pairs = compare_on_windows(logits_fn, windows, INPUT_MAP, TARGET_MAP, [], MASK, batch_size=2).result()
    assert padded == [2 * 3, 2 * 5, 2 * 8, 2 * 9]  # in the cache's order, pairs of 7 to 9 tokens
    for side in ("model", "teacher"):
        for key, value in one_at_a_time[side].items():
            assert in_pairs[side][key] == pytest.approx(value, rel=1e-12), (side, key)
    assert in_pairs["positions"] == one_at_a_time["positions"] == sum(len(r.positions) for r in rows)


def test_the_headline_is_at_mask_positions_not_pooled_with_kept_ones():
    """A student that copies the visible answer at kept positions and is poor at [MASK]: pooled over all masked
    positions it scores 28/40 against the teacher's 8/40 (ratio 3.5, as the old headline printed); at [MASK]
    positions, the task, it has 1/10 against 5/10 (ratio 0.2). `mdkd eval`'s table and `mdkd report` lead with
    the latter and print the pooled figure beside it."""
    comparison = Comparison()
    comparison.model["mask"], comparison.teacher["mask"] = MetricSums(10, 1), MetricSums(10, 5)
    comparison.model["keep"], comparison.teacher["keep"] = MetricSums(30, 27), MetricSums(30, 3)
    scored = comparison.result()
    assert scored["accuracy_ratio"] == pytest.approx(3.5)
    report = {"scope": "s", "languages": {"de": {"teachers": ["t"], "windows": {"t": scored}, "summary": scored}}}
    header, row = (line.split() for line in evaluate_stage.render(report).splitlines()[1:3])
    assert header[:9] == ["language", "windows", "[MASK]", "positions", "left", "out", "[MASK]", "acc", "teacher"]
    assert row[:8] == ["de", "t", "10", "0", "0.100", "0.500", "0.20", "0.700/0.200"]
    compared = report_stage.comparisons({"eval": report})[("de", "t")]
    assert (compared["student"], compared["teacher"], compared["student_all"]) == (0.1, 0.5, 0.7)
    assert compared["ratio"] == pytest.approx(0.2) and compared["positions"] == 10


def test_a_teacher_scored_on_its_own_windows_agrees_with_its_cache(training_cache, teachers_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            str(teachers_dir / "de_bert"),
            "--cache",
            str(training_cache),
            "--eval-fraction",
            "0.3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["scope"] == "all cached teachers"  # a plain model folder: every teacher's windows
    assert set(report["languages"]["de"]["windows"]) == {"de_bert", "multi_xlmr"}
    own = report["languages"]["de"]["windows"]["de_bert"]
    assert own["positions"] == own["model"]["positions"] == own["teacher"]["positions"] > 0 and own["left_out"] == 0
    assert own["model"]["agreement"] == 1.0
    assert own["model"]["accuracy"] == pytest.approx(own["teacher"]["accuracy"])
    assert own["model"]["perplexity"] >= own["teacher"]["perplexity"] * (1 - 1e-6), "the cache gives a lower bound"
    assert sum(own["by_kind"][kind]["positions"] for kind in KINDS) == own["positions"]
    for kind in KINDS:
        assert own["by_kind"][kind]["positions"] > 0, kind
        assert own["by_kind"][kind]["model"]["accuracy"] == pytest.approx(own["by_kind"][kind]["teacher"]["accuracy"])
    assert "de_bert" in result.stdout and "teacher [MASK] acc" in result.stdout and "keep acc" in result.stdout
    assert report["languages"]["de"]["raw_text"]["positions"] > 0


def _fake_run(folder, student, cache, teachers: dict | None):
    """A run folder as an `mdkd train` older than the recorded teacher selection left it (so eval plans the
    selection from its config), with `student` (any masked LM folder) as its exported student."""
    folder.mkdir()
    shutil.copytree(student, folder / "student")
    (folder / "run.json").write_text(json.dumps({"complete": True, "cache": str(cache)}))
    write_config(folder / "config.yaml", train_config(teachers=teachers))
    reader = CacheReader(cache)
    RunFolder(folder).write_held_out(0.3, (d for s in reader.manifest.shards for d in reader.doc_ids(s)))
    return folder


def test_eval_scores_the_teacher_selection_the_run_recorded(training_cache, teachers_dir, tmp_path):
    """The selection train wrote down wins over what the config would select today (every cached teacher)."""
    run = _fake_run(tmp_path / "run", teachers_dir / "de_bert", training_cache, None)
    RunFolder(run).write_teachers({"de": {"de_bert": 1.0}})
    scope_name, scope = evaluate_stage.teacher_scope(run, CacheReader(training_cache).manifest, all_teachers=False)
    assert scope_name == "the teachers the run was trained with"
    assert scope == {"de": ["de_bert"]}


def test_a_run_is_scored_on_the_windows_of_the_teachers_it_was_trained_with(training_cache, teachers_dir, tmp_path):
    """A run taught German by de_bert alone, on a cache where multi_xlmr also holds German (and Russian): the old
    scoring pooled the student over both teachers' German windows and added Russian. Here the "student" is de_bert
    itself, so on its teacher's windows it matches the teacher exactly, position for position."""
    run = _fake_run(tmp_path / "run", teachers_dir / "de_bert", training_cache, {"de": "de_bert"})
    result = CliRunner().invoke(cli, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["scope"] == "the teachers the run was trained with"
    assert set(report["languages"]) == {"de"}
    german = report["languages"]["de"]
    assert german["teachers"] == ["de_bert"] and set(german["windows"]) == {"de_bert"}
    assert german["summary"]["positions"] == german["windows"]["de_bert"]["positions"] > 0
    assert german["summary"]["model"]["accuracy"] == pytest.approx(german["summary"]["teacher"]["accuracy"])

    everything = evaluate_stage.run(run, all_teachers=True)  # `mdkd eval RUN --all-teachers`
    assert everything["scope"] == "all cached teachers"
    assert set(everything["languages"]) == {"de", "ru"}
    assert set(everything["languages"]["de"]["windows"]) == {"de_bert", "multi_xlmr"}
    assert everything["languages"]["de"]["summary"]["positions"] == sum(
        w["positions"] for w in everything["languages"]["de"]["windows"].values()
    )
    assert json.loads((run / "eval.json").read_text())["scope"] == "all cached teachers"


def test_a_run_without_teachers_in_its_config_is_scored_on_every_teacher_of_a_language(training_cache, tmp_path):
    config = write_config(tmp_path / "train.yaml", train_config(train={"eval_fraction": 0.3}))
    trained = CliRunner().invoke(
        cli, ["train", "--config", str(config), "--cache", str(training_cache), "--out", str(tmp_path / "run")]
    )
    assert trained.exit_code == 0, trained.output
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    heldout_lines = [json.loads(line) for line in metrics if '"heldout"' in line]
    assert [line["step"] for line in heldout_lines] == [4, 8] and "de" in heldout_lines[-1]["per_language"]
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(report["languages"]) == {"de", "ru"}
    assert set(report["languages"]["de"]["windows"]) == {"de_bert", "multi_xlmr"}
    for language in report["languages"].values():
        summary = language["summary"]
        assert summary["positions"] == summary["model"]["positions"] == summary["teacher"]["positions"]
        assert summary["positions"] == sum(w["positions"] for w in language["windows"].values())
        assert 0 <= summary["model"]["accuracy"] <= 1 and summary["model"]["perplexity"] > 1
    assert "all: de_bert+multi_xlmr" in result.stdout


def _scored(positions: int, student: float, teacher: float) -> dict:
    def side(accuracy: float) -> dict:
        return {"positions": positions, "accuracy": accuracy}

    return {
        "positions": positions,
        "left_out": 0,
        "model": side(student),
        "teacher": side(teacher),
        "accuracy_ratio": student / teacher,
        "by_kind": {
            kind: {
                "positions": positions // 3,
                "left_out": 0,
                "model": side(student),
                "teacher": side(teacher),
                "accuracy_ratio": student / teacher,
            }
            for kind in KINDS
        },
    }


def test_the_demo_summary_holds_each_student_against_its_own_teachers(tmp_path):
    """mono_taught is scored on de_bert's windows, multi_taught on multi_xlmr's. The old summary set each pooled
    student beside both teachers; now each student stands beside its own teacher on the same positions."""
    runs = []
    for name, teacher, student, teacher_accuracy in [
        ("mono_taught", "de_bert", 0.30, 0.60),
        ("multi_taught", demo.MULTI, 0.20, 0.25),
    ]:
        (tmp_path / name).mkdir()
        scored = _scored(300, student, teacher_accuracy)
        german = {
            "teachers": [teacher],
            "windows": {teacher: scored},
            "summary": scored,
            "raw_text": {"positions": 100, "accuracy": student / 2},
        }
        report = {"scope": "the teachers the run was trained with", "languages": {"de": german}}
        (tmp_path / name / "eval.json").write_text(json.dumps(report))
        runs.append(tmp_path / name)
    printed = summary.summarise(runs, ["de"], {}, {})
    rows = [line.split()[:7] for line in printed.splitlines()]
    assert ["de", "de_bert", "mono_taught", "100", "0.300", "0.600", "0.50"] in rows  # its [MASK] positions
    assert ["de", demo.MULTI, "multi_taught", "100", "0.200", "0.250", "0.80"] in rows
    assert not any(row[1:3] in (["de_bert", "multi_taught"], [demo.MULTI, "mono_taught"]) for row in rows if row)
    assert "de: student / own teacher accuracy at [MASK] 0.50 against 0.80; raw text 0.150 against 0.100" in printed


def test_the_demo_summary_compares_with_mlm_only_on_the_same_windows(tmp_path):
    """The MLM-only student trains with every teacher, so it is scored on every teacher's windows: each distilled
    student is held against it on the distilled student's own windows, not through ratios to other teachers."""
    accuracies = {"mono_taught": {"de_bert": 0.30}, "mlm_only": {"de_bert": 0.20, demo.MULTI: 0.40}}
    runs = []
    for name, by_teacher in accuracies.items():
        (tmp_path / name).mkdir()
        windows = {teacher: _scored(300, accuracy, 0.5) for teacher, accuracy in by_teacher.items()}
        german = {"teachers": list(windows), "windows": windows, "summary": windows["de_bert"], "raw_text": {}}
        report = {"scope": "the teachers the run was trained with", "languages": {"de": german}}
        (tmp_path / name / "eval.json").write_text(json.dumps(report))
        runs.append(tmp_path / name)
    printed = summary.summarise(runs, ["de"], {}, {})
    # Only de_bert's windows are shared: +0.100 (at every position kind), not a difference against MLM-only's
    # pooled figure (0.300 over both teachers' windows) or its [MASK]-only one.
    assert ["de", "+0.100", "|", "+0.100"] in [line.split() for line in printed.splitlines()]
    assert "mono_taught on 1 | 1 of 1 languages" in printed


@pytest.mark.parametrize(
    "make, args, fragment",
    [
        (lambda p: p, [], "neither an mdkd run folder nor a model folder"),
        (lambda p: (p / "run.json").write_text("{}") and p, [], "has no exported student yet"),
    ],
)
def test_eval_bad_input(tmp_path, make, args, fragment):
    make(tmp_path)
    result = CliRunner().invoke(cli, ["eval", str(tmp_path), *args])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr


def test_eval_of_a_model_folder_needs_a_cache(teachers_dir):
    result = CliRunner().invoke(cli, ["eval", str(teachers_dir / "de_bert")])
    assert result.exit_code == 2 and "give --cache DIR" in result.stderr


def _window(positions: int, left_out: int, student: float, teacher: float) -> dict:
    """A window's eval entry whose [MASK] positions hold the given figures (the other kinds are empty)."""
    masked = {
        "positions": positions,
        "left_out": left_out,
        "model": {"positions": positions, "accuracy": student},
        "teacher": {"positions": positions, "accuracy": teacher},
        "accuracy_ratio": student / teacher,
    }
    empty = {"positions": 0, "left_out": 0, "model": {"positions": 0}, "teacher": {"positions": 0}}
    return {**masked, "by_kind": {"mask": masked, "random": empty, "keep": empty}}


def test_the_demo_lead_table_holds_every_student_against_every_teacher():
    """de: de_mono (0.20) is the best teacher, multi (0.10) the other. The merged student keeps 0.18 of 0.20 on
    de_mono's windows (0.90) and beats multi on its windows (0.12 against 0.10 on the 80 positions it can spell);
    the inherited MLM-only student has 0.16 on de_mono's windows. The teacher column is the teacher over the most
    positions any student was scored on."""
    every_teacher = {
        summary.MERGED: {
            "languages": {
                "de": {"windows": {"de_mono": _window(100, 0, 0.18, 0.20), demo.MULTI: _window(80, 20, 0.12, 0.10)}}
            }
        },
        summary.INHERITED_BASELINE: {
            "languages": {
                "de": {"windows": {"de_mono": _window(100, 0, 0.16, 0.20), demo.MULTI: _window(80, 20, 0.09, 0.10)}}
            }
        },
        "mlm_only": {
            "languages": {
                "de": {"windows": {"de_mono": _window(100, 0, 0.05, 0.20), demo.MULTI: _window(100, 0, 0.04, 0.08)}}
            }
        },
    }
    lines = summary.lead_table(every_teacher, ["de"])
    rows = [line.split() for line in lines]
    assert rows[1][3:] == [summary.MERGED, summary.INHERITED_BASELINE, "mlm_only"]  # the merged pair lead
    assert ["de", "de_mono", "0.200", "0.180", "(0.90)", "0.160", "(0.80)", "0.050", "(0.25)"] in rows
    assert ["de", demo.MULTI, "0.080", "0.120", "(1.20)", "0.090", "(0.90)", "0.040", "(0.50)"] in rows
    text = "\n".join(lines)
    # Positions a student's vocabulary cannot spell are named.
    assert f"de/{demo.MULTI} 20 for {summary.MERGED}, {summary.INHERITED_BASELINE}" in text
    assert "best teacher of each language (on its windows): de 0.90 of de_mono" in text
    assert "above the multilingual teacher on its windows in 1 of 1 languages" in text
    assert f"ahead of {summary.INHERITED_BASELINE} on its own teachers' windows in 1 of 1" in text


def test_the_demo_states_each_students_exposure(tmp_path):
    """Windows per language summed over a run's train records, beside the teachers' pre-training windows."""
    run = tmp_path / "mono_taught"
    run.mkdir()
    records = [
        {"step": step, "split": "train", "windows": 4, "per_language": {"de": {"windows": 3}, "en": {"windows": 1}}}
        for step in (1, 2)
    ] + [{"step": 2, "split": "heldout", "per_language": {"de": {"windows": 99}}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    teachers = {"de_mono": {"windows": 25600}, "en_mono": {"windows": 25600}, demo.MULTI: {"windows": 51200}}
    rows = [line.split() for line in summary.exposure_lines([RunFolder(run)], ["de", "en"], teachers)]
    assert rows[2:] == [["de", "6", "25600", "51200"], ["en", "2", "25600", "51200"]]
