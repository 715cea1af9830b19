"""The engine replica's side of Ray's multiplexing, without a Ray cluster: when Ray's LRU drops an adapter,
the replica frees its device slot and leaves the host copy to the engine's host tier (issue 24, item 10:
one eviction policy per tier, not Ray's on top of the engine's)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from loraswap.models import resolve_base
from loraswap.registry import open_registry
from loraswap.server.engine import EngineConfig
from loraswap.server.ray.deployment import EngineReplica
from loraswap.server.settings import ServeSettings


def test_a_ray_eviction_frees_the_slot_and_keeps_the_host_copy(
    tiny_base: Path, make_adapter, tmp_path: Path
) -> None:
    """Defect: Ray's release unloaded the adapter from the host tier as well, so the host byte budget did
    nothing under Ray and a digest routed back to the replica was read from disk again."""
    registry = open_registry(tmp_path / "registry")
    digest = registry.push(make_adapter(r=4, seed=5), "a", base=resolve_base(tiny_base)).digest
    engine = EngineConfig(base=str(tiny_base), registry=str(tmp_path / "registry"), quantization="fp32",
                          adapter_slots=2, max_rank=8, max_batch_size=2, max_seq_len=32)  # fmt: skip
    made: list[EngineReplica] = []  # built on a thread of its own, as Ray does: the replica makes its
    # thread serial (loraswap.device.serial_torch_thread), which must not leak into the test's own
    builder = threading.Thread(
        target=lambda: made.append(EngineReplica(ServeSettings(engine=engine, metrics_port=-1)))
    )
    builder.start()
    builder.join()
    (replica,) = made
    try:
        replica._names[digest] = "a"
        resident = asyncio.run(replica.load_adapter(digest))
        assert {"device", "host"} <= set(replica.engine.adapters.status(digest).tiers)
        resident.release()  # what Ray's multiplexer does when its LRU drops the model
        assert replica.engine.adapters.status(digest).tiers[:1] == ("host",)
        assert "device" not in replica.engine.adapters.status(digest).tiers
    finally:
        replica.engine.stop(drain_timeout=0)
