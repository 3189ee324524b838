"""The bench's pictures: what people would rather see than read (issue 16).

One PNG per condition (idle, random, storm): the distribution (CDF) of
kill -> observer woken for every observer of that condition, on a log time
axis that runs from the fastest sample to the slowest, so no part of the
wait is cut off; kills an observer never reported end its curve below 1.
And one of the big targets (issue 14): kill -> woken against the memory the
target touched, p50 and p99 of each observer, where the death word's rows
stay flat and the teardown's grow.  Written beside BENCHMARKS.md and linked
from it.

matplotlib is a bench-only extra (``pip install '.[bench]'``), never a
dependency of the service; without it the pictures are skipped with a note.
"""

import os as _os

CONDITION_TITLES = {
    "idle": "idle machine: kill once the peer and the service sleep",
    "random": "kills at random moments (5-100 ms after the peer sleeps)",
    "storm": "under an exit storm",
}


def draw(result, rows, outdir):
    """{"files": [(title, file name)], "note": str}: the PNGs written into ``outdir``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return {"files": [], "note": f"pictures skipped: matplotlib is not installed ({e}); "
                                     "install the bench extra: .venv/bin/pip install -e '.[bench]'"}
    load = " ".join(result["machine"].get("loadavg_start") or [])
    files = []
    for cond in ("idle", "random", "storm"):
        these = [r for r in rows if r["condition"] == cond and r.get("samples_us")]
        if not these:
            continue
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for r in these:
            xs = sorted(max(x, 0.1) for x in r["samples_us"])
            n = r["kills"] or len(xs)
            ys = [(i + 1) / n for i in range(len(xs))]
            style = "-" if r["key"].startswith("pw-") else "--"
            lost = f", {r['lost']} lost" if r["lost"] else ""
            ax.step(xs, ys, style, where="post", linewidth=1.4 if style == "-" else 1.0,
                    label=f"{r['key']}: p50 {r['p50_us']:,.0f}, p99 {r['p99_us']:,.0f}, "
                          f"max {r['max_us']:,.0f} µs (n={len(xs)}{lost})")
        ax.set_xscale("log")
        ax.set_xlabel("kill -> observer woken (µs, log scale; the whole range, max included)")
        ax.set_ylabel("fraction of kills")
        ax.set_ylim(0, 1.01)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{CONDITION_TITLES[cond]}\nload average at start {load}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        name = f"bench-cdf-{cond}.png"
        fig.savefig(_os.path.join(outdir, name), dpi=110)
        plt.close(fig)
        files.append((f"kill -> observer woken, {CONDITION_TITLES[cond]}", name))
    big = draw_sizes(result, outdir, plt)
    if big:
        files.append(big)
    return {"files": files,
            "note": "CDFs: solid lines procwatch rows, dashed baselines. Big targets: solid p50, dotted p99 "
                    "(of few kills: the p99 is the largest)"}


def draw_sizes(result, outdir, plt):
    """kill -> woken against target size (the big-target section), or None when it was not measured."""
    section = next((s for s in result["sections"] if s.get("id") == "big_targets" and s.get("rows")), None)
    if section is None:
        return None
    by_observer = {}
    for r in section["rows"]:
        by_observer.setdefault(r["observer"], []).append(r)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for k, (observer, rs) in enumerate(by_observer.items()):
        rs = sorted(rs, key=lambda r: r["mib"])
        mibs = [r["mib"] for r in rs]
        color = f"C{k}"
        ax.plot(mibs, [r["p50_us"] for r in rs], "-o", color=color, linewidth=1.4, markersize=4,
                label=f"{observer} (n={rs[0]['n']} a size)")
        ax.plot(mibs, [r["p99_us"] for r in rs], ":", color=color, linewidth=1.0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("memory the target touched (MiB, log scale)")
    ax.set_ylabel("kill(SIGKILL) -> peer woken (µs, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    load = " ".join(result["machine"].get("loadavg_start") or [])
    ax.set_title(f"big targets: the death word against the teardown (solid p50, dotted p99)\n"
                 f"load average at start {load}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    name = "bench-big-targets.png"
    fig.savefig(_os.path.join(outdir, name), dpi=110)
    plt.close(fig)
    return "kill -> peer woken against the memory the target touched (big targets)", name
