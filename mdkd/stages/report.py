"""`mdkd report RUN...`: students trained against one cache, side by side.

Recipe: read what each run folder holds now (its resolved config, metrics.jsonl, eval.json when `mdkd eval` has
run, run.json), so a run still going is reported as far as it got; find the config keys whose values differ
between the runs (the ablation axes); write a table (Markdown and CSV) and two PNG plots: KD and MLM loss curves
per run, and per-language accuracy of each student beside the teachers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

from mdkd.pipeline.errors import UserError


def load_run(folder: Path) -> dict:
    """A run's config, metrics and evaluation as far as they exist; a folder that is not a run is an error."""
    if not (folder / "run.json").exists() or not (folder / "config.yaml").exists():
        raise UserError(f"{folder} is not an mdkd run folder (no run.json and config.yaml from `mdkd train`)")
    metrics_path = folder / "metrics.jsonl"
    lines = [json.loads(l) for l in metrics_path.read_text(encoding="utf-8").splitlines() if l.strip()] if metrics_path.exists() else []
    train = [l for l in lines if l.get("split", "train") == "train"]
    if not train:
        raise UserError(f"run {folder} has no metrics yet (no training step logged in metrics.jsonl)")
    evaluation = folder / "eval.json"
    return {
        "name": folder.name,
        "folder": folder,
        "config": yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")),
        "status": json.loads((folder / "run.json").read_text(encoding="utf-8")),
        "train": train,
        "heldout": [l for l in lines if l.get("split") == "heldout"],
        "eval": json.loads(evaluation.read_text(encoding="utf-8")) if evaluation.exists() else None,
    }


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


def _accuracy(run: dict) -> dict[str, float]:
    """Per-language student accuracy: from eval.json when there is one, else the latest held-out evaluation."""
    if run["eval"]:
        return {l: r["model"]["accuracy"] for l, r in run["eval"]["languages"].items() if "accuracy" in r["model"]}
    if run["heldout"]:
        return {l: r["accuracy"] for l, r in run["heldout"][-1]["per_language"].items() if "accuracy" in r}
    return {}


def _teacher_accuracy(runs: list[dict]) -> dict[str, dict[str, float]]:
    """{teacher: {language: accuracy}} read from the cache by `mdkd eval` (the same in every run's eval.json)."""
    teachers: dict[str, dict[str, float]] = {}
    for run in runs:
        for language, result in ((run["eval"] or {}).get("languages") or {}).items():
            for name, window in result["windows"].items():
                if "accuracy" in window["teacher"]:
                    teachers.setdefault(name, {})[language] = window["teacher"]["accuracy"]
    return teachers


def table(runs: list[dict]) -> tuple[list[str], list[list]]:
    axes = differing_keys(runs)
    languages = sorted({l for run in runs for l in _accuracy(run)})
    headers = ["run", *axes, "steps", "complete", "loss", "kd_loss", "mlm_loss", *[f"acc {l}" for l in languages]]
    rows = []
    for run in runs:
        flat, last, accuracy = _flatten(run["config"]), run["train"][-1], _accuracy(run)
        rows.append([run["name"], *[flat.get(k) for k in axes], last["step"], bool(run["status"].get("complete")),
                     last["loss"], last["kd_loss"], last["mlm_loss"], *[accuracy.get(l) for l in languages]])
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
        steps = [l["step"] for l in run["train"]]
        for axis, key in zip(axes, ("kd_loss", "mlm_loss")):
            axis.plot(steps, [l[key] for l in run["train"]], label=run["name"], linewidth=1.2)
    for axis, title in zip(axes, ("KD loss (τ² · KL, masked positions)", "MLM loss (cross-entropy, masked positions)")):
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
    """Grouped bars per language: each student, then each teacher; False when no run has been evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"student: {run['name']}", _accuracy(run)) for run in runs]
    series += [(f"teacher: {name}", accuracy) for name, accuracy in sorted(_teacher_accuracy(runs).items())]
    series = [(label, values) for label, values in series if values]
    if not series:
        return False
    languages = sorted({l for _, values in series for l in values})
    colours = {label: f"C{index % 10}" for index, (label, _) in enumerate(series)}
    most = max(sum(1 for _, values in series if language in values) for language in languages)
    width = 0.8 / most
    figure, axis = plt.subplots(figsize=(min(16, 3 + len(languages) * (0.3 * most + 0.6)), 4.5))
    drawn = set()
    for position, language in enumerate(languages):
        # Only the students and teachers that have a figure for this language get a bar, centred on it.
        present = [(label, values[language]) for label, values in series if language in values]
        for slot, (label, value) in enumerate(present):
            axis.bar(position + (slot - (len(present) - 1) / 2) * width, value, width, color=colours[label],
                     label=None if label in drawn else label, hatch="//" if label.startswith("teacher") else None,
                     edgecolor="black", linewidth=0.4)
            drawn.add(label)
    axis.set_xticks(range(len(languages)), languages)
    axis.set_xlabel("language")
    axis.set_ylabel("masked-token accuracy (held-out)")
    axis.set_title("Students against teachers, per language")
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
