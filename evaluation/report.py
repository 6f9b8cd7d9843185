"""RUN_DIR/eval/NAME/metrics.json, every number with its convention, and the Markdown table that compares them."""

from __future__ import annotations

import json
import time
from pathlib import Path

from evaluation.generate import write_atomic
from evaluation.settings import EvalError

METRICS_FILE = "metrics.json"
# Column order of the comparison table; metrics not listed follow in name order.
ORDER = ("fid", "kid", "clip_score", "aesthetic", "imagereward", "pickscore", "hpsv2", "fd_generator",
         "fd_teacher_sampler", "fd_reference", "mode_coverage_tv", "off_mode_fraction")
LOWER_IS_BETTER = {"fid", "kid", "fd_generator", "fd_teacher_sampler", "fd_reference", "mode_coverage_tv",
                   "off_mode_fraction"}


def read(folder: Path) -> dict:
    path = folder / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write(folder: Path, report: dict) -> Path:
    report = {**report, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = folder / METRICS_FILE
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    return path


def _reports(paths: list[str]) -> list[tuple[str, dict]]:
    """(label, metrics.json) of evaluation folders, metrics.json files, or every evaluation of run directories."""
    found = []
    for given in map(Path, paths):
        if given.is_file():
            files = [given]
        elif (given / METRICS_FILE).is_file():
            files = [given / METRICS_FILE]
        else:
            files = sorted((given / "eval").glob(f"*/{METRICS_FILE}"))
            if not files:
                raise EvalError(f"{given}: no {METRICS_FILE}, and no evaluations under {given / 'eval'}")
        for file in files:
            report = json.loads(file.read_text())
            found.append((f"{file.parent.parent.parent.name}/{file.parent.name}", report))
    return found


def _convention_text(convention: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in convention.items() if k not in ("images", "generated_images"))


def compare(paths: list[str]) -> str:
    """A Markdown table: one row per evaluation, one column per metric, then each metric's convention (and a
    warning where the rows' conventions differ, since their numbers are then not comparable)."""
    reports = _reports(paths)
    names = {m for _, r in reports for m in r.get("metrics", {})}
    columns = [m for m in ORDER if m in names] + sorted(names - set(ORDER))
    header = ["evaluation", "source", "step", "images"] + [f"{m} {'↓' if m in LOWER_IS_BETTER else '↑'}"
                                                            for m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, r in reports:
        source = r.get("source", {})
        kind = source.get("kind", "")
        if kind == "teacher":
            kind = f"teacher, {source.get('steps')} steps, cfg {source.get('guidance')}"
        cells = [label, kind, str(source.get("step", "")), str(r.get("generation", {}).get("num_images", ""))]
        for m in columns:
            value = r.get("metrics", {}).get(m, {}).get("value")
            cells.append("" if value is None else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for m in columns:
        conventions = {_convention_text(r["metrics"][m].get("convention", {})) for _, r in reports
                       if m in r.get("metrics", {})}
        if len(conventions) == 1:
            lines.append(f"- {m}: {conventions.pop()}")
        else:
            lines.append(f"- {m}: CONVENTIONS DIFFER, the numbers are not comparable: "
                         + " / ".join(sorted(conventions)))
    return "\n".join(lines)
