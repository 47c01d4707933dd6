"""The overhead receipt (`X-Headroom-Memory-Overhead-Ms`) covers all the proxy adds to a request:
each part of the proxy's own work is made measurably slow, and the receipt must hold at least
the sum of the parts' measured times, while the upstream's own time stays out of it. On every
wire format, whole and streamed."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from headroom.proxy import pipeline
from tests.fakes import FakeEmbedder
from tests.servers import Proxy, Reply, running_proxy

PART_S = 0.01  # each slowed part sleeps this long on top of its own work

BODIES: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "/v1/chat/completions": lambda q, stream: {
        "model": "m", "stream": stream, "messages": [{"role": "user", "content": q}]},
    "/v1/responses": lambda q, stream: {"model": "m", "stream": stream, "input": q},
    "/v1/messages": lambda q, stream: {
        "model": "m", "stream": stream, "max_tokens": 64,
        "messages": [{"role": "user", "content": q}]},
}


@pytest.fixture(scope="module")
def receipt_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    db: Path = tmp_path_factory.mktemp("receipt") / "proxy.db"
    with running_proxy(db, FakeEmbedder()) as proxy:
        yield proxy


class Parts:
    """The measured time of every slowed call, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def sync(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def slowed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                time.sleep(PART_S)
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)
        return slowed

    def coroutine(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def slowed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                time.sleep(PART_S)  # blocking on purpose: the proxy's own time, not a wait
                return await fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)
        return slowed

    @property
    def total_ms(self) -> float:
        return sum(self.seconds.values()) * 1000


@pytest.fixture
def parts(receipt_proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> Parts:
    receipt_proxy.settle()
    receipt_proxy.upstream.reset()
    out = Parts()
    for name in ("parse_json_body", "scope_from_request", "dumps", "loads"):
        monkeypatch.setattr(pipeline, name, out.sync(name, getattr(pipeline, name)))
    service = receipt_proxy.service
    monkeypatch.setattr(service, "recall", out.coroutine("recall", service.recall))
    return out


def _ask(proxy: Proxy, path: str, *, stream: bool) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    with httpx.Client(timeout=30) as client:
        response = client.post(proxy.url + path, json=BODIES[path]("what do I like?", stream),
                               headers={"x-headroom-user-id": "receipt-user"})
    return response, (time.perf_counter() - started) * 1000


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("path", list(BODIES))
def test_the_receipt_holds_every_part_of_the_proxys_work(
    receipt_proxy: Proxy, parts: Parts, path: str, stream: bool
) -> None:
    response, wall_ms = _ask(receipt_proxy, path, stream=stream)
    assert response.status_code == 200
    receipt = float(response.headers["x-headroom-memory-overhead-ms"])
    expected = {"parse_json_body", "scope_from_request", "recall", "dumps"}
    if not stream:
        expected.add("loads")  # the whole answer is parsed, stripped and serialised again
    assert expected <= set(parts.seconds)
    # The header rounds to 0.1 ms.
    assert receipt + 0.05 >= parts.total_ms, (receipt, parts.seconds)
    assert receipt <= wall_ms


def test_the_upstreams_own_time_is_not_in_the_receipt(receipt_proxy: Proxy, parts: Parts) -> None:
    receipt_proxy.upstream.queue(Reply("slow answer", delay_s=0.6))
    response, wall_ms = _ask(receipt_proxy, "/v1/chat/completions", stream=False)
    receipt = float(response.headers["x-headroom-memory-overhead-ms"])
    assert wall_ms >= 600
    assert parts.total_ms - 0.05 <= receipt < 600
