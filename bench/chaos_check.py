"""The chaos soak's verdict: each request's outcome classified, answers checked against PEFT, the
server's RSS trend, and the report's table.

Outcome classes:

* **ok**: an answer from a version of the adapter asked for (checked for every answer) that is, token
  for token, PEFT's greedy answer with that version (checked for the answers of a sample of (version,
  prompt) pairs, the versions a fault damaged first: PEFT's answer is computed once per pair);
* **wrong**: an answer from a version of another name (or another version than the digest asked for),
  of the wrong length, or whose tokens differ from PEFT's; a difference at a position where PEFT's own
  top two logits are within ``tie_tolerance`` is a **near tie** instead (fp32 rounding, not a wrong
  answer), reported apart;
* **failed**: a gRPC status; NOT_FOUND for a name that was never removed is **lost** (counted apart);
* **hung**: neither answer nor status within the deadline plus the margin (the client gave up).
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.chaos_faults import Catalog

HUNG = "HUNG"
OK = "OK"
UNCLEAR = ("INTERNAL", "UNKNOWN")
VERDICT = {True: "pass", False: "FAIL", None: "n/a"}
CLIENT_DEADLINE_DETAILS = "Deadline Exceeded"  # grpc's own text when the client's deadline fires
"""In the details of a DEADLINE_EXCEEDED that gRPC itself raised when the client's deadline passed (alone,
or as ``Stream removed (Deadline Exceeded)``); the server's own status says ``the request's deadline
passed``."""


@dataclass
class Outcome:
    """What one request got.

    Attributes:
        index: The request's number.
        ref: The adapter reference sent.
        name: Its adapter name.
        kind: ``tag`` (``name:prod``), ``latest`` (``name``), ``digest`` (``name@sha256:…``) or
            ``scratch`` (a name the remover deletes now and then).
        prompt: The prompt.
        stream: Whether it streamed.
        code: ``OK``, a gRPC status code name, ``HUNG``, or the class of an error the client raised.
        started_s: When it was sent (seconds since the load began).
        seconds: How long it took.
        detail: The status details (errors only).
        digest: The adapter version that answered.
        token_ids: The generated tokens.
        prompt_tokens: The prompt's token count, as the server counted it.
    """

    index: int
    ref: str
    name: str
    kind: str
    prompt: str
    stream: bool
    code: str = ""
    started_s: float = 0.0
    seconds: float = 0.0
    detail: str = ""
    digest: str = ""
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int = 0


def rss_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of MiB against requests, in MiB per thousand requests (None under 3 points)."""
    if len(points) < 3:
        return None
    xs = [requests / 1000 for requests, _ in points]
    ys = [mib for _, mib in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    if spread == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread


def last_half(samples: list[dict[str, Any]], total: int) -> list[tuple[float, float]]:
    """(requests, MiB) of the samples in the second half of the run taken from the last server process
    (a restart starts memory over: only one process's samples make a trend)."""
    if not samples:
        return []
    last = samples[-1]["server"]
    return [
        (s["requests"], s["rss_mib"]) for s in samples if s["requests"] >= total / 2 and s["server"] == last
    ]


def identity_problem(outcome: Outcome, catalog: Catalog, new_tokens: int) -> str | None:
    """Why an answer cannot be right whatever its tokens (another adapter's version, wrong length)."""
    owner = catalog.names.get(outcome.digest)
    if owner is None:
        return f"answered by {outcome.digest or 'no adapter'}, not a version the bench pushed"
    if owner != outcome.name:
        return f"answered by {owner}@{outcome.digest} for {outcome.ref}"
    if outcome.kind == "digest" and not outcome.ref.endswith(outcome.digest):
        return f"answered by {outcome.digest} for {outcome.ref}"
    if len(outcome.token_ids) != new_tokens:
        return f"{len(outcome.token_ids)} tokens, not {new_tokens}"
    return None


class Reference:
    """PEFT greedy answers on the base in fp32, one adapter version at a time (loaded by digest).

    Args:
        base_dir: The base model folder (the server's).
        folders: Digest → the adapter folder pushed as that version.
    """

    def __init__(self, base_dir: Path, folders: dict[str, Path]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.folders = folders
        self.model: Any = None

    def use(self, digest: str) -> None:
        """Make ``digest``'s version the active adapter."""
        from peft import PeftModel

        name = digest.removeprefix("sha256:")
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, self.folders[digest], adapter_name=name).eval()
        elif name not in self.model.peft_config:
            self.model.load_adapter(self.folders[digest], adapter_name=name)
        self.model.set_adapter(name)

    @torch.inference_mode()
    def greedy(self, prompt: str, new_tokens: int) -> tuple[list[int], list[torch.Tensor], int]:
        """The active version's greedy tokens for ``prompt``, the logits each was picked from, and the
        prompt's token count."""
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]  # [1, prompt_len]
        out = self.model(input_ids=ids, use_cache=True)
        tokens, logits = [], []
        for _ in range(new_tokens):
            step = out.logits[0, -1].float()  # [vocab]
            tokens.append(int(step.argmax()))
            logits.append(step)
            nxt = torch.tensor([[tokens[-1]]])
            out = self.model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        return tokens, logits, ids.shape[1]


def compare(outcome: Outcome, tokens: list[int], logits: list[torch.Tensor], tolerance: float) -> str | None:
    """``None`` when the answer is PEFT's; ``near tie`` when it departs where PEFT's own choice is within
    ``tolerance`` of the server's token; else what differs."""
    for i, (got, want) in enumerate(zip(outcome.token_ids, tokens, strict=True)):
        if got != want:
            margin = float(logits[i][want] - logits[i][got])
            if margin <= tolerance:
                return "near tie"
            return f"token {i}: {got} where PEFT picks {want} (logit margin {margin:.4f})"
    return None


@dataclass
class AnswerCheck:
    """How answers are checked against PEFT.

    Attributes:
        base_dir: The base model folder (the server's).
        new_tokens: Tokens per answer.
        tolerance: Logit gap under which a departure is a near tie.
        max_references: Most (version, prompt) pairs to compute PEFT's answer for; the answers of a
            pair are all checked. Versions in ``suspects`` go first, the rest in a seeded random order.
        suspects: Versions a fault damaged (their cached files), checked first.
        seed: Orders the rest.
    """

    base_dir: Path
    new_tokens: int
    tolerance: float
    max_references: int
    suspects: frozenset[str] = frozenset()
    seed: int = 0


def check_answers(outcomes: list[Outcome], catalog: Catalog, how: AnswerCheck) -> dict[str, Any]:
    """Check every answer's version (:func:`identity_problem`); then the tokens of the answers of up to
    ``how.max_references`` (version, prompt) pairs against PEFT's (:func:`compare`)."""
    wrong: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        if outcome.code != OK:
            continue
        problem = identity_problem(outcome, catalog, how.new_tokens)
        if problem:
            wrong.append(_wrong(outcome, problem))
        else:
            groups[outcome.digest, outcome.prompt].append(outcome)
    keys = sorted(groups)
    random.Random(how.seed).shuffle(keys)
    keys = sorted(keys, key=lambda key: key[0] not in how.suspects)[: how.max_references]  # stable
    near_ties = checked = 0
    with torch_threads(1):  # beside other work on a few cores, one thread is the fastest
        reference = Reference(how.base_dir, catalog.folders) if keys else None
        for digest, prompt in keys:
            reference.use(digest)  # type: ignore[union-attr]
            tokens, logits, prompt_len = reference.greedy(prompt, how.new_tokens)  # type: ignore[union-attr]
            for outcome in groups[digest, prompt]:
                verdict = compare(outcome, tokens, logits, how.tolerance)
                if verdict is None and outcome.prompt_tokens != prompt_len:
                    verdict = f"prompt of {outcome.prompt_tokens} tokens, PEFT's tokenizer gives {prompt_len}"
                near_ties += verdict == "near tie"
                checked += 1
                if verdict not in (None, "near tie"):
                    wrong.append(_wrong(outcome, verdict))
    return {
        "answers": sum(o.code == OK for o in outcomes),
        "checked": checked,
        "wrong": wrong,
        "near_ties": near_ties,
        "references": len(keys),
        "pairs": len(groups),
        "suspects_checked": sorted({d for d, _ in keys} & how.suspects),
    }


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _wrong(outcome: Outcome, why: str) -> dict[str, Any]:
    return {"index": outcome.index, "ref": outcome.ref, "digest": outcome.digest, "why": why}


def classify(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts by code, and the hung, lost and unclear ones (first few of each with their details)."""
    codes = Counter(o.code for o in outcomes)
    lost = [o for o in outcomes if o.code == "NOT_FOUND" and o.kind != "scratch"]
    hung = [o for o in outcomes if o.code == HUNG]
    unclear = [o for o in outcomes if o.code in UNCLEAR or not o.code.isupper()]
    deadline = [o for o in outcomes if o.code == "DEADLINE_EXCEEDED"]
    by_client = sum(CLIENT_DEADLINE_DETAILS in o.detail for o in deadline)
    examples: dict[str, list[str]] = defaultdict(list)
    for o in outcomes:
        if o.code != OK and len(examples[o.code]) < 3:
            examples[o.code].append(f"{o.ref}: {o.detail}"[:300])
    return {
        "codes": dict(codes.most_common()),
        "ok": codes[OK],
        "failed": sum(n for code, n in codes.items() if code not in (OK, HUNG)),
        "hung": len(hung),
        "lost": len(lost),
        "unclear": len(unclear),
        "deadline_exceeded": {"client_deadline": by_client, "server_said": len(deadline) - by_client},
        "hung_requests": [_brief(o) for o in hung[:20]],
        "lost_requests": [_brief(o) for o in lost[:20]],
        "examples": dict(examples),
    }


def _brief(outcome: Outcome) -> dict[str, Any]:
    return {
        "index": outcome.index,
        "ref": outcome.ref,
        "started_s": outcome.started_s,
        "detail": outcome.detail,
    }


def fault_outcomes(faults: list[dict[str, Any]], outcomes: list[Outcome]) -> None:
    """Add to each fault the codes of the requests in flight at some point of its window."""
    for fault in faults:
        begin, end = fault["started_s"], fault["ended_s"]
        hit = [o.code for o in outcomes if o.started_s <= end and o.started_s + o.seconds >= begin]
        fault["outcomes"] = dict(Counter(hit).most_common())


def damaged_versions(faults: list[dict[str, Any]]) -> frozenset[str]:
    """The versions whose cached files the faults damaged."""
    found = [f["detail"] for f in faults if f["kind"].startswith("cache")]
    found += [f["detail"].get("unseen_corruption", {}) for f in faults if f["kind"] == "server-kill"]
    return frozenset(d["digest"] for d in found if d.get("digest"))


def trace(outcomes: list[Outcome]) -> list[list[Any]]:
    """One row per request: index, reference, code, sent at (s), took (s), answering version (short),
    details (short)."""
    return [
        [o.index, o.ref, o.code, o.started_s, o.seconds, o.digest[7:19], o.detail[:120]] for o in outcomes
    ]


def table(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    r, c, stuck = report, report["outcomes"], report["server"]["stuck_at_end"]
    lines = [
        f"chaos soak: {r['requests']} requests, {r['config']['clients']} clients, "
        f"{r['config']['adapters']} adapters, {r['wall_s']:.0f} s",
        f"{'outcome':<24}{'count':>8}",
        *(f"  {code:<22}{n:>8}" for code, n in c["codes"].items()),
        f"{'ok (answers)':<24}{c['ok']:>8}   checked against PEFT: {r['answers']['checked']} "
        f"({r['answers']['references']} of {r['answers']['pairs']} version-prompt pairs), "
        f"near ties {r['answers']['near_ties']}",
        f"{'failed with a status':<24}{c['failed']:>8}   unclear (INTERNAL/UNKNOWN/client): {c['unclear']}",
        f"{'wrong':<24}{len(r['answers']['wrong']):>8}",
        f"{'lost (NOT_FOUND)':<24}{c['lost']:>8}",
        f"{'hung':<24}{c['hung']:>8}   stuck in the server at the end: "
        + ("unknown (its metrics could not be read)" if stuck < 0 else str(stuck)),
        f"deadline exceeded: {c['deadline_exceeded']}",
        f"server: {r['server']['starts']} starts, {r['server']['kills']} kills, "
        f"{len(r['server']['crashes'])} crashes, exit {r['server']['exit_code']}",
        "RSS MiB by requests: "
        + ", ".join(f"{s['requests']}: {s['rss_mib']:.0f}" for s in r["rss"]["samples"]),
        f"RSS slope, last half: {r['rss']['slope_mib_per_1000']} MiB / 1000 requests "
        f"({len(r['rss']['last_half'])} points)",
        f"registry verify: exit {r['verify']['exit_code']}: {r['verify']['output'].strip()[-200:]}",
        "faults: " + "; ".join(f"{f['kind']}@{f['at_request']}" for f in r["faults"]),
        "churn: " + ", ".join(f"{k} {v}" for k, v in {**r["churn"]["done"], **r["churn"]["errors"]}.items()),
        "checks: " + ", ".join(f"{k} {VERDICT[v]}" for k, v in r["checks"].items()),
    ]
    return "\n".join(lines)
