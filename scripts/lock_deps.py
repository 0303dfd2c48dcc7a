"""Write constraints.txt: the installed version of every package `pip install -e '.[dev,server,train]'` pulls in.

`make setup` / `make test` install within this file, so the suite runs on versions it is known to pass with and a
new release of a dependency cannot break it. To move to newer versions (`make lock` runs the last step):

    python3 -m pip install -U -e '.[dev,server,train]'      # newest releases the ranges in pyproject.toml allow
    python3 -m pytest -q -m "not gpu"                         # green?
    python3 scripts/lock_deps.py                              # then commit constraints.txt

It reads only installed package metadata (importlib.metadata): the closure of unigemma's requirements with the
given extras, markers evaluated for this interpreter. torch is written without its local label (+cpu), which no
index outside PyTorch's own serves.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """{canonical name: installed version} of every distribution `root[extras]` needs, `root` excluded."""
    seen: dict[str, str] = {}
    todo = [(root, frozenset(extras))]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        name, ex = todo.pop()
        if (name, ex) in done:
            continue
        done.add((name, ex))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"lock_deps: {name} is required but not installed; run `make setup` first") from None
        if _canon(name) != _canon(root):
            seen[_canon(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--extras", default="dev,server,train")
    p.add_argument("--out", default=str(ROOT / "constraints.txt"))
    a = p.parse_args(argv)
    pins = closure("unigemma", set(a.extras.split(",")))
    lines = [f"# Versions `make setup` / `make test` install (pip -c): the suite passed with these on Python "
             f"{sys.version_info.major}.{sys.version_info.minor}, Linux x86_64.",
             "# Written by scripts/lock_deps.py (`make lock`); its docstring says how to move to newer versions."]
    for name in sorted(pins):
        version = pins[name].split("+")[0] if name == "torch" else pins[name]
        lines.append(f"{name}=={version}")
    Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {a.out}: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
