"""The adapter manager over a real local registry and real LoRA layers: its bookkeeping stays bounded and
consistent while loads, listings and slot changes interleave."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loraswap import paths
from loraswap.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_key
from loraswap.errors import OverloadedError
from loraswap.registry.cache import cached_adapter_dir
from loraswap.registry.registry import Registry, open_registry
from loraswap.server.adapters.manager import AdapterManager
from loraswap.server.adapters.reader import BaseShape
from loraswap.server.engine.api import NullObserver
from loraswap.server.lora.layer import install_lora_layers

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (16, 8)}


def _model() -> nn.Module:
    """A module tree with the two projections of :data:`MODULES` under their PEFT names."""
    attn = nn.Module()
    attn.q_proj = nn.Linear(16, 16, bias=False)
    attn.v_proj = nn.Linear(16, 8, bias=False)
    block = nn.Module()
    block.self_attn = attn
    inner = nn.Module()
    inner.layers = nn.ModuleList([block])
    root = nn.Module()
    root.model = inner
    return root


def _push(registry: Registry, folder: Path, name: str, seed: int, tags: tuple[str, ...] = ()) -> str:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (in_f, out_f) in MODULES.items():
        tensors[lora_key(module, "A")] = torch.randn(4, in_f, generator=gen)
        tensors[lora_key(module, "B")] = torch.randn(out_f, 4, generator=gen)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    return registry.push(folder, name, tags=tags).digest


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A local registry holding adapters ``x0`` .. ``x4``."""
    registry = open_registry(tmp_path / "registry")
    for i in range(5):
        _push(registry, tmp_path / f"x{i}", f"x{i}", seed=i)
    return registry


def _manager(registry: Registry, num_slots: int = 3, host_budget: int = 1 << 30) -> AdapterManager:
    _, layers = install_lora_layers(_model(), num_slots, 8, torch.float32)
    base = BaseShape({n: (m.in_features, m.out_features) for n, m in layers.items()}, 8, "tiny")
    return AdapterManager(
        registry_factory=lambda: registry,
        base=base,
        layers=layers,
        num_slots=num_slots,
        host_budget=host_budget,
        dtype=torch.float32,
        tag_ttl_s=60.0,
        stale_grace_s=3600.0,
        workers=2,
        observer=NullObserver(),
    )


def _on_first_disk_check(monkeypatch: pytest.MonkeyPatch, action) -> list[bool]:
    """Run ``action`` on another thread (and wait for it) the first time this thread looks at the
    disk tier: the moment a listing is half built. Returns a list that holds True once it ran."""
    real = paths.adapter_cache_dir
    caller = threading.get_ident()
    ran: list[bool] = []

    def adapter_cache_dir() -> Path:
        if threading.get_ident() == caller and not ran:
            ran.append(True)
            other = threading.Thread(target=action)
            other.start()
            other.join()
        return real()

    monkeypatch.setattr(paths, "adapter_cache_dir", adapter_cache_dir)
    return ran


def test_a_listing_survives_adapters_forgotten_while_it_is_built(registry, monkeypatch) -> None:
    """Defect: ``statuses()`` looked each adapter up again after taking its list, and raised
    NotFoundError when a load worker's tracking forgot one in between (past ``max_tracked``)."""
    manager = _manager(registry)
    try:
        manager.max_tracked = 3
        for i in range(3):  # pulled to disk only: nothing holds them in the table
            name, digest, _ = manager.resolve(f"x{i}")
            manager.remember(name, digest)

        def two_loads() -> None:  # real loads: each worker's tracking forgets the oldest idle entry
            manager.request("x3").result(timeout=60)
            manager.request("x4").result(timeout=60)

        ran = _on_first_disk_check(monkeypatch, two_loads)
        listed = manager.statuses()
        assert ran and [s.name for s in listed] == ["x0", "x1", "x2"]  # the table as it was asked for
        after = manager.statuses()
        assert [s.name for s in after] == ["x2", "x3", "x4"]
        assert [s.tiers for s in after] == [(), ("host", "disk"), ("host", "disk")]
    finally:
        manager.close()


def test_a_status_is_one_snapshot_while_the_engine_changes_slots(registry, monkeypatch) -> None:
    """Defect: listings read the slot table with no lock while the engine thread changed it, so one
    status could mix two moments (here: pinned, yet not on the device)."""
    manager = _manager(registry)
    try:
        adapter = manager.request("x0").result(timeout=60)

        def engine_pins() -> None:  # what Engine.pin does on the engine side
            assert manager.activate(adapter) is not None
            manager.set_pinned(adapter.digest, True)

        ran = _on_first_disk_check(monkeypatch, engine_pins)
        status = manager.status(adapter.digest)
        assert ran
        assert (status.tiers, status.pinned) == (("host", "disk"), False)  # before the engine's change
        now = manager.status(adapter.digest)
        assert (now.tiers, now.pinned) == (("device", "host", "disk"), True)
    finally:
        manager.close()


def test_an_adapter_forgotten_in_no_tier_is_tracked_again_when_activated(registry) -> None:
    """An adapter's host copy can be evicted and its entry forgotten while a queued request still
    holds it; activating it must track it again, or the device tier holds an adapter that listings
    omit and ``status`` calls unknown."""
    manager = _manager(registry, host_budget=1)  # the host tier keeps only the newest adapter
    try:
        manager.max_tracked = 2
        first = manager.request("x0").result(timeout=60)
        manager.request("x1").result(timeout=60)  # evicts x0 from the host tier
        name, digest, _ = manager.resolve("x2")
        manager.remember(name, digest)  # x0 is in no tier: forgotten
        assert [s.name for s in manager.statuses()] == ["x1", "x2"]
        assert manager.activate(first) is not None
        assert manager.status(first.digest).tiers == ("device", "host", "disk")
        assert "x0" in [s.name for s in manager.statuses()]
        manager.acquire(first.digest)  # a request uses it: counted
        assert manager.status(first.digest).hits == 1
        manager.release(first.digest)
    finally:
        manager.close()


def test_pinning_the_last_unpinned_slot_is_refused(registry) -> None:
    manager = _manager(registry, num_slots=2)
    try:
        adapters = [manager.request(f"x{i}").result(timeout=60) for i in range(3)]
        for adapter in adapters[:2]:
            manager.activate(adapter)
        manager.set_pinned(adapters[0].digest, True)
        with pytest.raises(OverloadedError, match="1 of the 2 adapter slots are pinned and at most 1 may be"):
            manager.set_pinned(adapters[1].digest, True)
        assert not manager.status(adapters[1].digest).pinned
        assert manager.activate(adapters[2]) is not None  # the unpinned slot still serves traffic
        assert adapters[1].digest not in manager.slots and adapters[0].digest in manager.slots
    finally:
        manager.close()


def test_remembered_resolutions_are_bounded(tmp_path: Path) -> None:
    """Defect: every distinct reference string ever resolved stayed in memory."""
    registry = open_registry(tmp_path / "registry")
    tags = tuple(f"t{i}" for i in range(10))
    digest = _push(registry, tmp_path / "a", "a", seed=0, tags=tags)
    manager = _manager(registry)
    try:
        manager.max_resolved = 4
        refs = [f"a:{tag}" for tag in tags] + [f"a@{digest}", "a"]
        for ref in refs:
            assert manager.resolve(ref)[:2] == ("a", digest)
        assert manager.resolver.remembered() == refs[-4:]  # the least recently asked for went first
    finally:
        manager.close()


def test_the_disk_tier_is_the_registry_cache_folder(registry) -> None:
    manager = _manager(registry)
    try:
        adapter = manager.request("x0").result(timeout=60)
        assert registry.pull(f"x0@{adapter.digest}") == cached_adapter_dir(adapter.digest)
        assert manager.status(adapter.digest).tiers == ("host", "disk")
    finally:
        manager.close()


def test_the_manager_holds_a_cache_session_and_an_unclean_end_is_seen_by_the_next(
    registry: Registry,
) -> None:
    """While a manager is open its process holds a session on the disk cache; one that was never closed
    (the process died) makes the next manager's session unclean, so cached versions are hashed again."""
    from loraswap.registry.cache import SESSION_SUFFIX, SESSIONS, CacheSession

    sessions = paths.adapter_cache_dir() / SESSIONS
    manager = _manager(registry)
    assert not manager._cache_session.unclean
    assert [p.suffix for p in sessions.iterdir()] == [SESSION_SUFFIX]
    manager.close()
    assert list(sessions.iterdir()) == []  # a clean close leaves nothing behind
    crashed = CacheSession.open()
    os.close(crashed._fd)  # the lock goes as when a process dies; the file stays: not closed cleanly
    later = _manager(registry)
    try:
        assert later._cache_session.unclean
    finally:
        later.close()
