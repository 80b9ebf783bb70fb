"""The sentiment experiment's report: frontier.csv, the reward-KL plot and the KL-bucket table.

Rows are dicts with the CSV's columns: run, method, hyperparameter, step, reward,
reward_stderr, kl, kl_stderr (one per evaluated checkpoint, the SFT model, and each
Best-of-N). Everything here is a pure function of the rows, so the report can be redrawn
from a committed frontier.csv (`read_csv`).
"""

from __future__ import annotations

import csv
import math
import os

# Methods in legend order, with the colours of one fixed palette (tab10), so that every plot
# of the experiment draws a method in the same colour.
METHOD_ORDER = (
    "SFT",
    "DPO",
    "Preferred-FT",
    "Unlikelihood",
    "Best-of-N (oracle)",
    "Best-of-N (learned RM)",
    "IPO",
    "cDPO",
    "SimPO",
    "PPO",
    "PPO-GT",
)
COLOURS = {
    "SFT": "black",
    "DPO": "tab:red",
    "Preferred-FT": "tab:blue",
    "Unlikelihood": "tab:green",
    "Best-of-N (oracle)": "tab:gray",
    "Best-of-N (learned RM)": "tab:olive",
    "IPO": "tab:orange",
    "cDPO": "tab:purple",
    "SimPO": "tab:brown",
    "PPO": "tab:pink",
    "PPO-GT": "tab:cyan",
}
NUMERIC = ("step", "reward", "reward_stderr", "kl", "kl_stderr")


def write_csv(path: str, rows: list[dict], columns) -> None:
    """One line per row; floats as Python writes them (repr: exact, so reruns compare)."""
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            row[key] = int(row[key]) if key == "step" else float(row[key])
    return rows


def methods_of(rows: list[dict]) -> list[str]:
    """The methods present, in METHOD_ORDER (unknown ones after, by name)."""
    present = {r["method"] for r in rows}
    known = [m for m in METHOD_ORDER if m in present]
    return known + sorted(present - set(known))


def plot_frontier(path: str, rows: list[dict], *, title: str = "") -> None:
    """Reward vs KL, one colour per method, every checkpoint a point (as the paper's Fig. 2
    left); the SFT model is the star at KL 0, Best-of-N points are joined in N order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    for i, method in enumerate(methods_of(rows)):
        points = [r for r in rows if r["method"] == method]
        colour = COLOURS.get(method, f"C{i % 10}")
        kl = [r["kl"] for r in points]
        reward = [r["reward"] for r in points]
        if method == "SFT":
            ax.scatter(kl, reward, marker="*", s=220, color=colour, label=method, zorder=4)
        elif method.startswith("Best-of-N"):
            order = sorted(range(len(points)), key=lambda j: kl[j])
            ax.plot(
                [kl[j] for j in order],
                [reward[j] for j in order],
                "--",
                marker="D",
                color=colour,
                label=method,
                zorder=3,
            )
            for j in order:
                ax.annotate(
                    points[j]["hyperparameter"],
                    (kl[j], reward[j]),
                    fontsize=7,
                    xytext=(4, -10),
                    textcoords="offset points",
                )
        else:
            ax.scatter(kl, reward, s=22, color=colour, alpha=0.85, label=method, zorder=3)
    ax.set_xlabel("KL(policy || SFT) [nats per completion]")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bucket_label(low: float, high: float) -> str:
    return f"[{low:g}, {high:g})" if math.isfinite(high) else f">= {low:g}"


def bucket_table(rows: list[dict], edges) -> str:
    """Markdown: per method, the best mean reward (+- its stderr, and which run@step) among
    its points in each KL bucket [edges[i], edges[i+1]) (the last open-ended); '-' where it has
    none. A slightly negative KL estimate (sampling noise around 0) counts in the first."""
    bounds = [*edges, math.inf]
    buckets = list(zip(bounds[:-1], bounds[1:], strict=True))
    header = ["method", *(bucket_label(lo, hi) for lo, hi in buckets)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods_of(rows):
        cells = [method]
        for i, (low, high) in enumerate(buckets):
            inside = [
                r
                for r in rows
                if r["method"] == method and (low <= r["kl"] < high or (i == 0 and r["kl"] < low))
            ]
            if not inside:
                cells.append("-")
                continue
            best = max(inside, key=lambda r: r["reward"])
            cells.append(
                f"{best['reward']:.3f} +- {best['reward_stderr']:.3f} "
                f"({best['run']}@{best['step']})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "\nBest mean reward per KL(policy || SFT) bucket (nats), +- its standard error, and "
        "the run@step that reached it. Best-of-N's KL is the analytic log N - (N-1)/N.\n"
    )
    return "\n".join(lines) + "\n" + note


def dominates(a: dict, b: dict) -> bool:
    """Point a dominates b: at least b's mean reward at no more KL, better in one of them."""
    return (
        a["reward"] >= b["reward"]
        and a["kl"] <= b["kl"]
        and (a["reward"] > b["reward"] or a["kl"] < b["kl"])
    )


def dominance_table(rows: list[dict], method: str = "DPO") -> str:
    """Markdown: for `method` and every other trained method X (SFT and Best-of-N aside), how
    many of `method`'s points some point of X dominates, and how many of X's points some
    point of `method` dominates (by the means; standard errors not accounted for)."""
    mine = [r for r in rows if r["method"] == method]
    lines = [f"| X | {method} points dominated by an X point | X points dominated by a "
             f"{method} point |", "|---|---|---|"]  # fmt: skip
    for other in methods_of(rows):
        if other in (method, "SFT") or other.startswith("Best-of-N") or not mine:
            continue
        theirs = [r for r in rows if r["method"] == other]
        by_other = sum(any(dominates(t, m) for t in theirs) for m in mine)
        by_mine = sum(any(dominates(m, t) for m in mine) for t in theirs)
        lines.append(f"| {other} | {by_other} of {len(mine)} | {by_mine} of {len(theirs)} |")
    if len(lines) == 2:  # no other trained method (the quickstart's DPO-only run)
        return ""
    return "\n".join(lines) + "\n"
