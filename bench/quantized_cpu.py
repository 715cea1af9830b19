"""A quantized base on CPU, measured (issue 22): fp32, bf16, bitsandbytes int8 and nf4, an int8 weight-only
candidate and fp16w, side by side on the embedded SmolLM2, in one run.

Each variant runs in its own fresh process (``bench/quantized_variant.py``, so its RSS is its own), in
rounds that alternate the variants (the order rotates every round, so drift hits all alike). A variant
reports the engine's decode throughput for ``--requests`` concurrent greedy requests of ``--new-tokens``
tokens (EOS ignored) on the base alone, on one adapter and on that many adapters (all projections, r16);
the process RSS before and after the engine is built, its peak, and the bytes of the base's weights. In
the first round each variant also generates greedy tokens for a few (adapter, prompt) pairs, which are
compared with PEFT's on the same weights (bitsandbytes loaded the same way; the plain dtype; for int8wo
and fp16w an fp32 model holding the dequantized weights) and with PEFT's on the fp32 base. An op table
(the model's projection shapes at ``--requests`` rows) comes first.

Run: ``python -m bench.quantized_cpu [--variants fp32,fp16w] [--rounds 2] [--threads 1]``. bf16 (about four
times slower than fp32 on a CPU without native bf16) runs with 16 new tokens (``--short``); it and the
bitsandbytes variants run in the first round only (``--once``); ``--agree-prompts 0`` skips the PEFT
comparison. Prints a table; writes JSON to ``--out`` (default ``$LORASWAP_HOME/bench/quantized_cpu.json``).
On a 2-core AVX2 CPU every variant takes 11 minutes at one thread; ``--variants fp32,int8wo,fp16w
--agree-prompts 0`` three and a half at two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.adapters import write_adapter
from bench.engine_bench import ALL, PROMPTS
from bench.quantized_ops import cpu_description, op_table, print_op_table
from bench.quantized_variant import VARIANTS, Spec
from loraswap import paths
from loraswap.models import resolve_base


def prepare(base_dir: Path, work: Path, count: int) -> tuple[Path, dict[str, str]]:
    """A registry under ``work`` holding ``count`` random all-projection r16 adapters for the base."""
    from loraswap.registry import open_registry

    registry = open_registry(work / "registry")
    base = resolve_base(base_dir)
    folders = {}
    for i in range(count):
        name = f"a{i}"
        folder = write_adapter(work / name, base.path, seed=500 + i, rank=16, targets=ALL)
        registry.push(folder, name, base=base)
        folders[name] = str(folder)
    return work / "registry", folders


class VariantFailed(RuntimeError):
    """A variant's process exited with an error (its stderr's tail is the message)."""


def run_variant(spec: Spec, work: Path, timeout: float) -> dict:
    """Run one variant in a fresh interpreter; its result.

    Raises:
        VariantFailed: The process failed.
    """
    stem = f"{spec.variant}-{time.monotonic_ns()}"
    spec_path, out = work / f"{stem}.spec.json", work / f"{stem}.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    cmd = [sys.executable, "-m", "bench.quantized_variant", "--spec", str(spec_path), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise VariantFailed(f"variant {spec.variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def agreement(got: list[list[int]], want: list[list[int]]) -> dict[str, float]:
    """Greedy tokens against an oracle's: sequences identical, and the mean share of each sequence
    before its first differing token (one flipped token changes everything after it). An oracle that
    generated more tokens (fp32's, beside a variant run with ``--short-tokens``) is cut to the variant's."""
    want = [w[: len(g)] for g, w in zip(got, want, strict=True)]
    prefixes = []
    for g, w in zip(got, want, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), min(len(g), len(w)))
        prefixes.append(same / max(len(w), 1))
    return {
        "identical": sum(g == w for g, w in zip(got, want, strict=True)),
        "sequences": len(want),
        "prefix_share": statistics.mean(prefixes) if prefixes else 0.0,
    }


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: median tok/s per case over its rounds, memory of its first run, agreements."""
    fp32 = next((r["peft_tokens"] for r in runs.get("fp32", []) if "peft_tokens" in r), None)
    out = {}
    for variant, results in runs.items():
        first = results[0]
        row = {
            "about": VARIANTS[variant].about,
            "precision": first["precision"],
            "rounds": len(results),
            "new_tokens": first["new_tokens"],
            "tok_s": {c: statistics.median(r["tok_s"][c] for r in results) for c in first["tok_s"]},
            "tok_s_runs": [r["tok_s"] for r in results],
            "weight_bytes": first["weight_bytes"],
            "rss_before_bytes": first["before_load"]["rss_bytes"],
            "rss_after_bytes": first["after_load"]["rss_bytes"],
            "peak_rss_bytes": first["after_load"]["peak_rss_bytes"],
            "load_s": first["load_s"],
        }
        tokens = next((r for r in results if "engine_tokens" in r), None)
        if tokens is not None:
            row["agree_same_weights"] = agreement(tokens["engine_tokens"], tokens["peft_tokens"])
            if fp32 is not None:
                row["agree_fp32_peft"] = agreement(tokens["engine_tokens"], fp32)
        out[variant] = row
    return out


def print_table(summary: dict[str, dict], adapters: int, reference: str = "fp32") -> None:
    """The summary as a table, one line per variant, then each variant's legend."""
    ref = summary.get(reference)
    mib = 2**20
    head = ("variant", "base tok/s", "1 adapter", f"{adapters} adapters", f"vs {reference}", "weights MiB",
            "RSS MiB", "peak MiB", "agree (same w.)", "agree (fp32 PEFT)")  # fmt: skip
    rows = [head]
    for variant, r in summary.items():
        t = r["tok_s"]
        ratio = ""
        if ref is not None:
            ratio = " / ".join(f"{t[c] / ref['tok_s'][c]:.2f}" for c in ("base", "one", "mixed"))

        def agree(key: str, r: dict = r) -> str:
            a = r.get(key)
            return "" if a is None else f"{a['identical']}/{a['sequences']} ({a['prefix_share']:.0%})"

        rows.append((
            f"{variant} (x{r['rounds']}, {r['new_tokens']} tok)", f"{t['base']:.1f}", f"{t['one']:.1f}",
            f"{t['mixed']:.1f}", ratio,
            f"{r['weight_bytes'] / mib:.1f}", f"{r['rss_after_bytes'] / mib:.0f}",
            f"{r['peak_rss_bytes'] / mib:.0f}", agree("agree_same_weights"), agree("agree_fp32_peft"),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    cases = f"base / 1 adapter / {adapters} adapters"
    print(f"tok/s: median over rounds; vs {reference}: {cases}; agree: identical sequences (mean share"
          " before the first differing token)")  # fmt: skip
    for variant, r in summary.items():
        print(f"  {variant}: {r['about']}; {r['precision']}")


def schedule(variants: list[str], rounds: int, once: set[str]) -> list[tuple[int, str]]:
    """(round, variant) in run order: every round runs the variants in an order rotated by one, so no
    variant is always first; those in ``once`` run in the first round only."""
    order = []
    for k in range(rounds):
        turn = variants[k % len(variants) :] + variants[: k % len(variants)]
        order += [(k, v) for v in turn if k == 0 or v not in once]
    return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="default")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"from {','.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--once", default="bf16,int8,nf4", help="variants run in round 1 only (slow ones)")
    parser.add_argument("--short", default="bf16", help="variants run with --short-tokens (slow ones)")
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests (and adapters)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--agree-prompts", type=int, default=2, help="prompts per adapter for agreement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-ops", action="store_true", help="skip the op table")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=900, help="seconds one variant run may take")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    base = resolve_base(args.base)
    started = time.perf_counter()
    report: dict = {"base": str(base.path), "args": {k: str(v) for k, v in vars(args).items()}}
    report["cpu"] = cpu_description()
    if not args.no_ops:
        report["ops_us"] = op_table(base.path, args.requests, args.threads)
        print_op_table(report["ops_us"], args.requests)
    work = Path(tempfile.mkdtemp(prefix="loraswap-quantized-"))
    registry, folders = prepare(base.path, work, args.requests)
    names = list(folders)
    pairs = [(a, p) for a in ("", *names[:2]) for p in PROMPTS[: args.agree_prompts]]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    once = set(args.once.split(","))
    for k, variant in schedule(variants, args.rounds, once):
        tokens = args.short_tokens if variant in args.short.split(",") else args.new_tokens
        spec = Spec(
            variant, str(base.path), str(registry), folders, args.requests, tokens,
            pairs if k == 0 else [], args.threads,
        )  # fmt: skip
        try:
            result = run_variant(spec, work, args.timeout)
        except VariantFailed as failure:  # the other variants' figures still count
            report.setdefault("failed", {}).setdefault(variant, []).append(str(failure))
            print(f"round {k + 1} {failure}", flush=True)
            continue
        runs[variant].append(result)
        print(f"round {k + 1} {variant}: {result['tok_s']}", flush=True)
    runs = {v: r for v, r in runs.items() if r}
    report["runs"] = runs
    report["summary"] = summarize(runs)
    report["seconds"] = time.perf_counter() - started
    print_table(report["summary"], args.requests)
    out = args.out or paths.home() / "bench" / "quantized_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
