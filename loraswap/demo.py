"""The README's demo: the embedded SmolLM2, two adapters trained and pushed, served side by side over gRPC.

Steps (each one a real ``loraswap`` command, run as a user would):
1. prepare the embedded base model (converted once, then cached);
2. train two small adapters on CPU and push them to a local registry;
3. list and show them in the registry;
4. start ``loraswap serve`` on 127.0.0.1, call both adapters and the base model over gRPC;
5. call one adapter through the OpenAI-compatible HTTP API;
6. print the server's view of its adapters and a few Prometheus metrics, then stop it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loraswap.devtools.launch import start_serve

DATA = Path(__file__).parent / "demo_data"
TASKS = {
    "secret-codes": (DATA / "secret_codes.jsonl", "Q: What is the secret code of Zorblax?\nA:"),
    "json-tags": (DATA / "json_tags.jsonl", "Tag: violin\nJSON:"),
}
TRAIN_FLAGS = [
    "--lora-r", "16", "--lora-alpha", "32", "--lora-target-modules",
    "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--learning-rate", "3e-3",
    "--warmup-steps", "3", "--max-steps", "30", "--micro-batch-size", "4", "--max-seq-len", "48",
    "--eval-fraction", "0", "--seed", "42",
]  # fmt: skip


SLOW_COMMANDS = ("model", "train")  # commands whose time the demo shows


def loraswap(*args: str, env: dict[str, str]) -> None:
    print(f"\n$ loraswap {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loraswap.cli", *args], env=env, check=True)
    if args[0] in SLOW_COMMANDS:
        print(f"[{time.perf_counter() - started:.1f} s]", flush=True)


def http_call(url: str, model: str, prompt: str) -> None:
    """One OpenAI-style completion over HTTP, shown as the equivalent curl command."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 20, "temperature": 0, "stop": ["\n"]})
    print(f"\n$ curl -s {url} -H 'Content-Type: application/json' -d {shlex.quote(body)}", flush=True)
    request = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
    print(json.dumps({"text": reply["choices"][0]["text"], "usage": reply["usage"]}))


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="loraswap-demo-"))
    env = {**os.environ, "LORASWAP_REGISTRY": str(work / "registry")}
    loraswap("model", "prepare", env=env)
    for name, (data, _) in TASKS.items():
        out = str(work / name)
        loraswap("train", "--base", "default", "--data", str(data), "--output", out, "--push", f"{name}:demo",
                 *TRAIN_FLAGS, env=env)  # fmt: skip
    loraswap("registry", "list", env=env)
    loraswap("registry", "show", "secret-codes:demo", env=env)
    flags = ["--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0"]
    # Sized for the demo's two rank-16 adapters: the defaults (32 slots of rank 64, a 32 x 1024-token KV
    # cache) zero about 4 GB at start in fp32, which is most of a start-up on a small CPU.
    flags += ["--base", "default", "--adapter-slots", "4", "--max-rank", "16", "--max-batch-size", "8"]
    print(f"\n$ loraswap serve {shlex.join(flags)}", flush=True)
    started = time.perf_counter()
    server = start_serve(flags, env)
    print(f"[serving after {time.perf_counter() - started:.1f} s]", flush=True)
    target = server.target
    try:
        for name, (_, prompt) in TASKS.items():
            for adapter in (f"{name}:demo", ""):
                loraswap("generate", "--target", target, "--adapter", adapter, "--max-new-tokens", "20",
                         "--stop", "\n", prompt, env=env)  # fmt: skip
        http_call(f"{server.http_url}/v1/completions", "secret-codes:demo", TASKS["secret-codes"][1])
        loraswap("adapters", "list", "--target", target, env=env)
        loraswap("info", "--target", target, env=env)
        print(f"\n$ curl {server.metrics_url} | grep loraswap_adapter_cache", flush=True)
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        print("\n".join(line for line in text.splitlines() if line.startswith("loraswap_adapter_cache")))
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        print("\n[server log]\n" + "".join(server.log), end="")
    print(f"\ndemo finished; registry and adapters are in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
