"""The backbone table: every class of diffusers' image and video transformer family (``tests/family``), wrapped
with the one-line ``wrap`` and checked as the family test checks it (eval output bitwise, non-image tokens never
routed, FLOPs fall, same gradients), on the CPU.

    python benchmarks/backbones.py            # writes benchmarks/results/backbones.json and the README's table

Each class is built from the tiny configuration of its own diffusers test; the status says whether the one-line
wrap routes it correctly, needs ``blocks=``, is refused with a RouteError that says why, or fails.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

import diffusers  # noqa: E402

import test_family  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "backbones.json"
START, END = "<!-- backbones:start -->", "<!-- backbones:end -->"


def run() -> dict:
    torch.set_num_threads(1)
    rows = {}
    for name, case in sorted(test_family.CASES.items()):
        try:
            found = test_family.check(case)
            declared = [f"{k}={v!r}" for k, v in (("blocks", case.blocks), ("prefix_tokens", case.prefix_tokens))
                        if v is not None]
            if found["status"] == "routes" and declared:
                found["status"] = f"routes with {', '.join(declared)}"
        except Exception as err:  # a failing class is a row of the table, with its error
            found = {"status": "known failure" if case.known_failure else "fails", "why": case.known_failure,
                     "error": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                     "where": traceback.format_exc().splitlines()[-3].strip()[:200]}
        found["note"] = case.note
        rows[name] = found
        print(f"{name:<45} {found['status']}", flush=True)
    routed = sum(r["status"].startswith("routes") for r in rows.values())
    return {"device": "cpu", "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                          "python": platform.python_version()},
            "config": {"ratio": test_family.RATIO, "routes": "one per block container, in its middle"},
            "routed": routed, "classes": len(rows), "share": round(routed / len(rows), 3), "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['routed']} of {result['classes']} classes ({result['share']:.0%}) route correctly "
             f"(diffusers {result['versions']['diffusers']}; `python benchmarks/backbones.py` regenerates this "
             "table from `benchmarks/results/backbones.json`).", "",
             "| class | status | stack (block containers) | layout of the first route's stream | note |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in result["rows"].items():
        stack = ", ".join(f"`{c}`" for c in row.get("stack", []))
        layout = (row.get("layouts") or [""])[0]
        layout = re.sub(r" \(.*", "", layout)
        why = row.get("why") or row.get("error") or ""
        note = "; ".join(x for x in (row.get("note", ""), why) if x).replace("|", "\\|")
        lines.append(f"| `{name}` | {row['status']} | {stack} | {layout} | {note} |")
    return "\n".join(lines)


def main() -> None:
    result = json.loads(RESULTS.read_text()) if "--table-only" in sys.argv else run()
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START in text:
        head, rest = text.split(START, 1)
        text = head + START + "\n" + table(result) + "\n" + END + rest.split(END, 1)[1]
        readme.write_text(text)
    print(f"{result['routed']} of {result['classes']} route correctly")


if __name__ == "__main__":
    main()
