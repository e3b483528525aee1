"""Plot bench/results/scale.json: peak anonymous memory and wall time per stage against the model's parameters.

    .venv/bin/python bench/scale/plot.py        # writes docs/images/scale.png and prints the markdown table

Two panels drawn with Pillow (no plotting library): left, each stage's peak RssAnon (GB) with the issue's goal
(2 GB + 1.5 x the largest layer in fp32) as a dashed line; right, each stage's wall time (s). One point per shape.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "scale.json"
STAGES = {"convert": "#ef6c00", "quantize[Q4_K_M]": "#1e88e5", "quantize[Q5_K_M]": "#43a047",
          "quantize[Q8_0]": "#8e24aa", "smoke": "#6d4c41", "merge": "#9e9e9e"}


def shapes(results: dict) -> list[tuple[float, str, dict]]:
    """(billions of parameters, name, entry), smallest first."""
    out = []
    for name, entry in results["shapes"].items():
        plan = entry["runs"][0].get("plan") or {}
        out.append((plan.get("parameters", 0) / 1e9, name, entry))
    return sorted(out)


def panel(draw: Any, box: tuple[int, int, int, int], points: list[tuple[float, str, dict]],
          series: dict[str, list[float | None]], *, title: str, unit: str, goal: list[float] | None = None) -> None:
    """One scatter-line panel in ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    xmax = max(p for p, _, _ in points) * 1.1
    ymax = max([v for s in series.values() for v in s if v is not None] + ([max(goal)] if goal else [])) * 1.15
    draw.rectangle(box, outline="black")
    draw.text((x0, y0 - 18), title, fill="black")
    for i in range(5):
        y = y1 - (y1 - y0) * i / 4
        draw.text((x0 - 44, y - 6), f"{ymax * i / 4:.1f}{unit}", fill="black")
    for params, _, _ in points:
        x = x0 + (x1 - x0) * params / xmax
        draw.text((x - 14, y1 + 4), f"{params:.1f}B", fill="black")

    def xy(params: float, value: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * params / xmax, y1 - (y1 - y0) * value / ymax

    if goal:
        line = [xy(p, g) for (p, _, _), g in zip(points, goal, strict=True)]
        for a, b in itertools.pairwise(line):
            draw.line([a, b], fill="red", width=1)
        draw.text((line[-1][0] - 60, line[-1][1] - 14), "goal", fill="red")
    for stage, values in series.items():
        line = [xy(p, v) for (p, _, _), v in zip(points, values, strict=True) if v is not None]
        draw.line(line, fill=STAGES[stage], width=2) if len(line) > 1 else None
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=STAGES[stage])


TASKS = ("plan", "download", "merge", "convert", "quantize[Q4_K_M]", "quantize[Q5_K_M]", "quantize[Q8_0]", "smoke",
         "install", "promote", "health", "retention")


def print_tables(points: list[tuple[float, str, dict]]) -> None:
    """The markdown tables of docs/benchmarks.md: memory, disk and time per shape."""
    head = "| | " + " | ".join(f"{name} ({params:.2f}B)" for params, name, _ in points) + " |"
    rule = "|---" * (len(points) + 1) + "|"
    print("peak anonymous memory per task (GB, the largest over the runs)\n" + head + "\n" + rule)
    print("| goal: 2 GB + 1.5 x largest layer (fp32) | " + " | ".join(f"{e['goal_gb']}" for _, _, e in points) + " |")
    for task in TASKS:
        print(f"| {task} | " + " | ".join(str(e["peak_anon_rss_gb"].get(task, "-")) for _, _, e in points) + " |")
    print("\ndisk per shape\n| shape | plan's need (GB) | high-water (GB) | store after each run (GB) "
          "| store + LM Studio, hard links once (GB) |")
    print("|---|---|---|---|---|")
    for _, name, entry in points:
        needs = [sum(d["need_bytes"] for d in (r.get("plan") or {}).get("disk", [])) / 1e9 for r in entry["runs"]]
        highs = [r["disk_high_water_gb"] for r in entry["runs"]]
        print(f"| {name} | {' / '.join(f'{n:.2f}' for n in needs)} | {' / '.join(map(str, highs))} | "
              f"{' / '.join(map(str, entry['store_gb_after_runs']))} | "
              f"{' / '.join(str(r.get('store_and_lmstudio_gb', '-')) for r in entry['runs'])} |")
    print("\nwall time of the first run (s)\n" + head + "\n" + rule)
    for task in ("total", *TASKS):
        print(f"| {task} | " + " | ".join(str(e["wall_s"].get(task, "-")) for _, _, e in points) + " |")
    for _, name, entry in points:
        if entry.get("reference"):
            print(f"\n{name}: seed-style script {entry['reference']} ; DAG / script = {entry['ratio_vs_reference']}")


def main() -> int:
    """Draw the PNG and print the table."""
    from PIL import Image, ImageDraw

    results = json.loads(RESULTS.read_text())
    points = shapes(results)
    memory = {s: [e["peak_anon_rss_gb"].get(s) for _, _, e in points] for s in STAGES}
    times = {s: [e["wall_s"].get(s) for _, _, e in points] for s in STAGES}
    image = Image.new("RGB", (1000, 440), "white")
    draw = ImageDraw.Draw(image)
    panel(draw, (70, 40, 470, 360), points, memory, title="peak anonymous memory per task (GB)", unit="",
          goal=[e["goal_gb"] for _, _, e in points])
    panel(draw, (570, 40, 970, 360), points, times, title="wall time per task (s)", unit="")
    for i, (stage, color) in enumerate(STAGES.items()):
        draw.rectangle([70 + i * 150, 400, 82 + i * 150, 412], fill=color)
        draw.text((88 + i * 150, 400), stage, fill="black")
    out = ROOT / "docs" / "images" / "scale.png"
    image.save(out)
    print(f"wrote {out}")
    print_tables(points)
    return 0


if __name__ == "__main__":
    sys.exit(main())
