"""Rich tables people read: stage outcomes, validation errors, the dry-run plan, a workdir's contents."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from rich.table import Table

from autoglm_build.console import human_bytes, human_count, stdout
from autoglm_build.pipeline import Outcome


def _ok(passed: bool) -> str:
    return "[green]pass[/green]" if passed else "[red]FAIL[/red]"


def render_outcomes(outcomes: Sequence[Outcome], workdir: Path) -> None:
    """The summary of a build, then the validation rows of each module that ran."""
    table = Table(title=f"autoglm-build: {workdir}", title_justify="left")
    for col in ("stage", "module", "status", "time", "params", "size", "max abs", "max rel", "valid"):
        table.add_column(col, justify="right" if col in ("time", "params", "size", "max abs", "max rel") else "left")
    for o in outcomes:
        rec = o.record
        metrics = rec.metrics if rec else {}
        if "accuracy" in metrics:  # calibrate: errors vs FP32 (None: not measured); details in the precision table
            metrics = metrics["accuracy"] or {}
        size = sum(_artifact_bytes(workdir, p) for p in rec.artifacts) if rec else 0
        table.add_row(
            o.stage, o.module, o.status, f"{rec.duration_s:.1f}s" if rec else "-",
            human_count(rec.params["parameters"]) if rec and "parameters" in rec.params else "-", human_bytes(size),
            f"{metrics['max_abs']:.2e}" if "max_abs" in metrics else "-",
            f"{metrics['max_rel']:.2e}" if "max_rel" in metrics else "-",
            _ok(metrics["passed"]) if "passed" in metrics else "-",
        )
    stdout.print(table)
    ran = [o for o in outcomes if o.status == "ran" and o.stage == "export" and o.record.metrics.get("rows")]
    if ran:
        render_validation([row for o in ran for row in o.record.metrics["rows"]])
    optimized = [o for o in outcomes if o.stage == "optimize" and o.record and o.record.metrics]
    if optimized:
        render_optimize(optimized)
    precision = [o for o in outcomes if o.stage.startswith("calibrate") and o.record and o.record.metrics]
    if precision:
        render_precision(precision)


def render_validation(rows: List[Dict[str, Any]]) -> None:
    """module | case | batch | output | shape | max abs | max rel | tol | pass."""
    table = Table(title="ONNX Runtime vs PyTorch", title_justify="left")
    columns = ("module", "case", "batch", "output", "shape", "max abs", "max rel", "tol: atol + rtol*max|ref|", "pass")
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["module"], r["case"], str(r["batch"]), r["output"], "x".join(map(str, r["shape"])),
            f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}", f"{r['atol']:.0e} + {r['rtol']:.0e}", _ok(r["passed"]),
        )
    stdout.print(table)


def render_optimize(outcomes: Sequence[Outcome]) -> None:
    """Per module: nodes before/after, what each rewrite did, op counts that changed, and the check."""
    table = Table(title="optimize: op counts and ONNX Runtime check against the exported graph", title_justify="left")
    for col in ("module", "nodes", "removed", "rewrites", "ops changed (before -> after)", "max abs", "check"):
        table.add_column(col)
    for o in outcomes:
        m = o.record.metrics
        before, after = m["ops_before"], m["ops_after"]
        changed = sorted(set(before) | set(after), key=lambda op: -abs(before.get(op, 0) - after.get(op, 0)))
        ops = ", ".join(f"{op} {before.get(op, 0)}->{after.get(op, 0)}" for op in changed
                        if before.get(op, 0) != after.get(op, 0))
        rewrites = ", ".join(f"{k}: {v}" for k, v in m["rewrites"].items())  # a count, or "skipped: <why>"
        table.add_row(o.module, f"{m['nodes_before']} -> {m['nodes_after']}", str(m["nodes_removed"]), rewrites,
                      ops, f"{m['max_abs']:.2e}", _ok(m["passed"]))
    stdout.print(table)


def render_precision(outcomes: Sequence[Outcome]) -> None:
    """What each precision graph holds (read from the graph) and what it costs vs FP32 (held-out data)."""
    table = Table(title="precision vs FP32 on held-out calibration data", title_justify="left")
    for col in ("module", "graph", "Q/DQ", "INT8 ops", "FP16 kept (graph)", "cosine min", "max abs", "max rel",
                "greedy agree", "moved to FP16"):
        table.add_column(col)
    for o in outcomes:
        m = o.record.metrics
        acc, cen = m["accuracy"], m.get("precision_census", {})
        if acc is None:  # calibrate.measure_fp16: false (verify measures it)
            acc = {"cosine_min": float("nan"), "max_abs": float("nan"), "max_rel": float("nan")}
        kept = ", ".join(f"{cat} {c.get('fp16', 0)}/{sum(c.values())}" for cat, c in cen.items()
                         if cat != "matmul/conv (other)" and c)
        moved = m.get("fallback", {}).get("moved_to_fp16")
        agree = acc.get("greedy_agreement")
        table.add_row(
            o.module, o.stage.split("-")[1], f"{m['qdq']['QuantizeLinear']}/{m['qdq']['DequantizeLinear']}",
            str(cen.get("matmul/conv (other)", {}).get("int8", 0)), kept or "-", f"{acc['cosine_min']:.5f}",
            f"{acc['max_abs']:.2e}", f"{acc['max_rel']:.2e}", "-" if agree is None else f"{agree:.1%}",
            "-" if moved is None else (", ".join(moved) or "none needed"),
        )
    stdout.print(table)


def render_verify(report: Dict[str, Any]) -> None:
    """module | backend | precision | vs | output | batch | max abs | max rel | check | pass: precision
    graphs against FP32 under the accuracy gate, engines against their own graph at a tolerance."""
    table = Table(title="verify: precision graphs vs FP32 (gate), engines vs their own graph (tolerance)",
                  title_justify="left")
    for col in ("module", "backend", "precision", "vs", "output", "batch", "steps", "max abs", "max rel", "check",
                "pass"):
        table.add_column(col)
    for r in report["rows"]:
        table.add_row(r["module"], r["backend"], r["precision"], r.get("reference", "fp32 graph"), r["output"],
                      str(r["batch"]), str(r["steps"]), f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}", _check(r),
                      _ok(r["passed"]))
    stdout.print(table)


def _check(row: Dict[str, Any]) -> str:
    if "atol" in row:
        return f"tol {row['atol']:.0e} + {row['rtol']:.0e}*max|ref|"
    text = f"cosine {row['cosine_min']:.5f} >= {row['gate_cosine']}"
    if row.get("gate_greedy") is not None:
        text += f", greedy {row['greedy_agreement']:.1%} >= {row['gate_greedy']:.0%}"
    return text


def render_plan(plan: Dict[str, Any]) -> None:
    table = Table(title=f"plan for {plan['config']} (dry run: nothing allocated or written)", title_justify="left")
    for col in ("module", "parameters", "ONNX (fp32, est.)", "external data", "inputs", "outputs"):
        table.add_column(col)
    for m in plan["modules"]:
        table.add_row(
            m["module"], human_count(m["parameters"]), human_bytes(m["onnx_bytes_estimate"]),
            "yes" if m["external_data"] else "no", _io(m["inputs"]), _io(m["outputs"]),
        )
    stdout.print(table)
    stages = Table(title="stages", title_justify="left")
    for col in ("stage", "module", "fingerprint", "would", "why"):
        stages.add_column(col)
    for s in plan["stages"]:
        stages.add_row(s["stage"], s["module"], s["fingerprint"][:12], "skip (cached)" if s["cached"] else "run",
                       s.get("reason", ""))
    stdout.print(stages)


def render_inspect(report: Dict[str, Any]) -> None:
    title = f"{report['workdir']}: config {report['config_name']} ({report['config_path']})"
    arts = Table(title=title, title_justify="left")
    for col in ("artifact", "kind", "module", "stage", "size", "sha256", "state"):
        arts.add_column(col)
    for path, a in sorted(report["artifacts"].items()):
        state = a["state"] if a["state"] == "ok" else f"[red]{a['state']}[/red]"
        arts.add_row(path, a["kind"], a["module"], a["stage"], human_bytes(a["bytes"]), a["sha256"][:12], state)
    stdout.print(arts)
    recs = Table(title="stage records", title_justify="left")
    for col in ("stage", "module", "status", "time", "fingerprint", "max abs", "batches", "warnings"):
        recs.add_column(col)
    for r in report["records"].values():
        m = r["metrics"]
        recs.add_row(
            r["stage"], r["module"], r["status"], f"{r['duration_s']:.1f}s", r["fingerprint"][:12],
            f"{m['max_abs']:.2e}" if "max_abs" in m else "-", ",".join(map(str, m.get("batches", []))),
            str(len(r["warnings"])),
        )
    stdout.print(recs)


def _io(io: Dict[str, Dict[str, str]]) -> str:
    parts = []
    for name, axes in io.items():
        dyn = ",".join(axes.values())
        parts.append(f"{name}[{dyn}]" if dyn else name)
    if len(parts) > 4:
        parts = parts[:3] + [f"... (+{len(parts) - 3})"]
    return " ".join(parts)


def _artifact_bytes(workdir: Path, rel: str) -> int:
    path = Path(workdir) / rel
    return path.stat().st_size if path.exists() else 0


def render_bench(report: Dict[str, Any]) -> None:
    """trtexec-style performance summary: one row per module/case/batch/backend, floors where measured."""
    peaks = report.get("peaks")
    title = f"bench {report['config']}"
    if peaks:
        title += (f" on {peaks['gpu']}: copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
                  f"fp16 matmul {peaks['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    table = Table(title=title, title_justify="left")
    full = report.get("full_config")
    columns = ["module", "case", "batch", "backend", "p50 ms", "p90 ms", "p99 ms", "items/s", "floor ms", "x floor"]
    columns += [f"{full} ms (extrapolated)", f"{full} floor ms"] if full else []
    for col in columns:
        table.add_column(col, justify="right" if col not in ("module", "case", "backend") else "left")
    stored = report.get("stored_rows", [])
    rows = sorted(report["rows"] + stored, key=lambda r: (r["module"], r["case"], r["batch"], r["backend"]))
    stored_ids = {id(r) for r in stored}
    for r in rows:
        backend = r["backend"] + (f" ({r['calls']} calls)" if r.get("calls") else "") \
            + (" (stored)" if id(r) in stored_ids else "")
        cells = [r["module"], r["case"], str(r["batch"]), backend, f"{r['p50_ms']:.3f}",
                 f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['items_per_s']:.1f}",
                 "" if r["floor_ms"] is None else f"{r['floor_ms']:.3f}",
                 "" if r["ratio"] is None else f"{r['ratio']:.1f}"]
        if full:
            cells += [f"{r['full_ms']:.2f}" if r.get("full_ms") else "",
                      f"{r['full_floor_ms']:.2f}" if r.get("full_floor_ms") else ""]
        table.add_row(*cells)
    stdout.print(table)
