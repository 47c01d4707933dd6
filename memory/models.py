"""The engine's data model: memories, scopes, filters, configuration and write ops. No I/O here."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import ConfigError, ValidationError
from .text import clean_text

__all__ = [
    "AddOp",
    "EmbedderBackend",
    "ForgetOp",
    "Memory",
    "MemoryCategory",
    "MemoryConfig",
    "MemoryDraft",
    "MemoryFilter",
    "MemoryOps",
    "Scope",
    "ScopeLevel",
    "SearchResult",
    "UpdateOp",
    "VectorFilter",
    "is_database_url",
    "new_id",
    "utcnow",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def as_utc(value: datetime) -> datetime:
    """Naive datetimes are taken as UTC so comparisons never mix aware and naive values."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class MemoryCategory(enum.StrEnum):
    PREFERENCE = "preference"
    FACT = "fact"
    CONTEXT = "context"
    ENTITY = "entity"
    DECISION = "decision"
    INSIGHT = "insight"

    @classmethod
    def parse(cls, value: MemoryCategory | str) -> MemoryCategory:
        if isinstance(value, MemoryCategory):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(c.value for c in cls)
            raise ValidationError(f"unknown category {value!r}; expected one of: {names}") from None


class ScopeLevel(enum.StrEnum):
    """Broadest first: USER memories are visible to every request of the user."""

    USER = "user"
    SESSION = "session"
    AGENT = "agent"
    TURN = "turn"

    @classmethod
    def parse(cls, value: ScopeLevel | str) -> ScopeLevel:
        if isinstance(value, ScopeLevel):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValidationError(
                f"unknown scope {value!r}; expected user, session, agent or turn"
            ) from None


class EmbedderBackend(enum.StrEnum):
    LOCAL = "local"
    OPENAI = "openai"
    OLLAMA = "ollama"


@dataclass(frozen=True)
class Scope:
    """Where a request (or a memory) stands. A memory is visible from a scope when each of its
    session/agent/turn ids is either unset or equal to the scope's: a request sees its own level
    and everything broader, never a sibling session, agent or turn, and never another user."""

    user_id: str
    session_id: str | None = None
    agent_id: str | None = None
    turn_id: str | None = None

    def __post_init__(self) -> None:
        if not self.user_id or not str(self.user_id).strip():
            raise ValidationError("user_id is required")

    @property
    def level(self) -> ScopeLevel:
        if self.turn_id:
            return ScopeLevel.TURN
        if self.agent_id:
            return ScopeLevel.AGENT
        if self.session_id:
            return ScopeLevel.SESSION
        return ScopeLevel.USER

    @property
    def key(self) -> str:
        """One string naming the narrow part of the scope, indexed next to each vector."""
        return scope_key(self.session_id, self.agent_id, self.turn_id)

    def visible_keys(self) -> list[str]:
        """Every scope key a memory visible from here can have (at most 8)."""
        keys = set()
        for s in {None, self.session_id}:
            for a in {None, self.agent_id}:
                for t in {None, self.turn_id}:
                    keys.add(scope_key(s, a, t))
        return sorted(keys)

    def clamp(self, level: ScopeLevel) -> Scope:
        """The scope at `level` built from this request's ids; a level the request cannot reach
        (e.g. SESSION without a session id) falls back to the nearest broader one."""
        if level is ScopeLevel.USER:
            return Scope(self.user_id)
        if level is ScopeLevel.SESSION:
            return Scope(self.user_id, self.session_id)
        if level is ScopeLevel.AGENT:
            return Scope(self.user_id, self.session_id, self.agent_id)
        return self


def scope_key(session_id: str | None, agent_id: str | None, turn_id: str | None) -> str:
    return "\x1f".join(part or "" for part in (session_id, agent_id, turn_id))


@dataclass
class Memory:
    content: str
    user_id: str
    id: str = field(default_factory=new_id)
    session_id: str | None = None
    agent_id: str | None = None
    turn_id: str | None = None
    category: MemoryCategory = MemoryCategory.FACT
    importance: float = 0.5
    entity_refs: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utcnow)
    valid_from: datetime = field(default_factory=utcnow)
    valid_until: datetime | None = None
    supersedes: str | None = None
    superseded_by: str | None = None
    forgotten_at: datetime | None = None
    access_count: int = 0
    last_accessed: datetime | None = None
    embedding_model: str | None = None
    embedding: list[float] | None = field(default=None, repr=False, compare=False)

    @property
    def scope(self) -> Scope:
        return Scope(self.user_id, self.session_id, self.agent_id, self.turn_id)

    @property
    def scope_level(self) -> ScopeLevel:
        return self.scope.level

    @property
    def is_current(self) -> bool:
        return self.valid_until is None

    def valid_at(self, when: datetime) -> bool:
        when = as_utc(when)
        return self.valid_from <= when and (self.valid_until is None or when < self.valid_until)

    def to_dict(self, *, with_embedding: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "embedding" and not with_embedding:
                continue
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, enum.Enum):
                value = value.value
            out[f.name] = value
        out["scope"] = self.scope_level.value
        out["is_current"] = self.is_current
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Memory:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("created_at", "valid_from", "valid_until", "forgotten_at", "last_accessed"):
            if kwargs.get(key):
                kwargs[key] = as_utc(datetime.fromisoformat(kwargs[key]))
        if "category" in kwargs:
            kwargs["category"] = MemoryCategory.parse(kwargs["category"])
        return cls(**kwargs)


@dataclass(frozen=True)
class SearchResult:
    memory: Memory
    similarity: float
    score: float = 0.0
    bm25: float | None = None


@dataclass
class MemoryFilter:
    """Which memories a read returns.

    Scope: with `all_scopes=False` (the default) the ids name a request's position and the read
    returns what that request may see (its level and every broader one; see `Scope`). With
    `all_scopes=True` the ids are plain equality filters and unset ones match anything, which is
    the administrator's view ("everything this user has").
    """

    user_id: str | None = None
    session_id: str | None = None
    agent_id: str | None = None
    turn_id: str | None = None
    all_scopes: bool = False
    categories: list[MemoryCategory] | None = None
    min_importance: float | None = None
    include_superseded: bool = False
    as_of: datetime | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    limit: int | None = 100
    offset: int = 0

    def __post_init__(self) -> None:
        if not self.user_id:
            raise ValidationError("MemoryFilter needs a user_id: memories are isolated by user")
        if self.categories is not None:
            self.categories = [MemoryCategory.parse(c) for c in self.categories]
        if self.min_importance is not None and not 0.0 <= self.min_importance <= 1.0:
            raise ValidationError("min_importance must be between 0 and 1")
        if self.limit is not None and self.limit < 0:
            raise ValidationError("limit must not be negative")
        if self.offset < 0:
            raise ValidationError("offset must not be negative")
        for name in ("as_of", "created_after", "created_before"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, as_utc(value))

    @property
    def scope(self) -> Scope:
        assert self.user_id is not None
        return Scope(self.user_id, self.session_id, self.agent_id, self.turn_id)


# The spec imports VectorFilter from headroom.memory.ports; vector searches filter the same way.
VectorFilter = MemoryFilter


@dataclass
class MemoryDraft:
    """One memory to add in a batch (`HierarchicalMemory.add_many`); `build` validates it."""

    content: str
    user_id: str
    session_id: str | None = None
    agent_id: str | None = None
    turn_id: str | None = None
    category: MemoryCategory | str = MemoryCategory.FACT
    importance: float = 0.5
    entity_refs: list[str] | None = None
    metadata: dict[str, Any] | None = None
    created_at: datetime | None = None
    valid_from: datetime | None = None
    dedup: bool = True

    def build(self, model_id: str) -> Memory:
        """The validated `Memory`; its text is made valid UTF-8 (`text.clean_text`) first."""
        content = clean_text(self.content or "").strip()
        if not content:
            raise ValidationError("memory content must not be empty")
        importance = float(self.importance)
        if not 0.0 <= importance <= 1.0 or importance != importance:
            raise ValidationError(f"importance must be between 0 and 1, got {self.importance!r}")
        scope = Scope(self.user_id, self.session_id, self.agent_id, self.turn_id)
        now = utcnow()
        created = as_utc(self.created_at) if self.created_at else now
        return Memory(
            content=content,
            user_id=scope.user_id,
            session_id=scope.session_id,
            agent_id=scope.agent_id,
            turn_id=scope.turn_id,
            category=MemoryCategory.parse(self.category),
            importance=importance,
            entity_refs=[
                clean_text(e) if isinstance(e, str) else e for e in self.entity_refs or []
            ],
            metadata=dict(self.metadata or {}),
            created_at=created,
            valid_from=as_utc(self.valid_from) if self.valid_from else created,
            embedding_model=model_id,
        )


# --- write ops: what a <memory> block (or the outbox) asks the engine to do -------------------


@dataclass(frozen=True)
class AddOp:
    text: str
    category: MemoryCategory = MemoryCategory.FACT
    importance: float = 0.5
    scope: ScopeLevel = ScopeLevel.USER
    entity_refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpdateOp:
    """Supersede memory `id` (a real memory id, aliases already resolved) with `text`."""

    id: str
    text: str
    category: MemoryCategory | None = None
    importance: float | None = None


@dataclass(frozen=True)
class ForgetOp:
    id: str


@dataclass(frozen=True)
class MemoryOps:
    add: tuple[AddOp, ...] = ()
    update: tuple[UpdateOp, ...] = ()
    forget: tuple[ForgetOp, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.update or self.forget)

    def to_dict(self) -> dict[str, Any]:
        return {
            "add": [
                {
                    "text": a.text,
                    "category": a.category.value,
                    "importance": a.importance,
                    "scope": a.scope.value,
                    "entity_refs": list(a.entity_refs),
                }
                for a in self.add
            ],
            "update": [
                {
                    "id": u.id,
                    "text": u.text,
                    "category": u.category.value if u.category else None,
                    "importance": u.importance,
                }
                for u in self.update
            ],
            "forget": [f.id for f in self.forget],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryOps:
        return cls(
            add=tuple(
                AddOp(
                    text=a["text"],
                    category=MemoryCategory.parse(a.get("category", "fact")),
                    importance=float(a.get("importance", 0.5)),
                    scope=ScopeLevel.parse(a.get("scope", "user")),
                    entity_refs=tuple(a.get("entity_refs", ())),
                )
                for a in data.get("add", [])
            ),
            update=tuple(
                UpdateOp(
                    id=u["id"],
                    text=u["text"],
                    category=MemoryCategory.parse(u["category"]) if u.get("category") else None,
                    importance=u.get("importance"),
                )
                for u in data.get("update", [])
            ),
            forget=tuple(ForgetOp(id=i) for i in data.get("forget", [])),
        )


# --- configuration ---------------------------------------------------------------------------

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_MODELS = {
    EmbedderBackend.LOCAL: DEFAULT_LOCAL_MODEL,
    EmbedderBackend.OPENAI: "text-embedding-3-small",
    EmbedderBackend.OLLAMA: "nomic-embed-text",
}


def is_database_url(target: object) -> bool:
    """Whether a `db_path` names a PostgreSQL server (postgresql:// or postgres://) rather than
    a SQLite file; told apart here so the SQLite path never imports psycopg."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def default_db_path() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("headroom", appauthor=False)) / "memory.db"


@dataclass
class MemoryConfig:
    """Every option the spec shows. `db_path` is a SQLite file, or a postgresql:// URL for the
    PostgreSQL family. The HNSW knobs build and search pgvector's graphs on PostgreSQL; SQLite's
    vector index is sqlite-vec (exact KNN inside each user's partition), which has no graph to
    tune, so there setting them to anything but their defaults raises instead of being ignored."""

    db_path: str | Path | None = None
    embedder_backend: EmbedderBackend = EmbedderBackend.LOCAL
    embedder_model: str | None = None
    vector_dimension: int | None = None
    openai_api_key: str | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    ollama_base_url: str = "http://localhost:11434"
    hnsw_ef_construction: int = 200
    hnsw_m: int = 16
    hnsw_ef_search: int = 50
    cache_enabled: bool = True
    cache_max_size: int = 1000
    # Beyond the spec:
    torch_threads: int = 1
    # How the local model runs: "onnx" (ONNX Runtime, same weights and vectors, ~2x faster per
    # query), "torch", or "auto" (onnx when onnxruntime and onnx are installed, else torch;
    # onnx-int8 for the default MiniLM on a CPU with VNNI: memory/embedders/__init__.py);
    # "onnx-int8" embeds queries on an int8 copy of the ONNX model (~1.5x cheaper with VNNI).
    embedder_runtime: str = "auto"
    embed_batch_size: int = 64
    query_embedding_cache_size: int = 1024
    dedup_threshold: float = 0.95
    bubble_importance_threshold: float | None = 0.85
    recall_preset: str = "default"
    reader_threads: int = 4
    # Vectors per sqlite-vec storage chunk, allocated per user: small keeps many small users
    # cheap on disk (see memory/adapters/sqlite_vec_index.py). Fixed when a database is created.
    vector_chunk_size: int = 128
    # The write-behind path (memory/writer.py): an outbox row that keeps failing on its own is
    # parked as a dead letter after this many attempts, never holding back the rows behind it.
    outbox_max_attempts: int = 5
    # Ops kept in memory (and retried) while even the outbox insert fails (disk full, I/O
    # error); past this bound `submit` raises StorageError.
    memory_queue_max_ops: int = 10_000
    # Operator limits on model-written adds (0 = unlimited): current memories per user, and
    # users seen for the first time per minute (per process).
    max_memories_per_user: int = 0
    max_new_users_per_minute: int = 0
    # Recall (memory/retrieval.py). How much importance moves a ranking: under the learned
    # ranker, the log-odds added per unit of importance above 0.5 (0.9 vs 0.3 differ by 0.6 x
    # this); under the fused one, the multiplier's slope. None keeps the preset's (default 2.0).
    recall_importance_weight: float | None = None
    # The core tier: the user's memories of importance >= recall_core_min_importance (health,
    # diet, identity, hard constraints, as models rate them) go with every recall after the
    # ranked ones, best first, within recall_core_tokens of their own (0 turns the tier off).
    recall_core_tokens: int = 120
    recall_core_min_importance: float = 0.85

    def __post_init__(self) -> None:
        if isinstance(self.embedder_backend, str):
            try:
                self.embedder_backend = EmbedderBackend(self.embedder_backend.lower())
            except ValueError:
                raise ConfigError(
                    f"unknown embedder_backend {self.embedder_backend!r}; "
                    "expected local, openai or ollama"
                ) from None
        if self.embedder_model is None:
            self.embedder_model = _DEFAULT_MODELS[self.embedder_backend]
        if self.db_path is None:
            self.db_path = default_db_path()
        # On PostgreSQL they build and search pgvector's HNSW graphs.
        if not is_database_url(self.db_path) and (
            self.hnsw_ef_construction, self.hnsw_m, self.hnsw_ef_search
        ) != (200, 16, 50):
            raise ConfigError(
                "hnsw_* options are not supported: the default vector index is sqlite-vec, which "
                "searches each user's partition exactly (no HNSW graph to tune); remove them"
            )
        if min(self.hnsw_ef_construction, self.hnsw_m, self.hnsw_ef_search) < 1:
            raise ConfigError("hnsw_m, hnsw_ef_construction and hnsw_ef_search must be positive")
        if self.vector_dimension is not None and self.vector_dimension <= 0:
            raise ConfigError("vector_dimension must be positive")
        if self.cache_max_size < 0:
            raise ConfigError("cache_max_size must not be negative")
        if self.embedder_runtime not in ("auto", "onnx", "onnx-int8", "torch"):
            raise ConfigError(
                f"unknown embedder_runtime {self.embedder_runtime!r}; "
                "expected auto, onnx, onnx-int8 or torch"
            )
        if self.torch_threads < 1:
            raise ConfigError("torch_threads must be at least 1")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ConfigError("dedup_threshold must be in (0, 1]")
        if self.bubble_importance_threshold is not None and not (
            0.0 <= self.bubble_importance_threshold <= 1.0
        ):
            raise ConfigError("bubble_importance_threshold must be between 0 and 1 (or None)")
        if self.embed_batch_size < 1:
            raise ConfigError("embed_batch_size must be at least 1")
        if self.vector_chunk_size < 8 or self.vector_chunk_size % 8:
            raise ConfigError("vector_chunk_size must be a positive multiple of 8")
        if self.reader_threads < 1:
            raise ConfigError("reader_threads must be at least 1")
        if self.outbox_max_attempts < 1:
            raise ConfigError("outbox_max_attempts must be at least 1")
        if self.memory_queue_max_ops < 0:
            raise ConfigError("memory_queue_max_ops must not be negative")
        if self.max_memories_per_user < 0 or self.max_new_users_per_minute < 0:
            raise ConfigError("max_memories_per_user and max_new_users_per_minute must not be "
                              "negative (0 means unlimited)")
        if self.recall_importance_weight is not None and self.recall_importance_weight < 0:
            raise ConfigError("recall_importance_weight must not be negative")
        if self.recall_core_tokens < 0:
            raise ConfigError("recall_core_tokens must not be negative (0 turns the tier off)")
        if not 0.0 <= self.recall_core_min_importance <= 1.0:
            raise ConfigError("recall_core_min_importance must be between 0 and 1")

    def with_changes(self, **changes: Any) -> MemoryConfig:
        return replace(self, **changes)
