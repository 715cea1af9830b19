"""The GPU check as one command: install over the preinstalled CUDA stack, GPU tests, the engine test
suite on CUDA, then the CUDA engine bench; a short table printed last.

Run on the device machine from the repository root::

    python3 -m bench.gpu.check --out "$OUT"

and here first, on CPU, ``python -m bench.gpu.check --dry-run`` (checks every step's inputs, runs nothing
heavy). Every step runs as its own process with its own time budget under one overall deadline; a step
that fails or runs out of time is reported and the next one runs. Logs, JUnit files, ``results.json``
and the table go to ``--out``; the model and registry to ``--work``. This module (and ``wheels`` and
``report`` beside it) imports only the standard library at the top: it runs before the project is
installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.gpu.report import junit_summary, last_error, log_summary, table
from bench.gpu.wheels import (
    WHEEL_DIR,
    WHEELS,
    download_args,
    folder_bytes,
    normalize,
    parse_wheel_name,
    travel_problems,
    tree_bytes,
    wheel_files,
    wheel_problems,
)

ROOT = Path(__file__).resolve().parents[2]
OUT_LIMIT = 8
"""Files that come back from the device machine's output folder."""
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
"""Names that come back from it."""
ENGINE_SUITE = ("tests/server/engine", "tests/server/lora", "tests/server/adapters")
DEADLINE_S = 450
"""Default overall deadline in seconds: inside the 8 minutes the check may take, the table included."""
MIN_STEP_S = 5
"""A step is not started with less time than this left before the deadline."""
PROFILE = "all-projections r16"
"""Adapter shape of the engine bench (``bench.engine_bench.PROFILES``): every projection, the most LoRA
work per token."""


@dataclass(frozen=True)
class Preset:
    """Sizes of one check run.

    Attributes:
        model: ``cuda_bench.MODELS`` entry the bench builds.
        vocab: Embedding rows (0: the model's).
        adapters: Mixed adapters (and slots, and sequences) of the engine bench.
        activation: Adapters timed for cold activation.
        new_tokens: Tokens generated per request.
        rounds: Interleaved throughput rounds (best of).
        batches: Batch sizes of the LoRA op bench.
        op_slots: Slots of the op bench (at least the largest batch: one adapter per token).
        quantizations: Engine bench runs, one step each.
        budgets: Seconds per step.
    """

    model: str
    vocab: int
    adapters: int
    activation: int
    new_tokens: int
    rounds: int
    batches: str
    op_slots: int
    quantizations: tuple[str, ...]
    budgets: dict[str, int]


PRESETS = {
    "gpu": Preset(
        model="llama-1b", vocab=128256, adapters=32, activation=10, new_tokens=32, rounds=2,
        batches="1,2,4,8,16,32,64", op_slots=64, quantizations=("nf4", "bf16"),
        budgets={"install": 45, "probe": 30, "model": 150, "gpu-tests": 75, "engine-suite": 110, "ops": 40,
                 "bench-nf4": 80, "bench-bf16": 65},
    ),
    # the CPU smoke run: every path of the bench at toy sizes (its figures mean nothing)
    "tiny": Preset(
        model="tiny", vocab=0, adapters=4, activation=2, new_tokens=4, rounds=1, batches="1,4", op_slots=4,
        quantizations=("bf16",),
        budgets={"install": 45, "probe": 60, "model": 60, "gpu-tests": 60, "engine-suite": 120, "ops": 60,
                 "bench-bf16": 120},
    ),
}  # fmt: skip


@dataclass
class Step:
    """One process of the check.

    Attributes:
        name: Step name (``--only`` / ``--skip`` take these).
        budget_s: Its time limit.
        argv: The command (None for the in-process install).
        junit: JUnit file a pytest step writes.
        json: JSON file a bench step writes.
        background: Started early, and waited for before the first step that lists it in ``after``.
        needs: Steps whose output it reads: skipped when one of them ran in this check and failed.
        after: Background steps that must have finished first (their output, or a quiet machine).
        skips_fail: A skipped test counts as a failure (GPU tests on the GPU machine).
    """

    name: str
    budget_s: float
    argv: list[str] | None = None
    junit: Path | None = None
    json: Path | None = None
    background: bool = False
    needs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    skips_fail: bool = False


@dataclass
class StepResult:
    """How a step went.

    Attributes:
        name: The step.
        status: ``ok``, ``FAIL``, ``TIMEOUT`` (stopped at its budget), ``skipped`` (not started) or
            ``STOPPED`` (the check itself was stopped).
        seconds: Time it took.
        budget_s: Its budget.
        note: Test counts and failed tests, or the error, or why it was skipped.
        rc: Its exit status (None when it was stopped).
    """

    name: str
    status: str
    seconds: float
    budget_s: float
    note: str = ""
    rc: int | None = None


# -- the plan ---------------------------------------------------------------------------------------


def gpu_test_files(root: Path) -> list[str]:
    """Test files holding GPU-marked tests (``pytest.mark.gpu`` / ``pytestmark = pytest.mark.gpu``), so
    that ``pytest -m gpu`` does not import test modules whose packages the device machine lacks."""
    return sorted(
        str(p.relative_to(root)) for p in (root / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )


def plan(
    root: Path, out: Path, work: Path, preset: Preset, device: str, python: str = sys.executable
) -> list[Step]:
    """Every step of a check run, in order."""
    b, js = preset.budgets, work / "json"
    common = ["--work", str(work), "--device", device, "--model", preset.model, "--vocab", str(preset.vocab)]
    sizes = ["--adapters", str(preset.adapters), "--activation", str(preset.activation)]

    def bench(name: str, what: str, *extra: str, **kw) -> Step:
        argv = [python, "-m", "bench.gpu.cuda_bench", what, "--json", str(js / f"{name}.json")]
        return Step(name, b[name], [*argv, *common, *extra], json=js / f"{name}.json", **kw)

    def pytest(name: str, marks: str, junit: str, *extra: str, **kw) -> Step:
        argv = [python, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", marks]
        argv.append(f"--junitxml={out / junit}")
        return Step(name, b[name], [*argv, *extra], junit=out / junit, **kw)

    steps = [
        Step("install", b["install"]),
        bench("probe", "probe"),
        bench("model", "model", "--profile-name", PROFILE, *sizes, background=True),
        pytest("gpu-tests", "gpu", "gpu-tests.xml", "-rfEs", *gpu_test_files(root), skips_fail=True),
        pytest("engine-suite", "not gpu", "engine-tests.xml", "-rfE", "--durations=15", *ENGINE_SUITE),
        # after the model build: its timings should not share the machine with it
        bench(
            "ops", "ops", "--batches", preset.batches, "--op-slots", str(preset.op_slots), after=("model",)
        ),
    ]
    for q in preset.quantizations:
        run = ["--requests", str(preset.adapters), "--rounds", str(preset.rounds)]
        run += ["--new-tokens", str(preset.new_tokens)]
        extra = ["--quantization", q, *sizes, *run, "--profile", str(out / f"profile-{q}.txt")]
        steps.append(bench(f"bench-{q}", "engine", *extra, needs=("model",), after=("model",)))
    return steps


OUT_FILES = (
    "table.txt",
    "results.json",
    "steps.log",
    "gpu-tests.xml",
    "engine-tests.xml",
    "profile-nf4.txt",
    "profile-bf16.txt",
)
"""Everything a run writes into ``--out`` (the device machine sends back at most ``OUT_LIMIT`` files)."""


# -- the dry run ------------------------------------------------------------------------------------


Check = tuple[str, bool, str]
"""One line of the dry run: what was checked, whether it passed, the detail or the problems."""


def input_checks(root: Path, wheels: Path, preset: Preset, work: Path, device: str = "cuda") -> list[Check]:
    """The inputs of every step (standard library only): wheels, what travels, output files, test
    paths, budgets."""
    rows: list[Check] = []

    def add(name: str, problems: list[str], detail: str) -> None:
        rows.append((name, not problems, "; ".join(problems) if problems else detail))

    add(
        "wheels", wheel_problems(wheels), f"{len(WHEELS)} wheels for CPython 3.12 on x86-64 Linux in {wheels}"
    )
    line, problems = travel_problems(folder_bytes(wheels), tree_bytes(root))
    add("travel size", problems, line)
    problems = [f"{len(OUT_FILES)} output files, over {OUT_LIMIT}"] if len(OUT_FILES) > OUT_LIMIT else []
    problems += [f"output file name {n!r} does not come back" for n in OUT_FILES if not OUT_NAME.match(n)]
    add("out files", problems, f"{len(OUT_FILES)} files: {', '.join(OUT_FILES)}")
    gpu_files = gpu_test_files(root)
    problems = [f"{p}: no test files" for p in ENGINE_SUITE if not any((root / p).glob("test_*.py"))]
    problems += [] if gpu_files else ["no GPU-marked test file under tests/"]
    add(
        "test paths",
        problems,
        f"pytest -m gpu: {' '.join(gpu_files)}; engine suite: {' '.join(ENGINE_SUITE)}",
    )
    steps = plan(root, root / "OUT", work, preset, device)
    names = {s.name for s in steps}
    problems = [f"no budget for step {s}" for s in names - set(preset.budgets)]
    problems += [
        f"{s.name} waits for unknown step {n}" for s in steps for n in s.needs + s.after if n not in names
    ]
    in_sequence = sum(preset.budgets.get(s.name, 0) for s in steps if not s.background)
    add("budgets", problems, f"{in_sequence} s of step budgets in sequence, under a {DEADLINE_S} s deadline")
    return rows


def dry_run(root: Path, wheels: Path, preset: Preset, work: Path, device: str = "cuda") -> list[Check]:
    """Everything checked before GPU time is spent: :func:`input_checks`, then that the bench's entry
    points import and accept the planned arguments, and that the bench model builds on the meta device."""
    rows = input_checks(root, wheels, preset, work, device)
    problems = _entry_point_problems(plan(root, root / "OUT", work, preset, device), preset)
    rows.append(
        ("entry points", not problems, "; ".join(problems) or "bench modules import; the arguments parse")
    )
    problems, detail = _model_problems(preset)
    rows.append(("model config", not problems, "; ".join(problems) or detail))
    return rows


def _entry_point_problems(steps: list[Step], preset: Preset) -> list[str]:
    problems = []
    try:
        from bench import engine_bench
        from bench.adapters import write_adapter  # noqa: F401
        from bench.gpu import cuda_bench
        from loraswap.server.lora.context import LoraContext
        from loraswap.server.lora.ops import OPS
    except Exception as error:  # the dry run reports what does not import
        return [f"import failed: {type(error).__name__}: {error}"]
    for name in ("activation_times", "memory_per_adapter", "requests", "throughput"):
        if not callable(getattr(engine_bench, name, None)):
            problems.append(f"bench.engine_bench.{name} is missing")
    if PROFILE not in engine_bench.PROFILES:
        problems.append(f"adapter profile {PROFILE!r} is not in bench.engine_bench.PROFILES")
    problems += [f"op {n} has no apply" for n, op in OPS.items() if not callable(getattr(op, "apply", None))]
    if not callable(getattr(LoraContext, "set_batch", None)):
        problems.append("LoraContext.set_batch is missing")
    if preset.model not in cuda_bench.MODELS:
        problems.append(f"model {preset.model!r} is not in cuda_bench.MODELS")
    for step in steps:
        if step.argv and step.argv[1:3] == ["-m", "bench.gpu.cuda_bench"]:
            try:
                cuda_bench.parser().parse_args(step.argv[3:])
            except SystemExit:
                problems.append(f"step {step.name}: cuda_bench refuses its arguments {step.argv[3:]}")
    if max(int(b) for b in preset.batches.split(",")) > preset.op_slots:
        problems.append("the op bench's largest batch exceeds its slots")
    return problems


def _model_problems(preset: Preset) -> tuple[list[str], str]:
    """Build the bench model on the meta device: its size, and layer 0's projections against the shapes
    the op bench times."""
    import torch
    from transformers import LlamaForCausalLM

    from bench.gpu.cuda_bench import MODELS, llama_config, projection_shapes

    config = llama_config(MODELS[preset.model], vocab_size=preset.vocab or None)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    problems = []
    for name, (n_in, n_out) in projection_shapes(config).items():
        module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        if (module.in_features, module.out_features) != (n_in, n_out):
            problems.append(
                f"{name} is {module.in_features}x{module.out_features}, the op bench times {n_in}x{n_out}"
            )
    detail = (
        f"{preset.model}: {params / 1e9:.3f} B params ({params * 2 / 2**30:.2f} GiB in bf16), "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}"
    )
    return problems, detail


# -- running ----------------------------------------------------------------------------------------


def child_env(work: Path) -> dict[str, str]:
    """The steps' environment: unbuffered output, no model hub, loraswap's state under ``work``."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORASWAP_HOME": str(work / "home"),
    }


def _kill(proc: subprocess.Popen) -> None:
    """End the step's process group (each step leads its own, so its children end with it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def start(step: Step, root: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as handle:
        return subprocess.Popen(
            step.argv, cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT, process_group=0
        )


def finish(step: Step, proc: subprocess.Popen, timeout: float, started: float, log: Path) -> StepResult:
    """Wait up to ``timeout`` s for a started step; stop it past that. The status and a note."""
    try:
        rc = proc.wait(timeout=max(timeout, 0.1))
        status = "ok" if rc == 0 else "FAIL"
    except subprocess.TimeoutExpired:
        _kill(proc)
        rc, status = None, "TIMEOUT"
    result = StepResult(step.name, status, time.monotonic() - started, step.budget_s, rc=rc)
    text = log.read_text(errors="replace") if log.exists() else ""
    if step.junit is not None:
        summary = test_summary(step.junit if status != "TIMEOUT" else None, text)
        result.note = summary["note"]
        if status == "ok" and step.skips_fail and (summary["skipped"] or not summary["passed"]):
            result.status = "FAIL"
            result.note += " (GPU tests must not skip here: does torch see CUDA?)"
        elif rc == 5:
            result.note = "no tests collected"
    elif status != "ok":
        result.note = last_error(text)
    if status == "TIMEOUT":
        result.note = f"stopped at {timeout:.0f} s; {result.note}"
    return result


def test_summary(junit: Path | None, log: str) -> dict[str, object]:
    """The JUnit file's summary when there is a readable one, else the pytest log's."""
    if junit is not None and junit.is_file():
        try:
            return junit_summary(junit)
        except ET.ParseError:
            pass
    return log_summary(log)


def install(root: Path, wheels: Path, log: Path, timeout: float, python: str = sys.executable) -> StepResult:
    """``pip install --no-deps --no-index`` of the carried wheels the stack lacks, then the project in
    editable mode (``--no-build-isolation``: no index to fetch a build backend; ``--ignore-requires-python``:
    the project declares 3.11, the device machine has 3.12). An externally managed Python is told to let
    pip install all the same (the device machine is discarded after the run)."""
    from importlib import metadata

    started = time.monotonic()
    have = {normalize(d.metadata["Name"] or ""): d.version for d in metadata.distributions()}
    chosen, kept = [], []
    for dist, paths in wheel_files(wheels).items():
        paths = [p for p in paths if p.suffix == ".whl"]
        present = have.get(dist)
        if not paths:
            continue
        if present is None or (dist == "setuptools" and _version_tuple(present) < (69,)):
            chosen += paths
        else:
            kept.append(f"{dist} {present}")
    base = [python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir"]
    base.append("--disable-pip-version-check")
    commands = [[*base, *map(str, chosen)]] if chosen else []
    commands.append([*base, "--no-build-isolation", "--ignore-requires-python", "-e", str(root)])
    log.parent.mkdir(parents=True, exist_ok=True)
    rc = 0
    with open(log, "w") as handle:
        handle.write(f"kept from the stack: {', '.join(kept) or 'none'}\n")
        for command in commands:
            for extra in ([], ["--break-system-packages"]):
                left = timeout - (time.monotonic() - started)
                handle.write("$ " + " ".join([*command, *extra]) + "\n")
                handle.flush()
                try:
                    done = subprocess.run(
                        [*command, *extra], cwd=root, capture_output=True, text=True, timeout=left
                    )
                except subprocess.TimeoutExpired:
                    return StepResult(
                        "install", "TIMEOUT", time.monotonic() - started, timeout, "pip ran out of time"
                    )
                handle.write(done.stdout + done.stderr)
                rc = done.returncode
                if rc == 0 or "externally-managed-environment" not in done.stdout + done.stderr:
                    break
            if rc != 0:
                break
    names = [parse_wheel_name(p.name)[0] for p in chosen]
    note = (
        f"installed {', '.join(names) or 'no wheels'}; loraswap editable"
        if rc == 0
        else last_error(log.read_text())
    )
    return StepResult("install", "ok" if rc == 0 else "FAIL", time.monotonic() - started, timeout, note, rc)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def run(
    steps: list[Step], root: Path, out: Path, work: Path, wheels: Path, deadline_s: float, header: dict
) -> list[StepResult]:
    """Run ``steps`` in order under one deadline, writing ``steps.log`` and ``results.json`` into ``out``
    after every step and the table last (printed and in ``table.txt``)."""
    out.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    env = child_env(work)
    t0 = time.monotonic()
    end = t0 + deadline_s
    results: list[StepResult] = []
    background: dict[str, tuple[Step, subprocess.Popen, float]] = {}
    (out / "steps.log").write_text("")

    def record(result: StepResult, log: Path) -> None:
        results.append(result)
        print(
            f"[{time.monotonic() - t0:5.0f} s] {result.name:<13} {result.status:<8} {result.seconds:5.0f} s  "
            f"{result.note}",
            flush=True,
        )
        _append_log(out / "steps.log", result, log)
        write_results(out, work, steps, results, header)

    def collect(name: str) -> None:
        step, proc, started = background.pop(name)
        left = min(step.budget_s - (time.monotonic() - started), end - time.monotonic())
        record(finish(step, proc, left, started, logs / f"{name}.log"), logs / f"{name}.log")

    procs: list[subprocess.Popen] = []
    current: tuple[Step, float] | None = None  # the step being waited for
    previous = signal.signal(signal.SIGTERM, _stop)  # stopped from outside: end the steps, print the table
    try:
        for step in steps:
            for name in step.after:
                if name in background:
                    collect(name)
            ran = {r.name: r.status for r in results}
            failed = [n for n in step.needs if n in ran and ran[n] != "ok"]
            remaining = end - time.monotonic()
            left = min(step.budget_s, remaining)
            if failed or remaining < MIN_STEP_S:
                why = f"needs {', '.join(failed)}" if failed else "no time left before the deadline"
                record(StepResult(step.name, "skipped", 0, step.budget_s, why), Path())
                continue
            for stale in (step.json, step.junit):
                if stale is not None:
                    stale.unlink(missing_ok=True)
            log = logs / f"{step.name}.log"
            if step.argv is None:
                record(install(root, wheels, log, left), log)
                continue
            started = time.monotonic()
            proc = start(step, root, env, log)
            procs.append(proc)
            if step.background:
                background[step.name] = (step, proc, started)
                continue
            current = step, started
            record(finish(step, proc, left, started, log), log)
            current = None
        for name in list(background):
            current = background[name][0], background[name][2]
            collect(name)
    except SystemExit as stop:
        if current is not None:
            spent = time.monotonic() - current[1]
            record(StepResult(current[0].name, "STOPPED", spent, current[0].budget_s, str(stop)), Path())
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)
        text = table(load_results(out))
        (out / "table.txt").write_text(text + "\n")
        print("\n" + text, flush=True)
    return results


def _append_log(path: Path, result: StepResult, log: Path, keep: int = 1 << 20) -> None:
    """Append a step's log (its last ``keep`` bytes) under a header line."""
    data = log.read_bytes() if log.is_file() else b""
    cut = f"[... {len(data) - keep} bytes cut ...]\n".encode() if len(data) > keep else b""
    head = (
        f"\n===== {result.name}: {result.status} in {result.seconds:.0f} s (budget {result.budget_s:.0f} s)"
    )
    with open(path, "ab") as handle:
        handle.write(head.encode() + f" {result.note}\n".encode() + cut + data[-keep:])


def write_results(out: Path, work: Path, steps: list[Step], results: list[StepResult], header: dict) -> None:
    """``results.json``: the header, every step's result, the bench JSON files and the test summaries."""
    data: dict[str, object] = {**header, "steps": [asdict(r) for r in results]}
    done = {r.name for r in results}
    for step in steps:
        if step.name not in done:
            continue
        if step.json is not None and step.json.is_file():
            try:
                data[step.name] = json.loads(step.json.read_text())
            except json.JSONDecodeError as error:
                data[step.name] = {"error": f"unreadable: {error}"}
        if step.junit is not None and step.junit.is_file():
            try:
                data[step.name] = junit_summary(step.junit)
            except ET.ParseError as error:
                data[step.name] = {"error": f"unreadable: {error}"}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out / "results.json")


def load_results(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# -- command line -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (the device machine's $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="check every step's inputs here; run nothing")
    parser.add_argument(
        "--download-wheels", action="store_true", help="pip download the wheels, then check them"
    )
    parser.add_argument("--wheels", type=Path, default=ROOT / WHEEL_DIR, help="the carried wheel folder")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/loraswap-gpu-check"), help="model, registry, logs"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="overall seconds")
    parser.add_argument("--only", default="", help="comma-separated steps to run (with the steps they need)")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.download_wheels:
        done = subprocess.run([sys.executable, "-m", "pip", *download_args(str(args.wheels))], check=False)
        problems = wheel_problems(args.wheels)
        print("\n".join(problems) or f"{len(WHEELS)} wheels ready in {args.wheels}")
        return done.returncode or (1 if problems else 0)
    if args.dry_run:
        rows = dry_run(ROOT, args.wheels, preset, args.work, args.device)
        for name, ok, detail in rows:
            print(f"{'ok  ' if ok else 'FAIL'} {name:<13} {detail}")
        for step in select(
            plan(ROOT, args.out or Path("$OUT"), args.work, preset, args.device), args.only, args.skip
        ):
            command = " ".join(step.argv[1:] if step.argv else ["pip install --no-deps --no-index ..."])
            print(f"     step {step.name:<13}{step.budget_s:>4.0f} s  {command[:140]}")
        bad = [name for name, ok, _ in rows if not ok]
        print(f"dry run: {'ready' if not bad else 'NOT ready: ' + ', '.join(bad)}")
        return 1 if bad else 0
    if args.out is None:
        parser.error("--out is required (or --dry-run)")
    steps = select(plan(ROOT, args.out, args.work, preset, args.device), args.only, args.skip)
    header = {"preset": args.preset, "device": args.device, "deadline_s": args.deadline,
              "rounds": preset.rounds, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    results = run(steps, ROOT, args.out, args.work, args.wheels, args.deadline, header)
    return 0 if all(r.status == "ok" for r in results) else 1


def select(steps: list[Step], only: str, skip: str) -> list[Step]:
    """The steps ``--only`` names plus what they need (and the install), less ``--skip``'s."""
    names = {s.name for s in steps}
    wanted = {n for n in only.split(",") if n}
    dropped = {n for n in skip.split(",") if n}
    unknown = (wanted | dropped) - names
    if unknown:
        raise SystemExit(
            f"unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(s.name for s in steps)}"
        )
    if wanted:
        wanted |= {"install", "probe"} | {n for s in steps if s.name in wanted for n in s.needs}
        steps = [s for s in steps if s.name in wanted]
    return [s for s in steps if s.name not in dropped]


if __name__ == "__main__":
    raise SystemExit(main())
