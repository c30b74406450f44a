"""Mutation score per module from mutmut's cache (mutants/**/*.py.meta), for TESTING.md.

Usage: python tools/mutation_report.py [--equivalent tools/equivalent_mutants.txt]

A mutant listed in the equivalent file (one mutant name per line, '#' starts a comment) and
still surviving is counted as equivalent, not survived. Score = killed / (generated -
equivalent - not run); "killed" includes timeouts, as mutmut counts them. A mutant that no
selected test reaches ("no tests", mutmut's exit code 33) is not "not run": nothing would
notice it, so it counts against the score in a column of its own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KILLED = {1, 3, 36, 24, -24, 152, 255, 37}
SURVIVED = {0}
NO_TESTS = {33}
NOT_RUN = {None, 2, 5, 34}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--equivalent", default="tools/equivalent_mutants.txt")
    parser.add_argument("--survivors", action="store_true", help="list the survivors")
    args = parser.parse_args()
    equivalent = set()
    eq_path = Path(args.equivalent)
    if eq_path.exists():
        for line in eq_path.read_text().splitlines():
            name = line.split("#", 1)[0].strip()
            if name:
                equivalent.add(name)
    metas = sorted(Path("mutants").glob("pqnet/**/*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutation` first")
        return 1
    rows, survivors = [], []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        module = str(meta.relative_to("mutants")).removesuffix(".meta")
        c = {"generated": len(codes), "killed": 0, "equivalent": 0, "survived": 0,
             "no tests": 0, "not run": 0, "other": 0}
        for name, code in codes.items():
            if code in KILLED:
                c["killed"] += 1
            elif code in SURVIVED and name in equivalent:
                c["equivalent"] += 1
            elif code in SURVIVED:
                c["survived"] += 1
                survivors.append(name)
            elif code in NO_TESTS:
                c["no tests"] += 1
                survivors.append(name + "  (no test reaches it)")
            elif code in NOT_RUN:
                c["not run"] += 1
            else:  # segfault / suspicious
                c["other"] += 1
        rows.append((module, c))
    header = f"{'module':40} {'gen':>5} {'killed':>6} {'equiv':>5} {'surv':>5} {'notest':>6} " \
             f"{'notrun':>6} " \
             f"{'other':>5} {'score':>7}"
    print(header)
    total = dict.fromkeys(rows[0][1], 0)
    skipped = [m for m, c in rows if c["not run"] == c["generated"]]
    rows = [(m, c) for m, c in rows if m not in skipped]
    for module, c in rows + [("TOTAL (run)", total)]:
        if module != "TOTAL (run)":
            for k in total:
                total[k] += c[k]
        run = c["generated"] - c["equivalent"] - c["not run"]
        score = f"{100 * c['killed'] / run:6.1f}%" if run else "     -"
        print(f"{module:40} {c['generated']:5} {c['killed']:6} {c['equivalent']:5} "
              f"{c['survived']:5} {c['no tests']:6} {c['not run']:6} {c['other']:5} {score:>7}")
    if skipped:
        print("\nnot run yet: " + ", ".join(skipped))
    if args.survivors:
        print("\nsurvivors:")
        for name in survivors:
            print("  " + name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
