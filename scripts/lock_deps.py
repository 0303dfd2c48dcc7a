"""Write constraints.txt: the installed version of every package `pip install -e '.[dev,server,train]'` pulls in.

`make setup` / `make test` install within this file, so the suite runs on versions it is known to pass with and a
new release of a dependency cannot break it. To move to newer versions (`make lock` runs the last step):

    python3 -m pip install -U -e '.[dev,server,train]'      # newest releases the ranges in pyproject.toml allow
    python3 -m pytest -q -m "not gpu"                         # green?
    python3 scripts/lock_deps.py                              # then commit constraints.txt

It reads pyproject.toml and installed package metadata (importlib.metadata): the closure of unigemma's
requirements with the given extras, markers evaluated for this interpreter. torch is written without its local label (+cpu), which no
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


def project_requirements(extras: set[str]) -> list[str]:
    """unigemma's own requirements with `extras`, from pyproject.toml (not from the installed metadata, which may
    be an older checkout's)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in sorted(extras):
        reqs += project["optional-dependencies"][extra]
    return reqs


def closure(requirements: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of every distribution `requirements` need, transitively."""
    seen: dict[str, str] = {}
    todo: list[tuple[str, frozenset]] = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            todo.append((req.name, frozenset(req.extras)))
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
    pins = closure(project_requirements(set(a.extras.split(","))))
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
