"""The Python API surface of one TensorRT version, read from NVIDIA/TensorRT's binding sources.

Writes ``tests/engine/fake_trt/surfaces/<version>.json``: every class the ``tensorrt`` module binds
with its members (methods, properties, nested enums), every enum with its values, and the module's
own functions and attributes. The fake ``tensorrt`` the tests build from it rejects whatever a
version does not have, as the real bindings would (AttributeError).

Source: a checkout of https://github.com/NVIDIA/TensorRT at a release branch (``release/8.5``,
``release/10.13``, ``release/11.1``): ``python/src/**/*.cpp`` (pybind11 ``py::class_``/``py::enum_``
with their ``.def*``/``.value`` chains, ``m.def``) and the package's ``__init__.py`` (``nptype``,
``volume``...). Preprocessor conditions are ignored (everything bound under any ``#if`` counts: the
RTX-only and safety-only parts are a handful of names the tool never touches).

``--check-stubs DIR``: compare with the ``tensorrt-stubs`` wheel's ``tensorrt_bindings/tensorrt.pyi``
(unpacked in DIR) and print the names one side has and the other lacks (10.13 agrees on every class
and every enum value).

    python scripts/trt_api_surface.py /path/to/TensorRT release/10.13 10.13.0 --check-stubs /tmp/stubs
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "engine" / "fake_trt" / "surfaces"
BINDER = re.compile(r"py::(class_|enum_)\s*<")
MEMBER = re.compile(r"\.\s*(def|def_property|def_property_readonly|def_readwrite|def_readonly|def_static|"
                    r"def_property_static|def_property_readonly_static|value)\s*\(\s*\"(\w+)\"")
MODULE_DEF = re.compile(r"\bm\s*\.\s*(def|attr)\s*\(\s*\"(\w+)\"")
KIND = {"def": "method", "def_static": "method", "value": "value"}


def git_files(repo: Path, ref: str, pattern: str) -> List[Tuple[str, str]]:
    names = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", ref, "--", "python"],
                           capture_output=True, text=True, check=True).stdout.split()
    return [(n, subprocess.run(["git", "-C", str(repo), "show", f"{ref}:{n}"], capture_output=True, text=True,
                               check=True).stdout) for n in names if re.search(pattern, n)]


def strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def _code_chars(text: str, start: int) -> Iterator[Tuple[int, str]]:
    """(index, char) of ``text`` from ``start``, skipping what is inside string literals."""
    i, in_str = start, False
    while i < len(text):
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        else:
            yield i, c
        i += 1


def _balanced(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at ``start``."""
    depth = 0
    for i, c in _code_chars(text, start):
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _statement_end(text: str, start: int) -> int:
    """Index of the ``;`` ending the statement that starts at ``start`` (outside brackets and strings)."""
    depth = 0
    for i, c in _code_chars(text, start):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == ";" and depth <= 0:
            return i
    return len(text)


def parse_bindings(text: str) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """({python name: {"kind": class|enum, "members": {name: kind}, "bases": [c++ types]}}, {c++ type: name})."""
    text = strip_comments(text)
    classes: Dict[str, dict] = {}
    cpp_names: Dict[str, str] = {}
    variables: Dict[str, str] = {}
    for match in BINDER.finditer(text):
        kind = "class" if match.group(1) == "class_" else "enum"
        args_end = _balanced(text, match.end() - 1, "<", ">")
        template = [a.strip() for a in _split_top(text[match.end():args_end - 1])]
        rest = re.match(r"\s*(\w+)?\s*[({]\s*(\w+)\s*,\s*\"(\w+)\"", text[args_end:])
        if rest is None:
            continue
        variable, parent, name = rest.groups()
        end = _statement_end(text, match.start())
        members = {m.group(2): KIND.get(m.group(1), "property") for m in MEMBER.finditer(text, args_end, end)}
        entry = {"kind": kind, "members": members, "bases": template[1:] if kind == "class" else []}
        if parent != "m":  # a nested enum or class: a member of its parent binding
            owner = variables.get(parent)
            if owner is not None:
                classes[owner]["members"][name] = kind
                if "export_values" in text[args_end:end]:  # ILogger.WARNING as well as ILogger.Severity.WARNING
                    classes[owner]["members"].update({m: "value" for m in members})
            name = f"{owner}.{name}" if owner else name
        classes.setdefault(name, entry)
        if classes[name] is not entry:
            classes[name]["members"].update(members)
        cpp_names[template[0]] = name
        if variable:
            variables[variable] = name
    for variable, owner in variables.items():  # later `var.def(...)` statements
        for match in re.finditer(rf"\b{variable}\s*\.\s*(def|value)", text):
            end = _statement_end(text, match.start())
            chain = "." + text[match.end() - len(match.group(1)):end]
            classes[owner]["members"].update(
                {m.group(2): KIND.get(m.group(1), "property") for m in MEMBER.finditer(chain)})
    return classes, cpp_names


def _split_top(text: str) -> List[str]:
    parts, depth, current = [], 0, ""
    for c in text:
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    return parts + [current]


def package_names(source: str) -> Tuple[List[str], Dict[str, List[str]]]:
    """Top-level functions, classes and assignments of the ``tensorrt`` package's ``__init__.py``, and
    the members it adds to bound classes (``DataType.itemsize = property(...)``)."""
    names, added = [], {}
    for node in ast.parse(re.sub(r"##\w+##", "tensorrt", source)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
            for t in node.targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                    added.setdefault(t.value.id, []).append(t.attr)
    return [n for n in names if not n.startswith("_") or n == "__version__"], added


def surface(repo: Path, ref: str, version: str) -> dict:
    classes: Dict[str, dict] = {}
    cpp_names: Dict[str, str] = {}
    module: Dict[str, str] = {}
    for _, text in git_files(repo, ref, r"^python/src/.*\.cpp$"):
        found, names = parse_bindings(text)
        for name, entry in found.items():
            if name in classes:
                classes[name]["members"].update(entry["members"])
            else:
                classes[name] = entry
        cpp_names.update(names)
        module.update({m.group(2): "function" if m.group(1) == "def" else "attribute"
                       for m in MODULE_DEF.finditer(strip_comments(text))})
    for _, text in git_files(repo, ref, r"^python/packaging/(bindings_wheel/)?tensorrt/__init__\.py$"):
        names, added = package_names(text)
        module.update({n: "package" for n in names})
        for owner, members in added.items():
            if owner in classes:
                classes[owner]["members"].update({m: "property" for m in members})
    for entry in classes.values():  # C++ base types -> Python names (Logger inherits ILogger's members)
        entry["bases"] = [cpp_names[b] for b in entry["bases"] if b in cpp_names]
    return {"version": version, "source": f"NVIDIA/TensorRT {ref}: python/src, python/packaging",
            "module": dict(sorted(module.items())),
            "classes": {n: {"kind": e["kind"], "bases": e["bases"], "members": dict(sorted(e["members"].items()))}
                        for n, e in sorted(classes.items())}}


def check_stubs(found: dict, stub_dir: Path) -> None:
    # pybind11-stubgen's output is not always valid Python (defaults before non-defaults): read it by lines
    stub: Dict[str, set] = {}
    current = None
    for line in (stub_dir / "tensorrt_bindings" / "tensorrt.pyi").read_text().splitlines():
        top = re.match(r"class (\w+)", line)
        if top:
            current = stub.setdefault(top.group(1), set())
            continue
        member = re.match(r"    (?:def (\w+)|(\w+)\s*:)", line)
        if member and current is not None:
            current.add(member.group(1) or member.group(2))
    ours = {n.split(".")[-1] for n in found["classes"]}
    print(f"classes in the stubs, not found here: {sorted(set(stub) - ours)}")
    print(f"classes found here, not in the stubs: {sorted(ours - set(stub))}")
    missing = []
    for name, entry in found["classes"].items():
        short = name.split(".")[-1]
        if short in stub:
            missing += [f"{name}.{m}" for m in entry["members"] if m not in stub[short] and not m.startswith("__")]
    print(f"members found here, not in the stubs ({len(missing)}): {missing[:40]}")
    members = {n.split(".")[-1]: set(e["members"]) for n, e in found["classes"].items()}
    for name, entry in found["classes"].items():  # inherited members count (Logger has ILogger's)
        for base in entry["bases"]:
            members[name.split(".")[-1]] |= members.get(base.split(".")[-1], set())
    absent = [f"{c}.{m}" for c, names in stub.items() if c in members
              for m in names if m and not m.startswith("_") and m not in members[c]
              and m not in ("name", "value", "Members")]  # every pybind11 enum has these
    print(f"members in the stubs, not found here ({len(absent)}): {absent[:40]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="a clone of NVIDIA/TensorRT")
    parser.add_argument("ref", help="e.g. release/10.13")
    parser.add_argument("version", help="the version the surface is named after, e.g. 10.13.0")
    parser.add_argument("--check-stubs", type=Path, help="an unpacked tensorrt-stubs wheel to compare with")
    args = parser.parse_args()
    found = surface(args.repo, args.ref, args.version)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"{args.version}.json"
    out.write_text(json.dumps(found, indent=1, sort_keys=False) + "\n")
    print(f"{out}: {len(found['classes'])} classes/enums, {len(found['module'])} module names")
    if args.check_stubs:
        check_stubs(found, args.check_stubs)


if __name__ == "__main__":
    main()
