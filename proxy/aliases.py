"""Path aliases (pure ASGI, outermost): a request to an alias prefix is served as if it had been
sent to the real one, before the auth gate or any route sees the path, so every check, route and
allowlist rule applies to the served path. Groq's SDK calls `/openai/v1/...`; the default maps it
to `/v1/...` (`ProxyConfig.path_aliases`)."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["PathAliases"]


class PathAliases:
    def __init__(self, app: ASGIApp, aliases: Sequence[tuple[str, str]]) -> None:
        self.app = app
        # Longest alias first, so a more specific prefix wins.
        self.aliases = sorted(aliases, key=lambda pair: -len(pair[0]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = self._rewritten(scope)
        await self.app(scope, receive, send)

    def _rewritten(self, scope: Scope) -> Scope:
        path: str = scope["path"]
        raw: bytes = scope.get("raw_path") or path.encode()
        for alias, served in self.aliases:
            if path.startswith(alias) and raw.startswith(alias.encode()):
                return {**scope, "path": served + path[len(alias):],
                        "raw_path": served.encode() + raw[len(alias):]}
        return scope
