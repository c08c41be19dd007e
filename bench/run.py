"""The benchmarks' one entry point: runs the chosen benchmarks in sequence and joins their results.

    python bench/run.py                       # core, sampler, platform, recipes (tens of minutes on 2 cores)
    python bench/run.py --quick               # small sizes of each: a few minutes, for a smoke check
    python bench/run.py --only core sampler   # some of them
    python bench/run.py --only scale          # the 500-trial platform simulation (needs a tracking server)

Each benchmark writes OUT/<name>.json and OUT/<name>.md itself (see its own docstring); this script writes
OUT/summary.json (every benchmark's JSON under its name, plus the command lines and wall times) and
OUT/summary.md (the Markdown files one after another). Each benchmark runs in its own process, so one that fails
is reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (script, full-size arguments, --quick arguments)
BENCHES = {
    "core": ("bench_core.py", [], ["--quick", "--repeats", "1"]),
    "sampler": ("bench_sampler.py", [], ["--batch", "10000", "--repeats", "2", "--image-batch", "16"]),
    "platform": ("bench_platform.py", [], ["--trials", "4", "--trial-seconds", "3"]),
    "recipes": ("bench_recipes.py", [], ["--target", "0.5", "--eval-every", "1000", "--n-samples", "2000"]),
    "scale": ("bench_scale.py", [], ["--trials", "40"]),
}
DEFAULT = ["core", "sampler", "platform", "recipes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BENCHES), default=DEFAULT)
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not numbers to quote)")
    p.add_argument("--out", default="bench/out")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                 "processor": platform.machine()}, "quick": a.quick, "benchmarks": {}}
    md = ["# betadiff benchmarks", "", f"`python bench/run.py {' '.join(argv or sys.argv[1:])}`".replace(" `", "`"),
          ""]
    failed = []
    for name in a.only:
        script, full, quick = BENCHES[name]
        cmd = [sys.executable, str(HERE / script), *(quick if a.quick else full), "--out", str(out)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        wall = time.perf_counter() - t0
        entry: dict = {"command": cmd[1:], "rc": rc, "wall_s": round(wall, 1)}
        js, mdf = out / f"{name}.json", out / f"{name}.md"
        if rc == 0 and js.is_file():
            entry["result"] = json.loads(js.read_text())
        else:
            failed.append(name)
        summary["benchmarks"][name] = entry
        md += [f"## {name} ({wall / 60:.1f} min, rc {rc})", ""]
        text = mdf.read_text().strip() if rc == 0 and mdf.is_file() else "(failed: see its output above)"
        md += ["#" + ln if ln.startswith("#") else ln for ln in text.splitlines()] + [""]  # nest its headings
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text("\n".join(md))
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}" + (f"; failed: {', '.join(failed)}" if failed
                                                                        else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
