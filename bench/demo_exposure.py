"""How exposure moves the demo's students from random weights: `mono_taught` and `mlm_only` trained for several
step budgets on the demo's one cache, each scored at held-out [MASK] positions against its teachers. It prints
figures and is not a test (docs/demo.md records a run).

It needs a finished demo (`mdkd demo`): its cache and its two configs, of which only `train.steps` (and the
checkpoint and held-out cadence, kept at the same share of the budget) change. Each student is trained and scored
with mdkd's public stages:

    python bench/demo_exposure.py --workdir ~/.cache/mdkd/demo/full --out /tmp/exposure --steps 400,800,1600,3200

The demo's own runs stand for its budget (400 steps); a finished budget is skipped on a
rerun. Per budget and language it reports windows seen, the [MASK]-position accuracy ratio to the teachers (pooled
by positions over `mono_taught`'s teachers' windows of the language, for both students), and the first held-out
step at which `mono_taught` reaches `mlm_only`'s final held-out loss. The last line of stdout
is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from mdkd.demo.summary import first_step_reaching, held_out_curve, held_out_records
from mdkd.pipeline.distill.run import RunFolder
from mdkd.stages import evaluate, train

STUDENTS = ("mono_taught", "mlm_only")


def budget_config(config: dict, steps: int) -> dict:
    """The demo's config at another step budget: checkpoints and held-out scoring keep their share of it."""
    budget = json.loads(json.dumps(config))
    demo_steps = config["train"]["steps"]
    budget["train"]["steps"] = steps
    budget["train"]["checkpoint_every"] = max(1, steps * config["train"]["checkpoint_every"] // demo_steps)
    budget["train"]["eval_every"] = max(1, steps * config["train"]["eval_every"] // demo_steps)
    return budget


def mask_ratios(report: dict, windows: dict[str, list[str]]) -> dict[str, dict]:
    """Per language: the student's and the teachers' accuracy at [MASK] positions, pooled by positions over the
    given teacher windows of the language (the same for both students: mono_taught's)."""
    figures = {}
    for language, result in report["languages"].items():
        student = teacher = positions = 0.0
        for window, scored in result["windows"].items():
            if window not in windows.get(language, ()):
                continue
            masked = scored["by_kind"]["mask"]
            if masked["positions"]:
                student += masked["model"]["accuracy"] * masked["positions"]
                teacher += masked["teacher"]["accuracy"] * masked["positions"]
                positions += masked["positions"]
        if positions:
            figures[language] = {
                "positions": int(positions),
                "student": student / positions,
                "teacher": teacher / positions,
                "ratio": student / teacher if teacher else None,
            }
    return figures


def run_folder(args, name: str, steps: int, demo_config: dict) -> Path:
    """The demo's own run at the demo's budget (the same config), a new one under --out at any other."""
    if steps == demo_config["train"]["steps"]:
        return args.workdir / "runs" / name
    return args.out / f"{name}-{steps}"


def windows_seen(run: Path) -> dict[str, int] | None:
    """Per language, the windows the run trained on; None for a run whose records do not count them (an older
    mdkd's demo run)."""
    totals: dict[str, int] = {}
    for record in RunFolder(run).metrics.read():
        if record.get("split", "train") != "train":
            continue
        if "windows" not in record:
            return None
        for language, scored in record["per_language"].items():
            totals[language] = totals.get(language, 0) + scored["windows"]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a finished demo's folder (e.g. .../demo/full)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", default="400,800,1600,3200", help="comma-separated step budgets")
    args = parser.parse_args()
    budgets = [int(value) for value in args.steps.split(",")]
    cache = args.workdir / "cache"
    figures, runs = {}, {}
    for steps in budgets:
        reports = {}
        for name in STUDENTS:
            base = yaml.safe_load((args.workdir / "configs" / f"{name}.yaml").read_text(encoding="utf-8"))
            config = args.out / "configs" / f"{name}-{steps}.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.safe_dump(budget_config(base, steps), sort_keys=False), encoding="utf-8")
            run = runs[name, steps] = run_folder(args, name, steps, base)
            folder = RunFolder(run)
            if not (folder.is_run() and folder.record().get("complete")):
                train.run(config, cache, run, resume="auto" if folder.is_run() else None)
            reports[name] = folder.evaluation() or evaluate.run(run, cache_dir=cache)
        # Both on mono_taught's windows: mlm_only also trained with (and is scored on) the multilingual teacher.
        shared = {language: list(result["windows"]) for language, result in reports["mono_taught"]["languages"].items()}
        for name in STUDENTS:
            run = runs[name, steps]
            figures[f"{name}-{steps}"] = {"windows": windows_seen(run), "mask": mask_ratios(reports[name], shared)}
        taught, baseline = (held_out_records(runs[name, steps]) for name in STUDENTS)
        own = held_out_curve(taught)
        target = held_out_curve(baseline, sorted(taught[-1]["per_window"]))[-1][1]
        reached = first_step_reaching(own, target)
        figures[f"mono_taught-{steps}"]["reaches_mlm_only_final_at"] = reached
        print_budget(steps, figures, reached)
    print(json.dumps(figures))


def print_budget(steps: int, figures: dict, reached: int | None) -> None:
    taught, baseline = figures[f"mono_taught-{steps}"], figures[f"mlm_only-{steps}"]
    print(f"{steps} steps: mono_taught reaches mlm_only's final held-out loss at step {reached}")
    for language, scored in sorted(taught["mask"].items()):
        other = baseline["mask"].get(language, {})
        print(
            f"  {language}: windows {(taught['windows'] or {}).get(language)} | [MASK] ratio to teachers mono_taught "
            f"{scored['ratio']:.2f}, mlm_only {other.get('ratio') or float('nan'):.2f}"
        )


if __name__ == "__main__":
    main()
