"""`mdkd report RUN...`: students trained against one cache, side by side.

Recipe: read what each run folder holds now (its resolved config, metrics.jsonl, eval.json when `mdkd eval` has
run, run.json), so a run still going is reported as far as it got; find the config keys whose values differ
between the runs (the ablation axes); write a table (Markdown and CSV) and two PNG plots: KD and MLM loss curves
per run, and per (language, teacher) the accuracy of each student beside that teacher's on the same [MASK]
positions.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mdkd.pipeline.distill.run import RunFolder
from mdkd.pipeline.errors import UserError


def load_run(folder: Path) -> dict:
    """A run's config, metrics and evaluation as far as they exist; a folder that is not a run is an error."""
    run_folder = RunFolder(folder)
    if not run_folder.is_run() or not run_folder.has_config():
        raise UserError(f"{folder} is not an mdkd run folder (no run record and config from `mdkd train`)")
    lines = run_folder.metrics.read()
    train = [line for line in lines if line.get("split", "train") == "train"]
    if not train:
        raise UserError(f"run {folder} has no metrics yet (no training step logged)")
    return {
        "name": run_folder.name,
        "folder": folder,
        "config": run_folder.config_values(),
        "status": run_folder.record(),
        "train": train,
        "heldout": [line for line in lines if line.get("split") == "heldout"],
        "eval": _current_eval(run_folder.evaluation()),
    }


def _current_eval(report: dict | None) -> dict | None:
    """The evaluation in today's layout (student and teacher on the same positions); None when absent or written
    by an older mdkd, whose pooled figures are not comparable (rerun `mdkd eval RUN`)."""
    return report if report is not None and "scope" in report else None


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def differing_keys(runs: list[dict]) -> list[str]:
    """Config keys (dotted) whose values are not the same in every run, in a stable order."""
    flats = [_flatten(run["config"]) for run in runs]
    keys = sorted(set().union(*flats))
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


def comparisons(run: dict) -> dict[tuple[str, str], dict]:
    """{(language, teacher): the student against that teacher on the same positions of its windows} from eval.json,
    at the positions replaced by [MASK] (at kept ones the input shows the answer): positions, student accuracy,
    teacher accuracy, their ratio; and the student's accuracy over all masked positions beside."""
    found = {}
    for language, result in ((run["eval"] or {}).get("languages") or {}).items():
        for name, scored in result["windows"].items():
            masked = scored["by_kind"]["mask"]
            if "accuracy" in masked["model"]:
                found[(language, name)] = {
                    "positions": masked["positions"],
                    "student": masked["model"]["accuracy"],
                    "teacher": masked["teacher"]["accuracy"],
                    "ratio": masked.get("accuracy_ratio"),
                    "student_all": scored["model"]["accuracy"],
                }
    return found


def _heldout_accuracy(run: dict) -> dict[str, float]:
    """Per-language student accuracy from the latest held-out evaluation during training (over the windows of the
    run's teachers, student only): what a run without eval.json shows."""
    if not run["heldout"]:
        return {}
    return {language: r["accuracy"] for language, r in run["heldout"][-1]["per_language"].items() if "accuracy" in r}


def _pairs(runs: list[dict]) -> list[tuple[str, str]]:
    return sorted({pair for run in runs for pair in comparisons(run)})


def table(runs: list[dict]) -> tuple[list[str], list[list]]:
    """One row per run: the ablation axes, progress, losses, then per (language, teacher) the student's accuracy
    at [MASK] positions of that teacher's held-out windows, its ratio to the teacher's on the same positions, and
    its accuracy over all masked positions; runs without eval.json add held-out accuracy columns from training."""
    axes = differing_keys(runs)
    pairs = _pairs(runs)
    fallback = [run for run in runs if run["eval"] is None]
    languages = sorted({language for run in fallback for language in _heldout_accuracy(run)})
    headers = ["run", *axes, "steps", "complete", "loss", "kd_loss", "mlm_loss"]
    columns = {"student": "[MASK] acc", "ratio": "[MASK] ratio", "student_all": "all acc"}
    headers += [f"{columns[key]} {language}/{teacher}" for language, teacher in pairs for key in columns]
    headers += [f"heldout acc {language}" for language in languages]
    rows = []
    for run in runs:
        flat, last, compared = _flatten(run["config"]), run["train"][-1], comparisons(run)
        heldout = _heldout_accuracy(run) if run["eval"] is None else {}
        row = [
            run["name"],
            *[flat.get(k) for k in axes],
            last["step"],
            bool(run["status"].get("complete")),
            last["loss"],
            last["kd_loss"],
            last["mlm_loss"],
        ]
        row += [compared.get(pair, {}).get(key) for pair in pairs for key in columns]
        rows.append(row + [heldout.get(language) for language in languages])
    return headers, rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value).replace("|", "/")


def write_tables(headers: list[str], rows: list[list], out_dir: Path) -> None:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with (out_dir / "report.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def plot_losses(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for run in runs:
        steps = [line["step"] for line in run["train"]]
        for axis, key in zip(axes, ("kd_loss", "mlm_loss"), strict=True):
            axis.plot(steps, [line[key] for line in run["train"]], label=run["name"], linewidth=1.2)
    titles = ("KD loss (τ² · KL, masked positions)", "MLM loss (cross-entropy, masked positions)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(3, len(labels)))
    figure.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 3), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_accuracy(runs: list[dict], path: Path) -> bool:
    """Grouped bars per (language, teacher): each student's accuracy on that teacher's held-out windows, with a
    black line across its bar at the teacher's accuracy on the same positions; False when no run has eval.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(run["name"], comparisons(run)) for run in runs]
    series = [(name, compared) for name, compared in series if compared]
    if not series:
        return False
    pairs = _pairs(runs)
    colours = {name: f"C{index % 10}" for index, (name, _) in enumerate(series)}
    most = max(sum(1 for _, compared in series if pair in compared) for pair in pairs)
    width = 0.8 / most
    figure, axis = plt.subplots(figsize=(min(18, 3 + len(pairs) * (0.3 * most + 0.6)), 4.8))
    drawn = set()
    for position, pair in enumerate(pairs):
        # Only the students scored on this teacher's windows get a bar, centred on the group.
        present = [(name, compared[pair]) for name, compared in series if pair in compared]
        for slot, (name, scored) in enumerate(present):
            x = position + (slot - (len(present) - 1) / 2) * width
            axis.bar(
                x,
                scored["student"],
                width,
                color=colours[name],
                edgecolor="black",
                linewidth=0.4,
                label=None if name in drawn else f"student: {name}",
            )
            axis.hlines(
                scored["teacher"],
                x - width / 2,
                x + width / 2,
                colors="black",
                linewidth=2,
                label=None if "teacher" in drawn else "its teacher, same positions",
            )
            drawn.update((name, "teacher"))
    axis.set_xticks(range(len(pairs)), [f"{language}\n{teacher}" for language, teacher in pairs], fontsize=8)
    axis.set_xlabel("language and the teacher whose held-out windows are scored")
    axis.set_ylabel("accuracy at held-out [MASK] positions")
    axis.set_title(
        "Students against each teacher\n(the same [MASK] positions of that teacher's held-out windows)", fontsize=10
    )
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def run(folders: list[Path], out_dir: Path) -> dict:
    runs = [load_run(folder) for folder in folders]
    out_dir.mkdir(parents=True, exist_ok=True)
    headers, rows = table(runs)
    write_tables(headers, rows, out_dir)
    plot_losses(runs, out_dir / "loss_curves.png")
    has_accuracy = plot_accuracy(runs, out_dir / "accuracy.png")
    return {"headers": headers, "rows": rows, "plots": ["loss_curves.png"] + (["accuracy.png"] if has_accuracy else [])}
