"""What the demo prints: first MergeDistill's question (every student against every teacher at held-out [MASK]
positions, and the merged student's ratio to the best teacher of each language); then the exposure behind it, the
teachers against the frequent-token bar, each student against its teachers and against the MLM-only student, and
Knowledge Inheritance's headline figure with its plot.

Every comparison between two models is made on positions both were scored on: a student and a teacher on that
teacher's held-out windows (eval.json), a distilled student and the MLM-only student on the (language, teacher)
windows the distilled student trained with (MLM-only trains with every teacher, so it is scored on all of them).
Accuracy is at the positions stage one replaced by [MASK] unless a table says otherwise: at kept positions the
input shows the answer.
"""

from __future__ import annotations

import math
from pathlib import Path

from mdkd.demo.settings import MULTI, mono
from mdkd.pipeline.distill.run import RunFolder

BASELINE = "mlm_only"  # from random weights, MLM only: the baseline of Knowledge Inheritance's figure
MERGED = "multi_init_mono_taught"  # MergeDistill's: the multilingual teacher's weights, each language's own teacher
INHERITED_BASELINE = "multi_init_mlm_only"  # the same start, data and steps, MLM only
INHERITED = (MERGED, INHERITED_BASELINE)


def _mask_windows(report: dict) -> dict[tuple[str, str], dict]:
    """{(language, teacher window): the model against the teacher at [MASK] positions of that window}."""
    return {
        (language, window): scored["by_kind"]["mask"]
        for language, result in report["languages"].items()
        for window, scored in result["windows"].items()
    }


def lead_table(every_teacher: dict[str, dict], languages: list[str]) -> list[str]:
    """MergeDistill's question in one table: per language and teacher window, the teacher and every student at
    held-out [MASK] positions (each student with its ratio to the teacher on the positions it was scored on), then
    the merged student against the best teacher of each language, the multilingual teacher, and MLM alone."""
    names = [name for name in (*INHERITED, *every_teacher) if name in every_teacher]
    names = list(dict.fromkeys(names))
    if not names:
        return []
    scores = {name: _mask_windows(every_teacher[name]) for name in names}
    lines = [
        "MergeDistill's question: every student against every teacher at held-out [MASK] positions of that "
        "teacher's windows (student accuracy, and its ratio to the teacher on the same positions):",
        f"{'language':<8}  {'windows':<8}  {'teacher':>7}  " + "  ".join(f"{name:>22}" for name in names),
    ]
    best, left_out = {}, {}  # (window, positions left out) -> the students
    for language in languages:
        windows = list(dict.fromkeys(w for name in names for (lang, w) in scores[name] if lang == language))
        for window in windows:
            scored = {name: scores[name][language, window] for name in names if (language, window) in scores[name]}
            widest = max(scored.values(), key=lambda s: s["positions"])  # the teacher over the most positions
            teacher = widest["teacher"].get("accuracy")
            if teacher is None:
                continue
            if teacher > best.get(language, ("", -1.0))[1]:
                best[language] = (window, teacher)
            cells = []
            for name in names:
                mine = scored.get(name, {})
                accuracy, ratio = mine.get("model", {}).get("accuracy"), mine.get("accuracy_ratio")
                cell = "-" if accuracy is None else f"{accuracy:.3f} ({'-' if ratio is None else f'{ratio:.2f}'})"
                cells.append(cell.rjust(22))
                if mine.get("left_out"):
                    left_out.setdefault((f"{language}/{window}", mine["left_out"]), []).append(name)
            lines.append(f"{language:<8}  {window:<8}  {teacher:7.3f}  " + "  ".join(cells))
    if left_out:
        lines.append(
            "[MASK] positions left out of a student's cell (labels its vocabulary cannot spell): "
            + "; ".join(f"{window} {count} for {', '.join(names)}" for (window, count), names in left_out.items())
        )
    return lines + _merged_against(scores, languages, best)


def _merged_against(scores: dict[str, dict], languages: list[str], best: dict[str, tuple[str, float]]) -> list[str]:
    """The merged student's three aims, language by language."""
    if MERGED not in scores:
        return []
    merged = scores[MERGED]
    to_best, above_multi, ahead = [], 0, 0
    for language in languages:
        if language not in best:
            continue
        window = best[language][0]
        ratio = merged.get((language, window), {}).get("accuracy_ratio")
        to_best.append(f"{language} {ratio:.2f} of {window}" if ratio is not None else f"{language} -")
        multi_ratio = merged.get((language, MULTI), {}).get("accuracy_ratio")
        above_multi += multi_ratio is not None and multi_ratio > 1
        own = (language, mono(language))
        mine = merged.get(own, {}).get("model", {}).get("accuracy")
        baseline = scores.get(INHERITED_BASELINE, {}).get(own, {}).get("model", {}).get("accuracy")
        ahead += mine is not None and baseline is not None and mine > baseline
    counted = len(to_best)
    return [
        f"{MERGED}, against the best teacher of each language (on its windows): " + ", ".join(to_best),
        f"  above the multilingual teacher on its windows in {above_multi} of {counted} languages; ahead of "
        f"{INHERITED_BASELINE} on its own teachers' windows in {ahead} of {counted}",
    ]


def exposure_lines(folders: list[RunFolder], languages: list[str], teachers: dict[str, dict]) -> list[str]:
    """Windows per language each student trained on (its metrics' per-language counts), against the teachers'
    pre-training windows."""
    lines = [
        "Exposure: windows per language each student trained on, and each teacher's pre-training windows:",
        f"{'language':<8}  " + "  ".join(f"{folder.name:>22}" for folder in folders) + "  own teacher  multi (all)",
    ]
    seen = {folder.name: _windows_seen(folder) for folder in folders}
    multi = teachers.get(MULTI, {}).get("windows")
    for language in languages:
        own = teachers.get(mono(language), {}).get("windows")
        cells = [f"{seen[folder.name].get(language, '-'):>22}" for folder in folders]
        lines.append(
            f"{language:<8}  " + "  ".join(cells) + f"  {own if own is not None else '-':>11}"
            f"  {multi if multi is not None else '-':>11}"
        )
    return lines


def _windows_seen(folder: RunFolder) -> dict[str, int | str]:
    """Per language, the windows a run trained on; "-" for a run whose records do not count them (an older mdkd)."""
    totals: dict[str, int | str] = {}
    for record in folder.metrics.read():
        if record.get("split", "train") != "train":
            continue
        if "windows" not in record:
            return dict.fromkeys(totals, "-")
        for language, scored in record["per_language"].items():
            totals[language] = totals.get(language, 0) + scored["windows"]
    return totals


def teacher_lines(teachers: dict[str, dict]) -> list[str]:
    """Each teacher's held-out accuracy at [MASK] positions beside always predicting the most frequent token."""
    lines = [
        "Teachers, pre-trained here on every window of their language's training text (held-out documents left "
        "out), scored at held-out [MASK] positions:",
        f"{'teacher':<10}  {'language':<8}  {'steps':>5}  {'text MB':>7}  {'accuracy':>8}  {'most frequent':>13}  "
        f"{'x':>5}",
    ]
    for name, record in teachers.items():
        for language, scored in record["held_out"].items():
            if not scored.get("positions"):
                continue
            bar = scored["most_frequent_token_accuracy"]
            lines.append(
                f"{name:<10}  {language:<8}  {record['steps']:>5}  {record['text_bytes'][language] / 1e6:7.2f}  "
                f"{scored['accuracy']:8.3f}  {bar:13.3f}  {scored['accuracy'] / bar:5.1f}"
            )
    return lines


def summarise(runs: list[Path], languages: list[str], teachers: dict[str, dict], every_teacher: dict[str, dict]) -> str:
    """The demo's printed summary (see the module docstring); every figure is read from the runs' files and from
    `every_teacher` (student -> its `mdkd eval --all-teachers` report)."""
    folders = [RunFolder(run) for run in runs]
    evals = {folder.name: folder.evaluation() for folder in folders if folder.has_eval()}
    lines = lead_table(every_teacher, languages) + [""] + exposure_lines(folders, languages, teachers) + [""]
    lines += teacher_lines(teachers) + [""] + _against_teachers(evals, languages)
    lines += [""] + _against_mlm_only(evals, languages)
    lines += [""] + _raw_text(evals, languages) + _mono_against_multi(evals, languages)
    lines += [""] + _inheritance(runs)
    return "\n".join(lines)


def _windows(report: dict, language: str) -> dict[str, dict]:
    return report["languages"].get(language, {}).get("windows", {})


def _against_teachers(evals: dict[str, dict], languages: list[str]) -> list[str]:
    lines = [
        "Each student against each of its teachers at [MASK] positions of that teacher's held-out windows (the "
        "same positions for both; ratio = student / teacher accuracy):",
        f"{'language':<8}  {'teacher':<10}  {'student':<22}  {'positions':>9}  {'student':>7}  {'teacher':>7}  "
        f"{'ratio':>5}",
    ]
    for language in languages:
        for teacher in sorted({t for report in evals.values() for t in _windows(report, language)}):
            for name, report in evals.items():
                scored = _windows(report, language).get(teacher, {}).get("by_kind", {}).get("mask")
                if not scored or "accuracy" not in scored["model"]:
                    continue
                ratio = scored.get("accuracy_ratio")
                lines.append(
                    f"{language:<8}  {teacher:<10}  {name:<22}  {scored['positions']:>9}  "
                    f"{scored['model']['accuracy']:7.3f}  {scored['teacher']['accuracy']:7.3f}  "
                    + (f"{ratio:5.2f}" if ratio is not None else f"{'-':>5}")
                )
    return lines


def _pooled_accuracy(report: dict, language: str, teachers: list[str], kind: str | None) -> float | None:
    """Accuracy over the given teachers' windows of a language, pooled by positions; `kind` ("mask") keeps only
    the positions of that replacement kind."""
    correct = positions = 0.0
    for teacher in teachers:
        scored = _windows(report, language).get(teacher, {})
        scored = scored.get("by_kind", {}).get(kind, {}) if kind else scored
        if "accuracy" in scored.get("model", {}):
            correct += scored["model"]["accuracy"] * scored["positions"]
            positions += scored["positions"]
    return correct / positions if positions else None


def _against_mlm_only(evals: dict[str, dict], languages: list[str]) -> list[str]:
    """Per language, each distilled student's accuracy minus the MLM-only student's, on the distilled student's
    teachers' windows of that language: at every masked position, and at those replaced by [MASK] alone. At the
    10 % kept unchanged the input shows the answer, and MLM's labels teach copying it directly. The students from
    random weights only: the inherited pair meet in the lead table."""
    distilled = [name for name in evals if name != BASELINE and name not in INHERITED]
    if BASELINE not in evals or not distilled:
        return []
    lines = [
        "Distilled minus MLM-only held-out accuracy, per language, on the distilled student's teachers' windows "
        "(equal steps, the same positions): all masked positions | those replaced by [MASK]:",
        f"{'language':<8}  " + "  ".join(f"{name:>17}" for name in distilled),
    ]
    ahead = {(name, kind): 0 for name in distilled for kind in (None, "mask")}
    counted = dict.fromkeys(distilled, 0)
    for language in languages:
        cells = []
        for name in distilled:
            teachers = list(_windows(evals[name], language))
            gains = []
            for kind in (None, "mask"):
                mine, baseline = (_pooled_accuracy(r, language, teachers, kind) for r in (evals[name], evals[BASELINE]))
                gains.append(None if mine is None or baseline is None else mine - baseline)
                ahead[name, kind] += gains[-1] is not None and gains[-1] > 0
            counted[name] += gains[0] is not None
            cells.append(" | ".join(f"{g:+.3f}" if g is not None else "  -   " for g in gains).rjust(17))
        lines.append(f"{language:<8}  " + "  ".join(cells))
    lines.append(
        "Ahead of MLM-only (all | [MASK] positions): "
        + ", ".join(f"{n} on {ahead[n, None]} | {ahead[n, 'mask']} of {counted[n]} languages" for n in distilled)
    )
    return lines


def _raw_text(evals: dict[str, dict], languages: list[str]) -> list[str]:
    """The same held-out text for every student, each with its own tokenizer: the one place where students with
    different teachers (so different cached windows) meet the same input."""
    lines = [
        "Raw held-out text, each student with its own tokenizer and fresh masking (accuracy):",
        f"{'language':<8}  " + "  ".join(f"{name:>22}" for name in evals),
    ]
    for language in languages:
        cells = []
        for report in evals.values():
            value = report["languages"].get(language, {}).get("raw_text", {}).get("accuracy")
            cells.append(f"{value:22.3f}" if value is not None else f"{'-':>22}")
        lines.append(f"{language:<8}  " + "  ".join(cells))
    return lines


def _mono_against_multi(evals: dict[str, dict], languages: list[str]) -> list[str]:
    """The teacher-choice ablation in two figures: each student's share of its own teachers' accuracy (on their
    windows), and accuracy on the same raw text."""
    if "mono_taught" not in evals or "multi_taught" not in evals:
        return []
    lines = ["Taught by the monolingual teachers against taught by the multilingual one:"]
    for language in languages:
        # Each of the two trained with one teacher per language: the ratio on that teacher's windows.
        ratios = [
            scored[0]["by_kind"]["mask"].get("accuracy_ratio")
            if len(scored := list(_windows(evals[name], language).values())) == 1
            else None
            for name in ("mono_taught", "multi_taught")
        ]
        raw = [evals[name]["languages"].get(language, {}).get("raw_text", {}).get("accuracy") for name in evals]
        raw = dict(zip(evals, raw, strict=True))
        if None in ratios or raw["mono_taught"] is None or raw["multi_taught"] is None:
            continue
        lines.append(
            f"  {language}: student / own teacher accuracy at [MASK] {ratios[0]:.2f} against {ratios[1]:.2f}; raw text "
            f"{raw['mono_taught']:.3f} against {raw['multi_taught']:.3f}"
        )
    return lines


def held_out_records(run: Path) -> list[dict]:
    """The held-out metrics of a run that are scored per 'language/teacher' window; none without."""
    records = RunFolder(run).metrics.read()
    return [record for record in records if record.get("split") == "heldout" and "per_window" in record]


def held_out_curve(records: list[dict], windows: list[str] | None = None) -> list[tuple[int, float]]:
    """(step, held-out MLM loss) from a run's held-out records: the mean cross-entropy of the true token over the
    given 'language/teacher' windows (all of the run's when None), pooled by positions."""
    curve = []
    for record in records:
        scored = [
            s for key, s in record["per_window"].items() if (windows is None or key in windows) and "perplexity" in s
        ]
        positions = sum(s["positions"] for s in scored)
        if positions:
            curve.append((record["step"], sum(math.log(s["perplexity"]) * s["positions"] for s in scored) / positions))
    return curve


def inheritance_curves(runs: list[Path]) -> dict[str, tuple[list, list]]:
    """Per distilled student from random weights: its held-out loss curve and MLM-only's, both on the windows the
    distilled student was scored on during training."""
    records = {run.name: held_out_records(run) for run in runs if run.name not in INHERITED}
    if BASELINE not in records:
        return {}
    return {
        name: (held_out_curve(own), held_out_curve(records[BASELINE], sorted(own[-1]["per_window"])))
        for name, own in records.items()
        if name != BASELINE and own
    }


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose loss is at or below `target`; None if the curve never gets there."""
    return next((step for step, loss in curve if loss <= target), None)


def _inheritance(runs: list[Path]) -> list[str]:
    curves = inheritance_curves(runs)
    if not curves:
        return []
    lines = [
        "Knowledge Inheritance's figure: the first evaluated step at which each distilled student's held-out MLM loss "
        "is at or below the MLM-only student's final one (on the distilled student's windows):"
    ]
    for name, (mine, baseline) in curves.items():
        if not mine or not baseline:
            continue
        final_step, target = baseline[-1]
        reached = first_step_reaching(mine, target)
        where = (
            f"step {reached} of {final_step} ({reached / final_step:.0%} of the steps)"
            if reached is not None
            else f"not within {final_step} steps"
        )
        lines.append(f"  {name:<12} {where}; final loss {mine[-1][1]:.3f} against MLM-only's {target:.3f} nats")
    return lines


def plot_inheritance(runs: list[Path], path: Path) -> bool:
    """One panel per distilled student: its held-out MLM loss against steps beside MLM-only's on the same windows,
    with MLM-only's final loss marked. False when there is nothing to plot."""
    curves = {name: pair for name, pair in inheritance_curves(runs).items() if pair[0] and pair[1]}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.8), sharey=True, squeeze=False)
    for axis, (name, (mine, baseline)) in zip(axes[0], curves.items(), strict=True):
        axis.plot(*zip(*mine, strict=True), label=name, linewidth=1.5)
        axis.plot(*zip(*baseline, strict=True), label=BASELINE, linewidth=1.5, color="grey")
        axis.axhline(baseline[-1][1], color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"{name} vs {BASELINE}, same windows", fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out MLM loss (nats)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
