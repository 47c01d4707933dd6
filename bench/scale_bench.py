"""Scale out: PostgreSQL + pgvector and SQLite side by side at 1M memories over 10k users.

    python bench/scale_bench.py [--memories 1000000] [--users 10000] [--backends pg,sqlite]
                                [--pg-url URL] [--skip-proxy] [--locomo] [--write-results]
    python bench/scale_bench.py --quick          # 20k memories over 200 users, < 3 minutes

What it measures, per backend, in one run (the Markdown table at the end puts them side by side):

1. **Engine-only writes.** The store is built through the public `add_many` API in batches of
   `--batch`, dedup on (the write path the proxy uses), with real MiniLM vectors of a pool of
   distinct sentences looked up by text (store_bench.py's pool and pass-through embedder: no
   model in the loop). Memories end with their owner's `[user-NNNN]` tag, which the proxy phase's
   leak check reads. Built stores are cached under bench/.cache, keyed by
   (memories, users, pool): a rerun measures again without rebuilding and reports the cached
   build's throughput with its date and load (`--rebuild` builds afresh). The build also
   records CPU seconds of this process and of the private PostgreSQL server (its postmaster's
   processes, from /proc): on a shared machine CPU per memory says what the rate cannot.
2. **Writes including the embedding**, on a small sample (`--e2e-n` memories with the real model
   into a scratch store), and the extrapolation to the whole store (sample embedding time per
   memory + the big build's engine time per memory), labelled as such.
3. **Hybrid search** (`hybrid_search` with the query vector precomputed, so the query embedding
   is excluded) for random users, half inside one of their sessions: p50/p90/p99, and its two
   index parts (vector KNN, full-text BM25) alone. Measured after every user has searched once
   (a server in use, not one just started); the PostgreSQL server's `shared_buffers` is a
   quarter of the machine's memory (PostgreSQL's sizing advice).
4. **The proxy's added latency**: a zero-latency fake upstream (proxy_overhead.py), and on
   PostgreSQL `--replicas` `headroom serve` processes on the one database (SQLite: one process
   on its file), each request sent directly and through a replica (round-robin over their ports,
   the load generator being the "load balancer"), at each `--concurrency`. Memory on, every
   query new (no query-embedding cache hit), 10% of answers carry a `<memory>` block so writes go
   through the replicas' outboxes during the run. Errors and cross-user leaks are counted; any of
   either fails the run. The replicas work on a copy of the cached store.
5. **LoCoMo recall** (`--locomo`): bench/locomo_recall.py on each backend (`--db`), R@5/R@10.

PostgreSQL is a private pgserver (16.2, pgvector 0.6.2) whose data lives in bench/.cache (run as
`nobody` when we are root, as tests/pg.py does), with durable defaults except
`synchronous_commit=off` (what SQLite's WAL with synchronous=NORMAL gives: no flush per commit),
or `--pg-url` for your own server (a superuser: the benchmark creates databases).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import proxy_overhead as po  # noqa: E402
from store_bench import (  # noqa: E402
    CACHE,
    TimingEmbedder,
    close_embedder,
    drafts_for,
    embed_cached,
    make_memory_pool,
    make_queries,
    real_embedder,
)

from headroom.memory import HierarchicalMemory, MemoryConfig, MemoryDraft  # noqa: E402
from headroom.memory.models import Scope  # noqa: E402
from headroom.memory.recall import clean_query  # noqa: E402
from tests.pg import PgServer, _pgserver_root, _run, start_private_server  # noqa: E402

TARGET_PG_HYBRID_P50_MS = 10.0
TARGET_WRITES_PER_S = 1000.0
TARGET_LOCOMO_POINTS = 1.0
LABELS = {"pg": "PostgreSQL", "sqlite": "SQLite"}
_MARK_START = "<!-- scale_bench:start -->"
_MARK_END = "<!-- scale_bench:end -->"


def _shared_buffers() -> str:
    """A quarter of the machine's memory, PostgreSQL's own sizing advice for a dedicated server
    (at least 512 MB): at 1M memories the database is ~4.7 GB, and a server whose buffers hold
    an eighth of it reads most users' pages from the OS on every search."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return "512MB"
    return f"{max(512, total // 4 // 2**20)}MB"


# The bench server's settings: PostgreSQL's durable defaults, but no WAL flush per commit (as
# SQLite's WAL at synchronous=NORMAL), room for three replicas' pools, and buffers sized to the
# machine.
PG_SETTINGS = (f"-c synchronous_commit=off -c max_connections=200"
               f" -c shared_buffers={_shared_buffers()} -c max_wal_size=4GB")


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')} load {load_avg()}] {message}", flush=True)


# --- PostgreSQL: a private server whose data stays in the cache -------------------------------


def _pg_bin(base: Path) -> tuple[Path, str | None]:
    """Where the server's binaries are, and the user they run as (tests/pg.py's layout)."""
    if os.geteuid() == 0:
        return base / "install" / "pgserver" / "pginstall" / "bin", "nobody"
    return _pgserver_root() / "pgserver" / "pginstall" / "bin", None


def start_cached_pg(base: Path) -> PgServer:
    """Start the bench server on the data under `base`, creating it (initdb) the first time."""
    bin_dir, user = _pg_bin(base)
    data, sock, logfile = base / "data", base / "sock", base / "server.log"
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        start_private_server(base)  # initdb, pgvector in template1; started with test settings
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user=user)
    _run(
        [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", "120",
         "-o", f"-k {sock} -c listen_addresses= {PG_SETTINGS}", "start"],
        user=user, log=logfile,
    )

    def stop() -> None:
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "120", "stop"],
             user=user, log=logfile)

    return PgServer(f"postgresql://postgres@/postgres?host={quote(str(sock), safe='/')}", stop)


def server_cpu_s(data: Path | None) -> float | None:
    """CPU seconds the private server's processes (postmaster and its children) have used, or
    None when we do not run it. Read from /proc: a rate on a shared machine says little, CPU per
    memory does."""
    if data is None:
        return None
    try:
        root = int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        pid = int(stat.parent.name)
        if pid == root or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def pg_scalar(server: PgServer, sql: str, params: Sequence[Any] = ()) -> Any:
    import psycopg

    with psycopg.connect(server.url, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]


def pg_execute(server: PgServer, sql: str) -> None:
    import psycopg

    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(sql)


# --- stores ------------------------------------------------------------------------------------


@dataclass
class Stores:
    """Where each backend's cached store lives, and how to make a scratch or working copy."""

    memories: int
    users: int
    pool: int
    pg: PgServer | None = None
    pg_key: str = "local"
    pg_data: Path | None = None  # the private server's data directory (None: `--pg-url`)
    _scratch: list[Callable[[], None]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.memories}-{self.users}-{self.pool}"

    def sidecar(self, backend: str) -> Path:
        tail = f"-{self.pg_key}" if backend == "pg" else ""
        return CACHE / f"scale-{backend}{tail}-{self.key}.json"

    def pg_name(self) -> str:
        return f"scale_{self.key.replace('-', '_')}"

    def target(self, backend: str) -> str:
        if backend == "pg":
            assert self.pg is not None
            return self.pg.database_url(self.pg_name())
        return str(CACHE / f"scale-sqlite-{self.key}.db")

    def cached_build(self, backend: str) -> dict[str, Any] | None:
        """The cached store's build record, if the store is there and complete."""
        path = self.sidecar(backend)
        if not path.exists():
            return None
        if backend == "pg":
            assert self.pg is not None
            if pg_scalar(self.pg, "SELECT 1 FROM pg_database WHERE datname = %s",
                         (self.pg_name(),)) is None:
                return None
        elif not Path(self.target(backend)).exists():
            return None
        return dict(json.loads(path.read_text()))

    def building(self, backend: str) -> str:
        """A fresh target to build into (renamed to the cached name by `finish`)."""
        if backend == "pg":
            assert self.pg is not None
            name = self.pg_name() + "_building"
            pg_execute(self.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            pg_execute(self.pg, f'DROP DATABASE IF EXISTS "{self.pg_name()}" WITH (FORCE)')
            pg_execute(self.pg, f'CREATE DATABASE "{name}"')
            return self.pg.database_url(name)
        path = Path(self.target(backend) + ".building")
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return str(path)

    def finish(self, backend: str, built: str, record: dict[str, Any]) -> None:
        if backend == "pg":
            assert self.pg is not None
            pg_execute(self.pg, f'ALTER DATABASE "{self.pg_name()}_building" RENAME TO '
                                f'"{self.pg_name()}"')
        else:
            final = self.target(backend)
            for suffix in ("-wal", "-shm"):
                Path(final + suffix).unlink(missing_ok=True)
            Path(built).rename(final)
            for suffix in ("-wal", "-shm"):
                if Path(built + suffix).exists():
                    Path(built + suffix).rename(final + suffix)
        self.sidecar(backend).write_text(json.dumps(record, indent=1))

    def scratch(self, backend: str, tag: str) -> str:
        """An empty store for a sample; removed by `cleanup`."""
        if backend == "pg":
            assert self.pg is not None
            url = self.pg.create_database(f"scratch_{tag}")
            self._scratch.append(lambda: self.pg.drop_database(url))  # type: ignore[union-attr]
            return url
        folder = Path(tempfile.mkdtemp(prefix=f"headroom-scale-{tag}-"))
        self._scratch.append(lambda: shutil.rmtree(folder, ignore_errors=True))
        return str(folder / "memory.db")

    def working_copy(self, backend: str) -> str:
        """A copy of the cached store the proxy may write to (its outbox applies `<memory>`
        blocks), so the cache stays what its key says."""
        if backend == "pg":
            assert self.pg is not None
            name = f"{self.pg_name()}_work"
            pg_execute(self.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            pg_execute(self.pg, f'CREATE DATABASE "{name}" TEMPLATE "{self.pg_name()}"')
            self._scratch.append(
                lambda: pg_execute(self.pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
            )
            return self.pg.database_url(name)
        folder = Path(tempfile.mkdtemp(prefix="headroom-scale-proxy-", dir=CACHE))
        self._scratch.append(lambda: shutil.rmtree(folder, ignore_errors=True))
        source = self.target(backend)
        for suffix in ("", "-wal"):
            if Path(source + suffix).exists():
                shutil.copy(source + suffix, str(folder / "memory.db") + suffix)
        return str(folder / "memory.db")

    def size_bytes(self, backend: str, target: str) -> int:
        if backend == "pg":
            assert self.pg is not None
            name = urlsplit(target).path.lstrip("/")
            return int(pg_scalar(self.pg, "SELECT pg_database_size(%s)", (name,)))
        return sum(Path(target + s).stat().st_size for s in ("", "-wal")
                   if Path(target + s).exists())

    def cleanup(self) -> None:
        while self._scratch:
            try:
                self._scratch.pop()()
            except Exception as exc:  # a leftover scratch store must not hide the results
                log(f"cleanup failed: {exc}")


# --- data ------------------------------------------------------------------------------------


@dataclass
class Data:
    """The pool's real vectors, the query texts and theirs, and the model they came from."""

    model_id: str
    pool: list[tuple[str, str]]
    vectors: dict[str, np.ndarray]
    queries: list[str]

    def lookup(self) -> po.TaggedPoolEmbedder:
        return po.TaggedPoolEmbedder(self.model_id, self.vectors)


def load_data(pool_size: int, n_queries: int) -> Data:
    pool = make_memory_pool(pool_size)
    queries = make_queries(n_queries, seed=3)
    embedder = real_embedder("default", 1, cached=False)
    try:
        pool_vecs = embed_cached(embedder, [t for _, t in pool], "pool", 128)
        query_vecs = embed_cached(embedder, queries, "queries", 128)
        model_id = embedder.model_id
    finally:
        close_embedder(embedder)
    vectors = {t: v for (_, t), v in zip(pool, pool_vecs, strict=True)}
    vectors.update(zip(queries, query_vecs, strict=True))
    return Data(model_id, pool, vectors, queries)


def tagged_drafts(size: int, users: int, pool: list[tuple[str, str]], seed: int
                  ) -> list[MemoryDraft]:
    """store_bench's drafts (users interleaved, ~30% in a session), each ending with its
    owner's tag, which the proxy's leak check reads back."""
    drafts = drafts_for(size, users, pool, seed=seed)
    for d in drafts:
        d.content = f"{d.content} [{d.user_id}]"
    return drafts


# --- 1. engine-only writes: the build ---------------------------------------------------------


async def add_batches(mem: HierarchicalMemory, drafts: list[MemoryDraft], batch: int,
                      label: str) -> float:
    """`add_many` over `drafts` in batches; returns the seconds, printing progress."""
    t0 = time.perf_counter()
    step = max(batch, len(drafts) // 20 // batch * batch)
    for i in range(0, len(drafts), batch):
        await mem.add_many(drafts[i : i + batch])
        done = i + batch
        if done % step == 0 and done < len(drafts):
            elapsed = time.perf_counter() - t0
            log(f"{label}: {done:,}/{len(drafts):,} ({done / elapsed:.0f}/s)")
    return time.perf_counter() - t0


async def build(backend: str, stores: Stores, data: Data, batch: int) -> dict[str, Any]:
    target = stores.building(backend)
    drafts = tagged_drafts(stores.memories, stores.users, data.pool, seed=stores.memories)
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=target), embedder=data.lookup())
    try:
        before = load_avg()
        server0 = server_cpu_s(stores.pg_data) if backend == "pg" else None
        c0 = time.process_time()
        seconds = await add_batches(mem, drafts, batch, f"build {LABELS[backend]}")
        cpu = time.process_time() - c0
        server1 = server_cpu_s(stores.pg_data) if backend == "pg" else None
        after = load_avg()
        t_opt = time.perf_counter()
        await mem.optimize()
        optimize_s = time.perf_counter() - t_opt
        stats = await mem.stats()
    finally:
        await mem.close()
    record = {
        "memories": stores.memories, "users": stores.users, "batch": batch,
        "seconds": seconds, "per_s": stores.memories / seconds, "client_cpu_s": cpu,
        "server_cpu_s": None if server0 is None or server1 is None else server1 - server0,
        "optimize_s": optimize_s, "load": f"{before} → {after}", "date": now_utc(),
        "current": stats["current"], "vectors": stats["vectors"],
    }
    stores.finish(backend, target, record)
    log(f"built {LABELS[backend]}: {record['per_s']:.0f}/s ({seconds:.0f} s), "
        f"{stats['current']:,} current")
    return record


# --- 2. writes including the embedding, on a sample --------------------------------------------


async def writes_with_model(backend: str, stores: Stores, data: Data, model: Any, n: int,
                            batch: int) -> dict[str, Any]:
    """`n` memories with the real model (no cache) into a scratch store whose users already
    have a memory each (a user's first memory is not the steady state)."""
    users = max(1, min(stores.users, n // 10))
    drafts = tagged_drafts(n + users, users, data.pool, seed=17)
    seen: set[str] = set()
    seeds, measured = [], []
    for d in drafts:
        (measured if d.user_id in seen else seeds).append(d)
        seen.add(d.user_id)
    timing = TimingEmbedder(model)
    mem = await HierarchicalMemory.create(
        MemoryConfig(db_path=stores.scratch(backend, "e2e")), embedder=timing
    )
    try:
        await mem.warm_up()
        mem.embedder = data.lookup()
        await add_batches(mem, seeds, batch, "seed")
        mem.embedder = timing
        timing.seconds = 0.0
        before = load_avg()
        seconds = await add_batches(mem, measured, batch, f"e2e {LABELS[backend]}")
    finally:
        await mem.close()
    m = len(measured)
    return {
        "n": m, "batch": batch, "seconds": seconds, "per_s": m / seconds,
        "embed_s": timing.seconds, "embed_ms_per": 1000 * timing.seconds / m,
        "load": f"{before} → {load_avg()}",
    }


# --- 3. hybrid search --------------------------------------------------------------------------


def timed(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pct(values, 50), "p90": pct(values, 90),
            "p99": pct(values, 99), "mean": float(np.mean(values))}


async def search(target: str, data: Data, users: int, n: int, seed: int) -> dict[str, Any]:
    mem = await HierarchicalMemory.create(MemoryConfig(db_path=target), embedder=data.lookup())
    rng = random.Random(seed)
    plan = [(rng.choice(data.queries), f"user-{rng.randrange(users):04d}",
             f"s{rng.randrange(3)}" if rng.random() < 0.5 else None) for _ in range(n)]
    # Warm-up: every user searches once, in random order, as on a server in use (page and
    # buffer caches, per-user caches, statement caches, reader threads); then the measured
    # queries go to random users again, most of them not the last ones warmed.
    order = [f"user-{u:04d}" for u in range(users)]
    rng.shuffle(order)
    started = time.perf_counter()
    try:
        for i, user in enumerate(order):
            q = data.queries[i % len(data.queries)]
            await mem.hybrid_search(q, user, None, top_k=10, query_vector=data.vectors[q])
        warm_s = time.perf_counter() - started
        before = load_avg()
        hybrid: list[float] = []
        results = 0
        for q, user, session in plan:
            t0 = time.perf_counter()
            got = await mem.hybrid_search(q, user, session, top_k=10,
                                          query_vector=data.vectors[q])
            hybrid.append((time.perf_counter() - t0) * 1000)
            results += len(got)
            foreign = [r for r in got if r.memory.user_id != user]
            if foreign:
                raise SystemExit(f"hybrid_search for {user} returned another user's memory")
        preset = mem.preset
        vec_ms, txt_ms = [], []
        k_vec, k_txt = max(preset.vector_depth, 10), max(preset.text_depth, 10)
        for q, user, session in plan:
            keys = Scope(user, session).visible_keys()
            t0 = time.perf_counter()
            mem.vectors.search(data.vectors[q], user, scope_keys=keys, categories=None, k=k_vec)
            t1 = time.perf_counter()
            mem.text.search(clean_query(q, preset), user, scope_keys=keys, categories=None,
                            k=k_txt)
            t2 = time.perf_counter()
            vec_ms.append((t1 - t0) * 1000)
            txt_ms.append((t2 - t1) * 1000)
    finally:
        await mem.close()
    return {"hybrid": timed(hybrid), "vectors": timed(vec_ms), "text": timed(txt_ms),
            "warm_users": users, "warm_s": warm_s,
            "k_vec": k_vec, "k_txt": k_txt, "results_mean": results / n,
            "load": f"{before} → {load_avg()}"}


# --- 4. the proxy with replicas ---------------------------------------------------------------


def start_replica(target: str, upstream: str, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`headroom serve` on `target`, its output to a file (a pipe nobody reads would block)."""
    port = po.free_port()
    cmd = [sys.executable, "-m", "headroom", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--db", target, "--upstream", upstream, "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    out = (logs / f"replica-{port}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def merge(runs: Sequence[po.Run]) -> po.Run:
    out = po.Run()
    for r in runs:
        out.latencies.update(r.latencies)  # keyed by job number, unique across shares
        out.ttft.update(r.ttft)
        out.receipts += r.receipts
        out.errors += r.errors
        out.blocks += r.blocks
        out.leaks += r.leaks
        out.recalled += r.recalled
        out.cpu_s += r.cpu_s
    return out


async def round_robin(upstream: str, replicas: list[po.Target], jobs: list[po.Job],
                      concurrency: int) -> tuple[po.Run, po.Run]:
    """Job n goes to replica n mod len(replicas); the concurrency is split between them, each
    share driven by proxy_overhead's load generator (every job sent directly and through its
    replica, back to back, so each proxied latency has its direct twin)."""
    k = len(replicas)
    shares = [[j for j in jobs if j.n % k == i] for i in range(k)]
    workers = [max(1, concurrency // k + (1 if i < concurrency % k else 0)) for i in range(k)]
    results = await asyncio.gather(*(
        po.load(upstream, [replicas[i]], po.FORMATS["chat"], shares[i], concurrency=workers[i],
                stream=False)
        for i in range(k) if shares[i]
    ))
    return (merge([direct for direct, _ in results]),
            merge([run for _, runs in results for run in runs.values()]))


def proxy_phase(backend: str, target: str, users: int, replicas: int, levels: list[int],
                requests: int, upstream: str) -> list[dict[str, Any]]:
    logs = Path(tempfile.mkdtemp(prefix="headroom-scale-logs-"))
    procs = [start_replica(target, upstream, logs) for _ in range(replicas)]
    targets = [po.Target(f"replica-{i}", url, proc) for i, (proc, url) in enumerate(procs)]
    rows: list[dict[str, Any]] = []
    try:
        for t in targets:
            try:
                po.wait_for(t.url + "/readyz", 600)
            except RuntimeError:
                tails = "\n".join(p.read_text(errors="replace")[-2000:]
                                  for p in logs.glob("*.log"))
                raise RuntimeError(f"a replica did not get ready:\n{tails}") from None
        queries = make_queries(1200, seed=5)
        user_ids: list[str | None] = [f"user-{u:04d}" for u in range(users)]
        for c in levels:
            n = max(requests, 4 * c)
            seed = po.cell_seed("scale", backend, c)
            common = dict(users=user_ids, queries=queries, write_share=0.1, fresh=True)
            warm = po.make_jobs(max(2 * c, 30), seed=seed + 1, **common)  # type: ignore[arg-type]
            asyncio.run(round_robin(upstream, targets, warm, c))
            before = load_avg()
            jobs = po.make_jobs(n, seed=seed, **common)  # type: ignore[arg-type]
            direct, proxied = asyncio.run(round_robin(upstream, targets, jobs, c))
            row = po.cell_row(direct, proxied, stream=False, concurrency=c, backend=backend,
                              replicas=replicas)
            row |= {"load": f"{before} → {load_avg()}", "direct_errors": direct.errors,
                    "proxy_errors": proxied.errors}
            rows.append(row)
            log(f"proxy {LABELS[backend]} x{replicas} c={c}: added p50 {row['added_p50']:.1f} "
                f"p99 {row['added_p99']:.1f} ms, errors {row['errors'] + row['blocks']}, "
                f"leaks {row['leaks']}, recalled {row['recalled']}/{row['n']}")
    finally:
        for proc, _ in procs:
            po.stop(proc)
        if any(r["errors"] or r["blocks"] for r in rows):  # kept for whoever reads the table
            kept = CACHE / f"scale-proxy-logs-{backend}"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(logs, kept)
            log(f"replica logs kept in {kept}")
        shutil.rmtree(logs, ignore_errors=True)
    return rows


# --- 5. LoCoMo -------------------------------------------------------------------------------


def locomo(backend: str, stores: Stores) -> dict[str, Any]:
    target = stores.scratch(backend, "locomo")
    out = Path(tempfile.mkdtemp(prefix="headroom-scale-locomo-")) / "locomo.json"
    cmd = [sys.executable, str(HERE / "locomo_recall.py"), "--db", target, "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    before = load_avg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"locomo_recall.py failed on {backend}:\n{proc.stderr[-3000:]}")
    report = json.loads(out.read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    preset = next(iter(report["presets"].values()))
    overall = preset["summary"]["overall"]
    return {"R@5": overall["R@5"], "R@10": overall["R@10"], "n": overall["n"],
            "hybrid_p50": preset["latency"].get("hybrid_p50_ms"),
            "seconds": time.perf_counter() - t0, "load": f"{before} → {load_avg()}"}


# --- report ------------------------------------------------------------------------------------


def _cell(report: dict[str, Any], backend: str, fn: Callable[[dict[str, Any]], str]) -> str:
    part = report["backends"].get(backend)
    if part is None:
        return "-"
    try:
        return fn(part)
    except (KeyError, TypeError, IndexError):
        return "-"


def _proxy(part: dict[str, Any], c: int) -> str:
    row = next(r for r in part["proxy"] if r["concurrency"] == c)
    return (f"{row['added_p50']:.1f} / {row['added_p99']:.1f} ms (×{row['replicas']}; direct "
            f"p50 {row['direct_p50']:.1f}; {row['req_per_s']:.0f} req/s; load {row['load']})")


def _write_cpu(part: dict[str, Any]) -> str:
    """The build's CPU per memory: what the rate would be on an idle machine is about its
    inverse (client and server mostly take turns), whatever else ran meanwhile."""
    b = part["build"]
    client = 1000 * b["client_cpu_s"] / b["memories"]
    server = b.get("server_cpu_s")
    if server is None:
        return f"{client:.2f} ms (in-process)"
    server_ms = 1000 * server / b["memories"]
    return (f"{client:.2f} + {server_ms:.2f} = {client + server_ms:.2f} ms "
            f"(~{1000 / (client + server_ms):,.0f}/s if they took turns on an idle machine)")


def _extrapolated(part: dict[str, Any]) -> str:
    e2e, b = part["e2e"], part["build"]
    per = e2e["embed_ms_per"] / 1000 + 1 / b["per_s"]
    return (f"~{1 / per:.0f}/s → {b['memories'] * per / 3600:.1f} h for {b['memories']:,} "
            f"(extrapolated: sample's embedding {e2e['embed_ms_per']:.2f} ms/memory + this "
            "build's engine time)")


def markdown(report: dict[str, Any]) -> str:
    backends = [b for b in ("pg", "sqlite") if b in report["backends"]]
    m = report
    lines = [
        _MARK_START,
        "## Scale out: PostgreSQL and SQLite side by side",
        "",
        f"Run {m['date']} on {m['machine']}. Load average (1/5/15 min) {m['load_start']} at the "
        f"start, {m['load_end']} at the end ({m['minutes']:.0f} min). Command: "
        f"`{m['command']}`.",
        "",
        f"{m['memories']:,} memories over {m['users']:,} users (~{m['memories'] // m['users']} "
        f"each), pool of {m['pool']:,} sentences with real MiniLM vectors. PostgreSQL: "
        f"{m.get('pg_server', 'not in this run')}. Each cell names the load average while it "
        "was measured.",
        "",
        "| | " + " | ".join(LABELS[b] for b in backends) + " | target |",
        "|---|" + "---|" * len(backends) + "---|",
    ]

    def row(name: str, fn: Callable[[dict[str, Any]], str], target: str = "") -> None:
        lines.append(f"| {name} | " + " | ".join(_cell(report, b, fn) for b in backends)
                     + f" | {target} |")

    row("store size", lambda p: f"{p['size_bytes'] / 1e9:.2f} GB, {p['build']['current']:,} "
        "current")
    row("engine-only writes (batched `add_many`, precomputed vectors, dedup on)",
        lambda p: f"**{p['build']['per_s']:.0f}/s** ({p['build']['seconds']:.0f} s, batch "
        f"{p['build']['batch']}; built {p['build']['date']}, load {p['build']['load']})",
        f"≥ {TARGET_WRITES_PER_S:,.0f}/s (PostgreSQL)")
    row("engine-only writes: CPU per memory (client process + database server)", _write_cpu)
    row("writes incl. the embedding, measured on a sample",
        lambda p: f"{p['e2e']['per_s']:.0f}/s ({p['e2e']['n']:,} memories into a scratch store; "
        f"embedding {p['e2e']['embed_s']:.1f} of {p['e2e']['seconds']:.1f} s; load "
        f"{p['e2e']['load']})")
    row("writes incl. the embedding at full size (**extrapolated**)", _extrapolated)
    row("hybrid search p50 / p90 / p99, excl. query embedding",
        lambda p: f"**{p['search']['hybrid']['p50']:.2f}** / {p['search']['hybrid']['p90']:.2f}"
        f" / {p['search']['hybrid']['p99']:.2f} ms ({p['search']['hybrid']['n']} queries "
        f"after each of the {p['search'].get('warm_users', 0):,} users searched once in "
        f"{p['search'].get('warm_s', 0):.0f} s; load {p['search']['load']})",
        f"p50 ≤ {TARGET_PG_HYBRID_P50_MS:g} ms (PostgreSQL)")
    row("part: vector KNN p50 / p99",
        lambda p: f"{p['search']['vectors']['p50']:.2f} / {p['search']['vectors']['p99']:.2f} ms"
        f" (k={p['search']['k_vec']})")
    row("part: full-text BM25 p50 / p99",
        lambda p: f"{p['search']['text']['p50']:.2f} / {p['search']['text']['p99']:.2f} ms "
        f"(k={p['search']['k_txt']})")
    for c in m["concurrency"]:
        row(f"proxy added latency p50 / p99, concurrency {c}", lambda p, c=c: _proxy(p, c))
    row("proxy errors / cross-user leaks",
        lambda p: f"{sum(r['proxy_errors'] + r['blocks'] for r in p['proxy'])} / "
        f"{sum(r['leaks'] for r in p['proxy'])} (of {sum(r['n'] for r in p['proxy']):,} "
        f"proxied; direct-side errors {sum(r['direct_errors'] for r in p['proxy'])}; "
        f"recalled own memories in {sum(r['recalled'] for r in p['proxy']):,})",
        "0 / 0")
    row("LoCoMo R@5 / R@10 (turns, all questions)",
        lambda p: f"{p['locomo']['R@5']:.1f} / {p['locomo']['R@10']:.1f} "
        f"(load {p['locomo']['load']})",
        f"PostgreSQL within {TARGET_LOCOMO_POINTS:g} point of SQLite")
    lines += ["", *verdicts(report), "", _MARK_END]
    return "\n".join(lines)


def verdicts(report: dict[str, Any]) -> list[str]:
    pg = report["backends"].get("pg")
    sq = report["backends"].get("sqlite")
    out: list[str] = []
    if pg and "search" in pg:
        p50 = pg["search"]["hybrid"]["p50"]
        out.append(f"- PostgreSQL hybrid p50 ≤ {TARGET_PG_HYBRID_P50_MS:g} ms at "
                   f"{report['memories']:,}: {p50:.2f} ms, "
                   f"**{'met' if p50 <= TARGET_PG_HYBRID_P50_MS else 'not met'}**.")
    if pg and "build" in pg:
        rate = pg["build"]["per_s"]
        out.append(f"- PostgreSQL engine-only writes ≥ {TARGET_WRITES_PER_S:,.0f}/s: {rate:.0f}/s,"
                   f" **{'met' if rate >= TARGET_WRITES_PER_S else 'not met'}**.")
    proxied = [r for p in report["backends"].values() for r in p.get("proxy", [])]
    if proxied:
        bad = sum(r["errors"] + r["blocks"] + r["leaks"] for r in proxied)
        out.append(f"- Proxy: 0 errors and 0 cross-user leaks: {bad} over "
                   f"{sum(r['n'] for r in proxied):,} proxied requests, "
                   f"**{'met' if bad == 0 else 'not met'}**.")
    if pg and sq and "locomo" in pg and "locomo" in sq:
        gap = max(abs(pg["locomo"][k] - sq["locomo"][k]) for k in ("R@5", "R@10"))
        out.append(f"- LoCoMo on PostgreSQL within {TARGET_LOCOMO_POINTS:g} point of SQLite: "
                   f"largest gap {gap:.1f}, "
                   f"**{'met' if gap <= TARGET_LOCOMO_POINTS else 'not met'}**.")
    return out


# --- main --------------------------------------------------------------------------------------


async def engine_phases(backend: str, stores: Stores, data: Data, model: Any,
                        args: argparse.Namespace) -> dict[str, Any]:
    part: dict[str, Any] = {}
    record = None if args.rebuild else stores.cached_build(backend)
    if record is None:
        log(f"building {LABELS[backend]}: {stores.memories:,} memories over {stores.users:,} "
            "users")
        record = await build(backend, stores, data, args.batch)
    else:
        log(f"{LABELS[backend]}: cached store built {record['date']} ({record['per_s']:.0f}/s)")
    part["build"] = record
    target = stores.target(backend)
    part["size_bytes"] = stores.size_bytes(backend, target)
    if args.e2e_n:
        part["e2e"] = await writes_with_model(backend, stores, data, model, args.e2e_n, 64)
        log(f"e2e {LABELS[backend]}: {part['e2e']['per_s']:.0f}/s with the model")
    part["search"] = await search(target, data, stores.users, args.queries, seed=99)
    hy = part["search"]["hybrid"]
    log(f"search {LABELS[backend]}: hybrid p50 {hy['p50']:.2f} p99 {hy['p99']:.2f} ms")
    return part


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in LABELS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; choose from pg, sqlite")
    if args.users > 10_000:
        raise SystemExit("--users at most 10000 (the leak check reads 4-digit user tags)")
    levels = [int(x) for x in args.concurrency.split(",") if x]
    CACHE.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": now_utc(), "machine": po.machine_line(), "load_start": load_avg(),
        "command": "python bench/scale_bench.py " + " ".join(sys.argv[1:]),
        "memories": args.memories, "users": args.users, "pool": args.pool,
        "concurrency": levels, "backends": {},
    }
    log(f"scale bench: {args.memories:,} memories over {args.users:,} users on {backends}")
    data = load_data(args.pool, args.queries + 200)
    stores = Stores(args.memories, args.users, args.pool)
    server: PgServer | None = None
    if "pg" in backends:
        if args.pg_url:
            stores.pg = PgServer(args.pg_url, stop=lambda: None)
            stores.pg_key = hashlib.sha1(args.pg_url.encode()).hexdigest()[:8]
            report["pg_server"] = "your server (`--pg-url`)"
        else:
            server = stores.pg = start_cached_pg(CACHE / "pg-scale")
            stores.pg_data = CACHE / "pg-scale" / "data"
            report["pg_server"] = (f"pgserver's PostgreSQL 16.2 + pgvector 0.6.2 on a Unix "
                                   f"socket, `{PG_SETTINGS}`")
    model = real_embedder("default", 1, cached=False) if args.e2e_n else None
    upstream_proc = None
    try:
        for backend in backends:
            report["backends"][backend] = asyncio.run(
                engine_phases(backend, stores, data, model, args)
            )
        if model is not None:
            close_embedder(model)
            model = None
        if not args.skip_proxy:
            upstream_proc, upstream = po.start_upstream()
            for backend in backends:
                replicas = args.replicas if backend == "pg" else args.sqlite_replicas
                target = stores.working_copy(backend)
                report["backends"][backend]["proxy"] = proxy_phase(
                    backend, target, args.users, replicas, levels, args.requests, upstream
                )
                stores.cleanup()
        if args.locomo:
            for backend in backends:
                report["backends"][backend]["locomo"] = locomo(backend, stores)
                log(f"locomo {LABELS[backend]}: {report['backends'][backend]['locomo']}")
                stores.cleanup()
    finally:
        if upstream_proc is not None:
            po.stop(upstream_proc)
        if model is not None:
            close_embedder(model)
        stores.cleanup()
        if server is not None:
            server.stop()
    report["load_end"] = load_avg()
    report["minutes"] = (time.monotonic() - started) / 60
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true",
                        help="20k memories over 200 users, fewer queries and requests")
    parser.add_argument("--backends", default="pg,sqlite")
    parser.add_argument("--pg-url", help="your own server (a superuser URL) instead of pgserver")
    parser.add_argument("--skip-proxy", action="store_true")
    parser.add_argument("--locomo", action="store_true",
                        help="also LoCoMo recall on each backend (~2 min each)")
    parser.add_argument("--rebuild", action="store_true", help="ignore cached stores")
    parser.add_argument("--pool", type=int, default=6000, help="distinct sentences to embed")
    parser.add_argument("--batch", type=int, default=500, help="add_many batch for the build")
    parser.add_argument("--e2e-n", type=int, default=2000,
                        help="memories written with the real model (0: skip)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=3, help="headroom serve on PostgreSQL")
    parser.add_argument("--sqlite-replicas", type=int, default=1,
                        help="headroom serve processes on the SQLite file")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--requests", type=int, default=400, help="proxied requests per level")
    parser.add_argument("--write-results", action="store_true",
                        help="replace the Scale out section of bench/RESULTS.md")
    parser.add_argument("--json", default=str(CACHE / "scale_bench.json"))
    args = parser.parse_args()
    if args.quick:
        given = set(sys.argv)
        for flag, value in (("--memories", 20_000), ("--users", 200), ("--pool", 2000),
                            ("--e2e-n", 300), ("--queries", 300), ("--requests", 128)):
            if flag not in given:
                setattr(args, flag.lstrip("-").replace("-", "_"), value)
    report = run(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    section = markdown(report)
    print("\n" + section)
    if args.write_results:
        po.write_results(section, _MARK_START, _MARK_END)
    failed = [r for p in report["backends"].values() for r in p.get("proxy", [])
              if r["errors"] or r["blocks"] or r["leaks"]]
    if failed:
        raise SystemExit(f"{len(failed)} proxy cell(s) had errors or cross-user leaks")


if __name__ == "__main__":
    main()
