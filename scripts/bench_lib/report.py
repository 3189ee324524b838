"""Statistics, the machine, and the three renderings of one result.

A result is a dict (it is also the JSON)::

    {"machine": {...}, "command": "scripts/bench ...", "started": iso, "seconds": s,
     "sections": [{"id", "title", "columns": [[key, heading], ...],
                   "rows": [{key: value}], "notes": [str]}]}

``table()`` renders it for a terminal, ``markdown()`` as BENCHMARKS.md.
"""

import json as _json
import math as _math
import os as _os
import platform as _platform


def percentile(sorted_xs, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_xs:
        return None
    k = max(1, _math.ceil(p / 100 * len(sorted_xs)))
    return sorted_xs[k - 1]


def summarize_ns(values_ns):
    """{n, p50_us, p99_us, max_us, mean_us, min_us} of nanosecond samples."""
    xs = sorted(values_ns)
    if not xs:
        return {"n": 0, "p50_us": None, "p99_us": None, "max_us": None, "mean_us": None, "min_us": None}
    us = lambda v: round(v / 1000, 1)
    return {"n": len(xs), "p50_us": us(percentile(xs, 50)), "p99_us": us(percentile(xs, 99)),
            "max_us": us(xs[-1]), "mean_us": us(sum(xs) / len(xs)), "min_us": us(xs[0])}


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine():
    """Kernel, CPU model, cores, memory, Python, load: what a reader needs to weigh the numbers."""
    cpu = "unknown"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    virt = _read("/sys/class/dmi/id/product_name").strip() or _read("/sys/devices/virtual/dmi/id/sys_vendor").strip()
    return {
        "kernel": _platform.release(),
        "arch": _platform.machine(),
        "cpu": cpu,
        "cores": _os.cpu_count(),
        "cores_usable": len(_os.sched_getaffinity(0)),
        "mem_gib": round(mem_kb / 1048576, 1),
        "python": _platform.python_version(),
        "platform": virt or None,
        "loadavg_start": _read("/proc/loadavg").split()[:3],
        "pid_max": int(_read("/proc/sys/kernel/pid_max") or 0),
    }


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:,.0f}"
        if v >= 100:
            return f"{v:.0f}"
        return f"{v:.1f}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def _grid(section):
    heads = [h for _, h in section["columns"]]
    rows = [[_fmt(r.get(k)) for k, _ in section["columns"]] for r in section["rows"]]
    return heads, rows


def table(result):
    """Plain-text rendering for a terminal."""
    out = []
    m = result["machine"]
    out.append(f"procwatch bench  kernel {m['kernel']}  {m['cpu']}  {m['cores_usable']}/{m['cores']} cores  "
               f"load {' '.join(m['loadavg_start'])}  ({result['seconds']:.0f} s)")
    for sec in result["sections"]:
        out.append("")
        out.append(sec["title"])
        heads, rows = _grid(sec)
        if rows:
            width = [max(len(x) for x in col) for col in zip(heads, *rows)]
            left = [not any(c[0].isdigit() or c[0] == "-" for c in col[1:]) for col in zip(heads, *rows)]
            for i, cells in enumerate([heads] + rows):
                out.append("  " + "  ".join(c.ljust(w) if lft else c.rjust(w)
                                             for c, w, lft in zip(cells, width, left)))
                if i == 0:
                    out.append("  " + "  ".join("-" * w for w in width))
        for note in sec.get("notes", []):
            out.append(f"  * {note}")
    return "\n".join(out)


def markdown(result):
    """BENCHMARKS.md: the latest table, the machine, the command."""
    m = result["machine"]
    out = ["# procwatch benchmarks", "",
           "Produced by `scripts/bench`; a benchmark, not a test: nothing here passes or fails.",
           "The machines are shared and noisy: compare rows of the same run (ratios), not absolute times.",
           "", "## Machine", "",
           f"- kernel {m['kernel']} ({m['arch']}); CPU {m['cpu']}; {m['cores_usable']} of {m['cores']} cores usable; "
           f"{m['mem_gib']} GiB RAM" + (f"; {m['platform']}" if m.get("platform") else ""),
           f"- Python {m['python']}; load average at start {' '.join(m['loadavg_start'])}; pid_max {m['pid_max']}",
           f"- run started {result['started']}, took {result['seconds']:.0f} s; load average at the end "
           f"{' '.join(m.get('loadavg_end') or ['?'])}",
           "", "Reproduce with:", "", "```", result["command"], "```"]
    pics = result.get("pictures") or {}
    if pics.get("files") or pics.get("note"):
        out += ["", "## Pictures", ""]
        for title, name in pics.get("files", []):
            out += [f"![{title}]({name})", ""]
        if pics.get("note"):
            out.append(f"- {pics['note']}")
    for sec in result["sections"]:
        out += ["", f"## {sec['title']}", ""]
        heads, rows = _grid(sec)
        if rows:
            out.append("| " + " | ".join(heads) + " |")
            out.append("|" + "|".join("---" for _ in heads) + "|")
            for r in rows:
                out.append("| " + " | ".join(r) + " |")
            out.append("")
        for note in sec.get("notes", []):
            out.append(f"- {note}")
    return "\n".join(out) + "\n"


KEEP_MARKER = "<!-- scripts/bench keeps everything below this line when it rewrites the file -->"


def write_markdown(result, path):
    """Write BENCHMARKS.md, keeping the hand-written part below KEEP_MARKER of the old file."""
    kept = ""
    try:
        with open(path) as f:
            old = f.read()
        if KEEP_MARKER in old:
            kept = old[old.index(KEEP_MARKER):]
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        f.write(markdown(result))
        if kept:
            f.write("\n" + kept)


def write_json(result, path):
    with open(path, "w") as f:
        _json.dump(result, f, indent=2)
        f.write("\n")
