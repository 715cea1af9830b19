"""Reading what the GPU check's steps left (JUnit files, pytest logs, step logs) and the short table
printed last. Standard library only: the check runs before the project is installed."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def junit_summary(path: Path) -> dict[str, object]:
    """Counts and failed test ids from a JUnit XML file, and a one-line note."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{c.get('classname', '').rsplit('.', 1)[-1]}::{c.get('name')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    return _summary(passed, count["failures"], count["errors"], count["skipped"], failed, None)


def log_summary(text: str) -> dict[str, object]:
    """The same from a ``pytest -v`` log cut short: the outcomes so far, and the test left running."""
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}
    failed: list[str] = []
    running = None
    for line in text.splitlines():
        found = OUTCOME.match(line)
        if found:
            outcome = found[2] if found[2] in counts else "PASSED"
            counts[outcome] += 1
            if outcome in ("FAILED", "ERROR"):
                failed.append(found[1].rsplit("/", 1)[-1])
            running = None
        elif re.match(r"^tests/\S+::\S+", line):
            running = line.split()[0].rsplit("/", 1)[-1]
    return _summary(counts["PASSED"], counts["FAILED"], counts["ERROR"], counts["SKIPPED"], failed, running)


def _summary(
    passed: int, failed: int, errors: int, skipped: int, names: list[str], running: str | None
) -> dict[str, object]:
    note = f"{passed} passed, {failed} failed, {errors} errors, {skipped} skipped"
    if names:
        note += ": " + ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
    if running:
        note += f"; was running {running}"
    return {"passed": passed, "failed": failed, "errors": errors, "skipped": skipped, "failed_tests": names,
            "running": running, "note": note}  # fmt: skip


def last_error(text: str) -> str:
    """The last line of a log that names an error, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error:|Killed)", line):
            return line[:200]
    return lines[-1][:200] if lines else "no output"


# -- the table --------------------------------------------------------------------------------------


def _get(data: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _fmt(value: object, scale: float = 1.0, digits: int = 1) -> str:
    return f"{value * scale:.{digits}f}" if isinstance(value, int | float) else "-"


def _ratio(a: object, b: object) -> str:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return f"{a / b:.2f}x"
    return "-"


def table(data: dict) -> str:
    """The short report of a check's ``results.json``: the steps, the engine bench per quantization,
    the LoRA op alone. It says so when the run was not on CUDA."""
    probe = data.get("probe") or {}
    versions = probe.get("versions") or {}
    device = _get(probe, "gpu", "name") or data.get("device", "?")
    lines = [
        f"loraswap GPU check: {device}, torch {versions.get('torch', '?')} (CUDA {probe.get('torch_cuda')}), "
        f"bitsandbytes {versions.get('bitsandbytes')}, python {probe.get('python', '?')}"
    ]
    if not str(data.get("device", "")).startswith("cuda") or not probe.get("cuda_available"):
        lines.append("NOT A GPU RESULT: this run did not execute on CUDA (it only shows that the code runs)")
    steps = data.get("steps", [])
    total = sum(r["seconds"] for r in steps if r["name"] != "model")
    lines.append(
        f"steps ({total:.0f} s in sequence, the model built beside; deadline {data.get('deadline_s')} s):"
    )
    for r in steps:
        spent = f"{r['seconds']:.0f}/{r['budget_s']:.0f}s"
        lines.append(f"  {r['name']:<13}{r['status']:<9}{spent:<9} {r['note'][:95]}")
    if "nf4_linear" in probe:
        lines.append(
            f"  probe: NF4 linear finite {_get(probe, 'nf4_linear', 'finite')}, staged slot fill exact "
            f"{_get(probe, 'staged_fill', 'exact')}, NVML metric {_get(probe, 'nvml_metrics', 'utilization')}"
        )
    bench = {
        k.removeprefix("bench-"): v for k, v in data.items() if k.startswith("bench-") and isinstance(v, dict)
    }
    if bench:
        lines += _bench_rows(bench, data)
    if _get(data, "ops", "ops", "us"):
        lines += _ops_rows(data["ops"])
    return "\n".join(lines)


def bench_column(b: dict) -> dict[str, str]:
    """One quantization's column of the engine bench table, label → cell (``-`` where not measured)."""
    tok, step, act, fill, mem = (
        b.get(k) or {} for k in ("tok_s", "decode_step", "activation", "slot_fill", "memory")
    )
    three = ("mixed", "one", "base")
    mib = 2.0**-20
    return {
        "tok/s mixed / one adapter / base": "/".join(_fmt(tok.get(k), 1, 0) for k in three),
        "mixed vs one, mixed vs base": f"{_ratio(tok.get('mixed'), tok.get('one'))}, "
        f"{_ratio(tok.get('mixed'), tok.get('base'))}",
        "decode step ms mixed / one / base": "/".join(_fmt(step.get(f"{k}_wall_s"), 1e3) for k in three),
        "LoRA share of the mixed step %": _fmt(step.get("lora_share"), 100, 0),
        "cold activation / bare read ms": f"{_fmt(act.get('cold_s'), 1e3)} / "
        f"{_fmt(act.get('bare_read_s'), 1e3)}",
        "warm activation (host -> slot) ms": _fmt(act.get("warm_s"), 1e3, 2),
        "slot fill staged / per-matrix ms": f"{_fmt(fill.get('staged_s'), 1e3, 2)} / "
        f"{_fmt(fill.get('per_matrix_s'), 1e3, 2)}",
        "device MiB weights / KV / slots": "/".join(
            _fmt(mem.get(k), mib, 0) for k in ("weights_bytes", "kv_cache_bytes", "slot_buffers_bytes")
        ),
        "device MiB per slot; allocated": f"{_fmt(mem.get('per_slot_bytes'), mib)}; "
        f"{_fmt(mem.get('allocated_bytes'), mib, 0)}",
        "base load s": _fmt(b.get("load_s")),
    }  # fmt: skip


def _bench_rows(bench: dict[str, dict], data: dict) -> list[str]:
    model = _get(data, "model", "model") or {}
    adapters = _get(data, "model", "adapters") or {}
    lines = [
        f"engine bench: random {model.get('name')} ({_fmt(model.get('params'), 1e-9, 2)} B params, vocab "
        f"{model.get('vocab_size')}), {adapters.get('mixed', '?')} adapters {adapters.get('profile', '?')}, "
        f"best of {data.get('rounds', '?')} rounds",
        f"  {'':<36}" + "".join(f"{k:<22}" for k in bench),
    ]
    columns = [bench_column(b) for b in bench.values()]
    for label in columns[0]:
        lines.append(f"  {label:<36}" + "".join(f"{c[label]:<22}" for c in columns))
    per_step = lora_ops_per_step(data.get("ops") or {}, adapters)
    lines.append(f"  {'LoRA ops alone per step (op bench)':<36}{per_step}")
    return lines


def lora_ops_per_step(ops: dict, adapters: dict) -> str:
    """The op-alone times (``auto``, at the bench's batch) summed over every targeted projection of every
    layer: the LoRA work of one mixed decode step as the op bench sees it."""
    times = _get(ops, "ops", "us")
    batch = str(adapters.get("mixed"))
    if not isinstance(times, dict) or not adapters.get("targets"):
        return "-"
    total = 0.0
    for proj in adapters["targets"]:
        label = next((k for k in times if proj in k.split("/")), None)
        value = _get(times, label, "auto", batch) if label else None
        if not isinstance(value, int | float):
            return "-"
        total += value
    return f"{total * ops.get('layers', 0) / 1e3:.2f} ms ({ops.get('layers')} layers, batch {batch})"


def _ops_rows(ops: dict) -> list[str]:
    us = ops["ops"]["us"]
    labels = list(us)
    batches = list(next(iter(us[labels[0]].values())))
    lines = [
        f"LoRA op alone: r{ops['ops'].get('rank')}, token t on slot t, us per call "
        "(anchor: Punica SGMV about 45 us, flat to batch 64)",
        f"  {'shape':<20}{'op':<9}" + "".join(f"{b:>7}" for b in batches),
    ]
    for label in dict.fromkeys([labels[0], labels[-1]]):
        for mode, row in us[label].items():
            lines.append(f"  {label:<20}{mode:<9}" + "".join(f"{_fmt(row.get(b), 1, 0):>7}" for b in batches))
    set_batch = ops["ops"].get("set_batch_us", {})
    if set_batch:
        cells = "".join(f"{_fmt(set_batch.get(b), 1, 0):>7}" for b in batches)
        lines.append(f"  {'set_batch (host)':<20}{'auto':<9}{cells}")
    return lines
