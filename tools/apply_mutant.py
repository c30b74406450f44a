"""Apply one mutmut mutant to the working tree, to confirm by hand that a test kills it.

Usage (from the repository root, after a `make mutation` run has made ``mutants/``):

    python tools/apply_mutant.py 'pqnet.quantize.qnet.xǁQuantizedLayerǁencode__mutmut_25'
    pytest -x -q tests/test_core_mutations.py    # should fail
    git checkout -- pqnet                          # undo

``mutmut show`` prints the mutant as a diff of the function, dedented (but not its
docstrings) and with the hunk's own line numbers, so it cannot be fed to ``patch``; this
finds the hunk's lines in the source by their stripped text after the function's ``def``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def mutant_diff(name: str) -> list[str]:
    mutmut = Path(sys.executable).with_name("mutmut")
    shown = subprocess.run([str(mutmut), "show", name], capture_output=True, text=True,
                           check=True).stdout
    return shown[shown.index("--- "):].splitlines()


def apply(name: str) -> Path:
    lines = mutant_diff(name)
    path = Path(lines[0][4:].strip())
    body = [line for line in lines[3:] if not line.startswith("@@")]
    old = [line[1:].strip() for line in body if line.startswith((" ", "-"))]
    function = re.sub(r"__mutmut_\d+$", "", name.split(".")[-1])
    function = function.split("ǁ")[-1] if "ǁ" in function else function.removeprefix("x_")
    src = path.read_text().split("\n")
    for d in (i for i, line in enumerate(src) if re.match(rf"\s*def {function}\(", line)):
        indent = re.match(r"\s*", src[d]).group(0)
        for i in range(d, len(src) - len(old) + 1):
            if [line.strip() for line in src[i:i + len(old)]] != old:
                continue
            out, k = [], i
            for line in body:
                if line.startswith(" "):
                    out.append(src[k])
                if line.startswith((" ", "-")):
                    k += 1
                elif line[1:]:
                    out.append(indent + line[1:])
                else:
                    out.append("")
            src[i:k] = out
            path.write_text("\n".join(src))
            return path
    raise SystemExit(f"{name}: its lines are not in {path} (is the source newer than mutants/?)")


if __name__ == "__main__":
    print(apply(sys.argv[1]))
