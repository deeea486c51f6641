"""Put the benchmark results into the README: every block

    <!-- bench:SCRIPT:SECTION -->
    ...
    <!-- /bench -->

in README.md is replaced by a caption (machine, date, command) and the Markdown table that
``benchmarks/SCRIPT.py`` makes of ``benchmarks/results/SCRIPT.json`` (its ``sections(result)[SECTION]``,
the same text the script prints), and the size-against-KLD plot is redrawn from the Gemma recipes.

    python benchmarks/readme.py [--check] [--results DIR]

--check changes nothing and exits 1 if the README or the plot differ from what the results give.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

BLOCK = re.compile(r"(<!-- bench:(\w+):(\w+) -->\n)(.*?)(<!-- /bench -->)", re.S)


def render_readme(readme: str, results: Path) -> str:
    def block(m: re.Match) -> str:
        script, section = m.group(2), m.group(3)
        path = results / f"{script}.json"
        if not path.is_file():
            raise SystemExit(f"README asks for {script}:{section} but {path} does not exist: run benchmarks/{script}.py")
        result = json.loads(path.read_text())
        sections = importlib.import_module(script).sections(result)
        if section not in sections:
            raise SystemExit(f"README asks for {script}:{section}; benchmarks/{script}.py has {sorted(sections)}")
        caption = f"_{result['machine']}, {result['date']}: `python benchmarks/{script}.py`_\n\n"
        return m.group(1) + caption + sections[section] + m.group(5)

    return BLOCK.sub(block, readme)


def render_plot(results: Path) -> tuple[Path, str] | None:
    import gemma_recipes

    path = results / f"{gemma_recipes.NAME}.json"
    if not path.is_file():
        return None
    return results / gemma_recipes.PLOT, gemma_recipes.plot(json.loads(path.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md or the plot are stale")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = ap.parse_args()
    outputs = [(args.readme, render_readme(args.readme.read_text(encoding="utf-8"), args.results))]
    if (plot := render_plot(args.results)) is not None:
        outputs.append(plot)
    stale = [path for path, text in outputs if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.check:
        if stale:
            raise SystemExit(f"stale: {', '.join(map(str, stale))}; run python benchmarks/readme.py")
        print("README benchmark tables and plot match benchmarks/results")
        return
    for path, text in outputs:
        if path in stale:
            path.write_text(text, encoding="utf-8")
            print(f"updated {path}")


if __name__ == "__main__":
    main()
