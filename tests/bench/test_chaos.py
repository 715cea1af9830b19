"""bench/chaos: a quick soak on the tiny model (every fault once) and its pieces one by one."""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from bench import chaos
from bench.chaos_check import (
    CLIENT_DEADLINE_DETAILS,
    HUNG,
    OK,
    AnswerCheck,
    Outcome,
    Reference,
    check_answers,
    classify,
    compare,
    identity_problem,
    last_half,
    rss_slope,
    torch_threads,
)
from bench.chaos_faults import KINDS, Catalog, corrupt_cache
from bench.chaos_load import code_of, requests_in_server
from bench.chaos_net import FaultProxy, free_port
from loraswap import errors
from loraswap.server.grpc.client import ServerError

DIGEST_A, DIGEST_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


@pytest.mark.slow
def test_quick_soak_injects_every_fault_and_loses_nothing(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    code = chaos.main(
        ["--quick", "--base", str(tiny_base), "--out", str(out), "--workdir", str(tmp_path / "w")]
    )
    report = json.loads(out.read_text())
    outcomes = report["outcomes"]
    assert report["requests"] == 72 == sum(outcomes["codes"].values()) == len(report["trace"])
    assert {f["kind"] for f in report["faults"]} == set(KINDS)
    kill = next(f for f in report["faults"] if f["kind"] == "server-kill")
    assert kill["detail"]["download_in_progress"] and kill["detail"]["unseen_corruption"]["how"] == "unseen"
    assert report["server"]["kills"] == 1 and report["server"]["starts"] >= 2
    assert report["moto_starts"] == 2 and report["churn"]["done"]["tag moves"] > 0
    assert outcomes["ok"] > 0 and report["answers"]["checked"] == outcomes["ok"]
    assert report["rss"]["samples"][0]["requests"] == 0 and report["checks"]["rss"] is None  # too short
    # The invariants of issue 23. A failure here is a server (or registry) defect to report, not a
    # reason to loosen the test: nothing hung, no wrong answer, nothing lost, no crash, verify clean.
    # Known when this was written (the host tier maps cache files privately, and a private mapping shows
    # what is written into the file in place): cache-overwrite of a version held in the host tier gives
    # wrong answers ("wrong" fails), and cache-truncate of one kills the server with SIGBUS on its next
    # use (a crash with exit code -7: "crashes" fails). Which version a fault hits varies, so a run may
    # miss them.
    assert report["checks"] == {
        "hung": True, "wrong": True, "lost": True, "crashes": True, "rss": None, "verify": True,
    }, (outcomes, report["answers"]["wrong"], report["server"], report["verify"])  # fmt: skip
    assert code == 0 and report["passed"]


def test_rss_slope_is_the_least_squares_slope_per_thousand_requests() -> None:
    assert rss_slope([(1000, 500.0), (2000, 502.0), (3000, 504.0)]) == pytest.approx(2.0)
    assert rss_slope([(0, 10.0), (500, 11.0), (1000, 9.0), (1500, 10.0)]) == pytest.approx(-0.4)
    assert rss_slope([(5000, 700.0), (6000, 700.0), (7000, 700.0)]) == 0.0
    assert rss_slope([(1000, 1.0), (2000, 2.0)]) is None  # two points make no trend


def test_last_half_takes_the_last_server_process_only() -> None:
    samples = [
        {"requests": r, "rss_mib": float(r), "server": 1 if r < 6000 else 2} for r in range(0, 10001, 1000)
    ]
    assert last_half(samples, 10_000) == [(r, float(r)) for r in range(6000, 10001, 1000)]
    assert last_half([], 10) == []


def _outcome(code: str, kind: str = "tag", detail: str = "", **fields) -> Outcome:
    return Outcome(0, "chaos-00:prod", "chaos-00", kind, "p", False, code=code, detail=detail, **fields)


def test_classify_counts_codes_lost_hung_and_unclear() -> None:
    outcomes = [
        _outcome(OK), _outcome("UNAVAILABLE"), _outcome("NOT_FOUND"), _outcome("NOT_FOUND", kind="scratch"),
        _outcome(HUNG), _outcome("INTERNAL"), _outcome("AioRpcError"),
        _outcome("DEADLINE_EXCEEDED", detail=CLIENT_DEADLINE_DETAILS),
        _outcome("DEADLINE_EXCEEDED", detail=f"Stream removed ({CLIENT_DEADLINE_DETAILS})"),
        _outcome("DEADLINE_EXCEEDED", detail="the request's deadline passed"),
    ]  # fmt: skip
    counts = classify(outcomes)
    assert counts["ok"] == 1 and counts["failed"] == 8 and counts["hung"] == 1
    assert counts["lost"] == 1  # NOT_FOUND for a scratch name is a clear status, not a loss
    assert counts["unclear"] == 2
    assert counts["deadline_exceeded"] == {"client_deadline": 2, "server_said": 1}


def test_an_answer_from_another_version_or_of_another_length_is_wrong() -> None:
    catalog = Catalog()
    catalog.record("chaos-00", DIGEST_A, Path("a"))
    catalog.record("chaos-01", DIGEST_B, Path("b"))
    ok = _outcome(OK, digest=DIGEST_A, token_ids=(1, 2))
    assert identity_problem(ok, catalog, 2) is None
    assert "chaos-01" in identity_problem(_outcome(OK, digest=DIGEST_B, token_ids=(1, 2)), catalog, 2)
    assert "not a version" in identity_problem(_outcome(OK, digest="", token_ids=(1, 2)), catalog, 2)
    assert "tokens" in identity_problem(ok, catalog, 3)
    pinned = Outcome(0, f"chaos-00@{DIGEST_B}", "chaos-00", "digest", "p", False, code=OK, digest=DIGEST_A)
    pinned.token_ids = (1, 2)
    assert DIGEST_A in identity_problem(pinned, catalog, 2)


def test_tokens_differing_from_peft_are_wrong_unless_peft_itself_nearly_ties() -> None:
    logits = [torch.tensor([0.0, 5.0, 4.9995, 1.0]), torch.tensor([3.0, 0.0, 0.0, 0.0])]
    assert compare(_outcome(OK, token_ids=(1, 0)), [1, 0], logits, 1e-3) is None
    assert compare(_outcome(OK, token_ids=(2, 0)), [1, 0], logits, 1e-3) == "near tie"
    assert "PEFT picks 1" in compare(_outcome(OK, token_ids=(3, 0)), [1, 0], logits, 1e-3)
    assert "token 1" in compare(_outcome(OK, token_ids=(1, 2)), [1, 0], logits, 1e-3)


def test_code_of_gives_the_grpc_code_each_client_error_stands_for() -> None:
    assert code_of(ServerError(grpc.StatusCode.UNAVAILABLE, "down")) == "UNAVAILABLE"
    assert code_of(errors.NotFoundError("x")) == "NOT_FOUND"
    assert code_of(errors.DeadlineExceededError("x")) == "DEADLINE_EXCEEDED"
    assert code_of(errors.IntegrityError("x")) == "DATA_LOSS"
    assert code_of(RuntimeError("x")) == "RuntimeError"


def test_the_full_plan_kills_the_server_only_early_and_has_every_kind() -> None:
    plan = chaos.full_plan(10_000)
    assert {kind for _, kind in plan} == set(KINDS)
    assert all(at <= 3500 for at, kind in plan if kind == "server-kill")
    assert [at for at, _ in plan] == sorted(at for at, _ in plan) and plan[-1][0] <= 9000
    assert {kind for _, kind in chaos.quick_plan(72)} == set(KINDS)


def _cached(cache: Path, seed: int) -> Path:
    folder = cache / f"{seed:064x}"
    folder.mkdir(parents=True)
    header = b'{"w":{"dtype":"F32","shape":[64],"data_offsets":[0,256]}}'
    (folder / "adapter_model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + bytes(256)
    )
    return folder / "adapter_model.safetensors"


@pytest.mark.parametrize("how", ["overwrite", "unseen", "truncate", "replace"])
def test_corrupt_cache_damages_one_cached_file_as_asked(tmp_path: Path, how: str) -> None:
    path = _cached(tmp_path / "adapters", 1)
    before, data = path.stat(), path.read_bytes()
    done = corrupt_cache(tmp_path / "adapters", how, random.Random(0))
    after = path.stat()
    assert done["digest"] == "sha256:" + path.parent.name and done["how"] == how
    assert path.read_bytes() != data
    if how == "unseen":  # what a stat marker records is unchanged
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            before.st_size, before.st_mtime_ns, before.st_ino,
        )  # fmt: skip
    if how == "truncate":
        assert after.st_size == before.st_size // 2
    if how == "replace":
        assert after.st_ino != before.st_ino and after.st_size == before.st_size
    assert corrupt_cache(tmp_path / "empty", how, random.Random(0)) == {}


def _echo_server() -> int:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=lambda c=conn: _echo(c), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    try:
        while data := conn.recv(4096):
            conn.sendall(data)
    except OSError:
        pass
    conn.close()


def _exchange(port: int, data: bytes = b"ping", timeout: float = 0.5) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(data)
            return "ok" if sock.recv(64) == data[:64] else "closed"
    except OSError as exc:
        return type(exc).__name__


def test_fault_proxy_modes() -> None:
    proxy = FaultProxy(_echo_server())
    try:
        assert _exchange(proxy.port) == "ok"
        expected = {
            "refuse": "ConnectionRefusedError", "reset": "ConnectionResetError",
            "stall": "TimeoutError", "blackhole": "TimeoutError",
        }  # fmt: skip
        for mode, seen in expected.items():
            proxy.set_mode(mode)
            assert _exchange(proxy.port) == seen, mode
            proxy.set_mode("pass")
            assert _exchange(proxy.port) == "ok", mode
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        proxy.set_mode("stall")  # a stall heals: what was sent arrives once it ends
        held.sendall(b"late")
        threading.Timer(0.3, proxy.set_mode, ("pass",)).start()
        assert held.recv(16) == b"late"
        proxy.set_mode("blackhole")  # a blackholed connection stays dead after the blackhole ends
        proxy.set_mode("pass")
        held.sendall(b"lost")
        held.settimeout(0.5)
        with pytest.raises(TimeoutError):
            held.recv(16)
        held.close()
    finally:
        proxy.close()


def test_fault_proxy_resets_clients_while_the_endpoint_is_down() -> None:
    proxy = FaultProxy(free_port())  # nothing listens there
    try:
        assert _exchange(proxy.port) in ("ConnectionResetError", "closed")
    finally:
        proxy.close()


def test_fault_proxy_throttles() -> None:
    proxy = FaultProxy(_echo_server(), throttle_bytes_s=20_000)
    try:
        proxy.set_mode("throttle")
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(bytes(4000))
            got = b""
            while len(got) < 4000:
                got += sock.recv(4096)
        assert time.monotonic() - started >= 0.3  # 4,000 bytes each way at 20,000 bytes/s
    finally:
        proxy.close()


def test_answers_are_checked_against_peft_with_the_version_that_answered(
    tiny_base: Path, tmp_path: Path
) -> None:
    folders = chaos.make_adapters(tiny_base, tmp_path, 2, seed=3)
    catalog = Catalog()
    for i, folder in enumerate(folders):
        catalog.record("chaos-00", f"sha256:{i + 1:064x}", folder)
    with torch_threads(1):
        reference = Reference(tiny_base, catalog.folders)
        reference.use(f"sha256:{1:064x}")
        right = tuple(reference.greedy("The quick brown fox", 3)[0])
        reference.use(f"sha256:{2:064x}")
        other = tuple(reference.greedy("The quick brown fox", 3)[0])
    assert right != other  # the two random adapters answer differently
    prompt_len = len(reference.tokenizer("The quick brown fox")["input_ids"])

    def answer(digest: int, tokens: tuple[int, ...]) -> Outcome:
        fields = {"digest": f"sha256:{digest:064x}", "token_ids": tokens, "prompt_tokens": prompt_len}
        return Outcome(0, "chaos-00", "chaos-00", "latest", "The quick brown fox", False, code=OK, **fields)

    outcomes = [answer(1, right), answer(2, other), answer(2, right)]
    how = AnswerCheck(tiny_base, 3, 1e-6, max_references=10, suspects=frozenset({f"sha256:{2:064x}"}))
    result = check_answers(outcomes, catalog, how)
    assert result["checked"] == 3 and result["references"] == 2
    assert [w["digest"] for w in result["wrong"]] == [f"sha256:{2:064x}"]  # version 2 answering as 1
    assert result["suspects_checked"] == [f"sha256:{2:064x}"]
    assert check_answers(outcomes, catalog, dataclasses.replace(how, max_references=1))["checked"] == 2


def test_what_is_left_in_the_server_is_read_from_its_metrics() -> None:
    metrics = """# HELP loraswap_queue_depth Requests waiting for admission
# TYPE loraswap_queue_depth gauge
loraswap_queue_depth 2.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="8",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e9
"""
    assert requests_in_server(metrics) == 4
    idle = metrics.replace("2.0", "0.0").replace('"a,b"', '""')
    assert requests_in_server(idle) == 0
