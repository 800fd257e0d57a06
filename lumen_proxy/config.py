"""Load and validate the YAML config into frozen dataclasses.

This is the only module that reads the environment (``${VAR}`` expansion). Every problem is a
:class:`ConfigError` whose one-line message names the file, the key path and what is wrong, so
``lumen-proxy serve`` can print it and exit 2 instead of showing a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from yarl import URL

from .periods import EVERY, Every
from .portal.settings import Portal, parse_portal, parse_url
from .ratelimit import LimitSpec

MICRO = 1_000_000
"""Coins are stored as integer micro-coins; prices as micro-coins per million tokens."""

EMBEDDED = "<embedded default>"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
T = TypeVar("T")


class ConfigError(Exception):
    """A config problem, rendered as ``file: key.path: problem``."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        self.source, self.path, self.problem = source, path, problem
        where = f"{path}: " if path else ""
        super().__init__(f"{source}: {where}{problem}")


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-coins per million tokens, so cost math stays in integers."""

    prompt: int = 0
    completion: int = 0
    cached_prompt: int | None = None  # input a backend read from its cache; None: the prompt price

    @property
    def cached(self) -> int:
        return self.prompt if self.cached_prompt is None else self.cached_prompt


@dataclass(frozen=True, slots=True)
class Backend:
    url: str
    model: str
    api_key: str | None = None
    inject_stream_usage: bool = True
    max_tokens_field: str = "max_tokens"
    """The chat field Lumen sets when a request caps nothing: max_tokens is what vLLM, Ollama and llama.cpp
    honour; OpenAI's reasoning models want max_completion_tokens."""
    headers: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Sent on every request to this backend (OpenAI-Organization, OpenAI-Project, a gateway's own)."""
    apis: frozenset[str] | None = None
    """The APIs (``chat``, ``completions``, ``embeddings``, ``responses``, ``messages``) it serves; None: all."""
    max_concurrency: int | None = None
    """Requests it is given at once; beyond, they wait in Lumen's fair queue (fairshare.py). None: no cap."""
    send_priority: bool = False
    """Set the request's ``priority`` (vLLM's, lower first) to its account's group priority."""
    label: str = field(init=False, compare=False)
    """Name used in logs, /healthz and /metrics: the URL without user, password or query."""

    def __post_init__(self) -> None:
        label = self.url if self.is_builtin else str(URL(self.url).with_user(None).with_query(None))
        object.__setattr__(self, "label", label)

    @property
    def is_builtin(self) -> bool:
        return self.url.startswith("builtin:")

    def serves(self, api: str) -> bool:
        return self.apis is None or api in self.apis


@dataclass(frozen=True, slots=True)
class PartTokens:
    """Prompt tokens held at least for each media part of a request, whatever its size in bytes.

    A 60-byte ``image_url`` costs 85-1,445 tokens at OpenAI and thousands on some vLLM models: the bytes of
    the body cannot see that, so the hold counts each part at least this much (and bills what the
    backend reports, up to twice the held prompt).
    """

    image: int = 765
    audio: int = 100
    video: int = 4000
    file: int = 1000

    def held_for(self, parts: Mapping[str, int]) -> int:
        """Tokens held for ``parts`` (part counts by kind: "image", "audio", "video", "file")."""
        return sum(int(getattr(self, kind)) * count for kind, count in parts.items())


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    backends: tuple[Backend, ...]
    price: Price = Price()
    max_output_tokens: int = 4096
    part_tokens: PartTokens = PartTokens()
    max_body_bytes: int | None = None  # None: the top-level max_body_mb
    limits: LimitSpec | None = None
    owned_by: str = "lumen"
    serving: Mapping[str, tuple[Backend, ...]] = field(default_factory=dict, compare=False, repr=False)
    """Per API name, the backends that serve it (built once by the config reader)."""
    gated: bool = field(init=False, compare=False, repr=False)
    """Some backend has ``max_concurrency``: requests may wait in the fair queue (else they never look)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "gated", any(b.max_concurrency is not None for b in self.backends))

    def backends_for(self, api: str) -> tuple[Backend, ...]:
        """The backends a request of ``api`` may go to: those that list it (or list nothing)."""
        found = self.serving.get(api)
        return found if found is not None else tuple(b for b in self.backends if b.serves(api))


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0  # to a backend
    first_byte: float = 300.0  # from a backend
    request_headers: float = 10.0  # for a client to send its request line and headers (slowloris)
    request_body: float = 60.0  # for a client to send its body, first byte to last
    keepalive: float = 75.0  # an idle client connection is closed after this


@dataclass(frozen=True, slots=True)
class Breaker:
    failures: int = 3
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class UsageBacklog:
    """How long usage writes may keep failing, and how many rows may wait, before new requests get 503."""

    seconds: float = 30.0
    rows: int = 10_000


@dataclass(frozen=True, slots=True)
class Allowance:
    """Coins an account of a group gets at the start of every period; what is left does not roll over."""

    coins: int  # micro-coins
    every: Every


@dataclass(frozen=True, slots=True)
class GroupLimits:
    """A group's limits: each one set overrides the defaults; an account's own overrides it."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    models: tuple[str, ...] | None = None  # None: every model
    limits: GroupLimits = GroupLimits()
    allowance: Allowance | None = None
    max_keys: int | None = None  # keys an account of the group may hold; None: no limit
    weight: float = 1.0  # its share of a saturated backend against other groups' accounts (fairshare.py)
    priority: int = 0  # sent as vLLM's `priority` to backends with send_priority (lower is served first)


@dataclass(frozen=True, slots=True)
class ResponseIds:
    """How many Responses API response ids Lumen remembers (to route follow-ups), and for how long."""

    keep: int = 100_000
    hours: float = 720.0
    per_account: int = 10_000  # no account's flood of responses can push out more than this of the others'


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    database: Path
    models: tuple[Model, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    limits: LimitSpec = LimitSpec()
    timeouts: Timeouts = Timeouts()
    breaker: Breaker = Breaker()
    health_check_interval: float = 0.0
    queue_timeout: float = 30.0  # seconds a request waits for a slot of a saturated backend, then 503
    max_body_bytes: int = 8 * 1024 * 1024
    max_response_bytes: int = 64 * 1024 * 1024
    max_connections: int = 1000
    shutdown_grace: float = 30.0
    usage_backlog: UsageBacklog = UsageBacklog()
    response_ids: ResponseIds = ResponseIds()
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    groups: tuple[Group, ...] = ()
    default_group: str | None = None
    admin_token: str | None = None
    log_prompts: bool = False
    cors_origins: tuple[str, ...] = ("*",)
    demo: bool = False
    delegation_header: str = "X-OpenWebUI-User-Email"  # names the person a delegating key's request is for
    public_url: str | None = None  # the portal's address as people's browsers see it (links, Origin checks)
    portal: Portal = Portal()
    by_name: Mapping[str, Model] = field(default_factory=dict, compare=False, repr=False)
    largest_body_bytes: int = field(init=False, compare=False, repr=False)
    """The largest body any model accepts; with ``body_overrides`` False, every model's limit."""
    body_overrides: bool = field(init=False, compare=False, repr=False)
    _groups: Mapping[str, Group] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_groups", {g.name: g for g in self.groups})
        overrides = [m.max_body_bytes for m in self.models if m.max_body_bytes is not None]
        default = [self.max_body_bytes] if len(overrides) < len(self.models) or not self.models else []
        object.__setattr__(self, "largest_body_bytes", max(overrides + default))
        object.__setattr__(self, "body_overrides", bool(overrides))

    def model(self, name: str) -> Model | None:
        return self.by_name.get(name)

    def models_allowed(self, own: tuple[str, ...] | None, group: str | None) -> tuple[str, ...] | None:
        """The one access rule: an account's own list (``accounts set-models``), else its group's, else
        None (every model). The server's 403 and /v1/models and the CLI's listings all use it."""
        if own is not None:
            return own
        found = self.group(group)
        return found.models if found is not None else None

    @property
    def portal_url(self) -> str:
        """Where people's browsers reach the portal: ``public_url``, else the listen address (sign-in links,
        the CLI's and the demo's messages)."""
        if self.public_url:
            return self.public_url
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}" if ":" not in host else f"http://[{host}]:{self.port}"

    def group(self, name: str | None) -> Group | None:
        """The group ``name``, or None (no group, or one the config no longer has)."""
        return self._groups.get(name) if name is not None else None


class _Reader:
    """Walks the YAML tree, remembering the key path for error messages."""

    def __init__(self, source: str, *, require_env: bool = True) -> None:
        self.source = source
        self.require_env = require_env

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.source, path, problem)

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                raise self.fail(_join(path, str(key)), f"unknown key (allowed here: {hint})")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"must be a non-empty string, got {_kind(value)}")
        return self.expand(value, path)

    def expand(self, text: str, path: str) -> str:
        def sub(match: re.Match[str]) -> str:
            var = match.group(1)
            if var in os.environ:
                return os.environ[var]
            if self.require_env:
                raise self.fail(path, f"environment variable {var} is not set")
            return match.group(0)  # admin commands never talk to backends: secrets may stay unset

        return _ENV_REF.sub(sub, text)

    def number(self, value: Any, path: str, *, minimum: float = 0, integer: bool = False) -> Any:
        ok_type = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type):
            raise self.fail(path, f"must be {'an integer' if integer else 'a number'}, got {_kind(value)}")
        if value < minimum:
            raise self.fail(path, f"must be >= {minimum}, got {value}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {_kind(value)}")
        return value

    def optional(self, data: Mapping[str, Any], key: str, path: str, read: Callable[[Any, str], T],
                 default: T) -> T:
        return read(data[key], _join(path, key)) if key in data and data[key] is not None else default


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


def micro_coins(value: Any, path: str, reader: _Reader) -> int:
    """Parse a decimal coin amount (YAML number or string) into integer micro-coins, exactly."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise reader.fail(path, f"must be a number, got {_kind(value)}")
    try:
        amount = Decimal(str(value)) * MICRO
    except InvalidOperation:
        raise reader.fail(path, f"must be a number, got {_kind(value)}") from None
    if not amount.is_finite() or amount != amount.to_integral_value() or amount < 0:
        raise reader.fail(path, "must be >= 0 with at most 6 decimals")
    return int(amount)


def _limits(r: _Reader, value: Any, path: str) -> LimitSpec:
    data = r.mapping(value, path, {"rpm", "tpm", "concurrency"})
    count = lambda v, p: int(r.number(v, p, integer=True))  # noqa: E731
    return LimitSpec(
        rpm=r.optional(data, "rpm", path, count, 0),
        tpm=r.optional(data, "tpm", path, count, 0),
        concurrency=r.optional(data, "concurrency", path, count, 0),
    )


def _origins(r: _Reader, value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        example = '["https://chat.example.org"], ["*"] or []'
        raise r.fail(path, f"must be a list of origins like {example}, got {_kind(value)}")
    origins = tuple(r.string(v, f"{path}[{i}]").rstrip("/") for i, v in enumerate(value))
    for i, origin in enumerate(origins):
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise r.fail(f"{path}[{i}]", f"must be \"*\" or start with http:// or https://, got {origin!r}")
    return origins


def _usage_backlog(r: _Reader, value: Any, path: str) -> UsageBacklog:
    data = r.mapping(value, path, {"seconds", "rows"})
    default = UsageBacklog()
    return UsageBacklog(
        seconds=r.optional(data, "seconds", path, lambda v, p: float(r.number(v, p)), default.seconds),
        rows=r.optional(data, "rows", path, lambda v, p: int(r.number(v, p, integer=True)), default.rows),
    )


def _response_ids(r: _Reader, value: Any, path: str) -> ResponseIds:
    data = r.mapping(value, path, {"keep", "hours", "per_account"})
    default = ResponseIds()
    count = lambda v, p: int(r.number(v, p, minimum=1, integer=True))  # noqa: E731
    return ResponseIds(
        keep=r.optional(data, "keep", path, count, default.keep),
        hours=r.optional(data, "hours", path, lambda v, p: float(r.number(v, p, minimum=0.001)), default.hours),
        per_account=r.optional(data, "per_account", path, count, default.per_account),
    )


def _delegation(r: _Reader, value: Any, path: str) -> str:
    data = r.mapping(value, path, {"header"})
    header = r.optional(data, "header", path, r.string, _default(Config, "delegation_header"))
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", header):
        raise r.fail(f"{path}.header", f"must be a header name such as X-OpenWebUI-User-Email, got {header!r}")
    return str(header)


def _zone(r: _Reader, value: Any, path: str) -> ZoneInfo:
    name = r.string(value, path)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise r.fail(path, f"unknown time zone {name!r} (an IANA name such as Europe/Berlin or UTC)") from None


def _group(r: _Reader, value: Any, path: str, models: Mapping[str, Model]) -> Group:
    data = r.mapping(value, path, {"name", "models", "limits", "allowance", "max_keys", "weight", "priority"})
    if "name" not in data:
        raise r.fail(_join(path, "name"), "is required")
    name = r.string(data["name"], _join(path, "name"))
    group_models = None
    if data.get("models") is not None:
        listed = data["models"]
        if not isinstance(listed, list):
            raise r.fail(_join(path, "models"), f"must be a list of model names, got {_kind(listed)}")
        for i, model in enumerate(listed):
            if model not in models:
                raise r.fail(f"{path}.models[{i}]", f"no model named {model!r} in models")
        group_models = tuple(dict.fromkeys(listed))
    limits = GroupLimits()
    if data.get("limits") is not None:
        where = _join(path, "limits")
        given = r.mapping(data["limits"], where, {"rpm", "tpm", "concurrency"})
        count = lambda v, p: int(r.number(v, p, integer=True))  # noqa: E731
        limits = GroupLimits(**{k: r.optional(given, k, where, count, None) for k in ("rpm", "tpm", "concurrency")})
    allowance = None
    if data.get("allowance") is not None:
        where = _join(path, "allowance")
        given = r.mapping(data["allowance"], where, {"coins", "every"})
        for key in ("coins", "every"):
            if key not in given:
                raise r.fail(_join(where, key), "is required")
        every = _choice(r, given["every"], _join(where, "every"), EVERY)
        allowance = Allowance(micro_coins(given["coins"], _join(where, "coins"), r), every)  # type: ignore[arg-type]
    return Group(
        name=name, models=group_models, limits=limits, allowance=allowance,
        max_keys=r.optional(data, "max_keys", path, lambda v, p: int(r.number(v, p, minimum=1, integer=True)), None),
        weight=r.optional(data, "weight", path, lambda v, p: float(r.number(v, p, minimum=0.01)), 1.0),
        priority=r.optional(data, "priority", path,
                            lambda v, p: int(r.number(v, p, minimum=-(2**31), integer=True)), 0),
    )


def _groups(r: _Reader, value: Any, models: Mapping[str, Model]) -> tuple[Group, ...]:
    if not isinstance(value, list):
        raise r.fail("groups", f"must be a list of groups, got {_kind(value)}")
    groups = tuple(_group(r, g, f"groups[{i}]", models) for i, g in enumerate(value))
    seen: set[str] = set()
    for i, group in enumerate(groups):
        if group.name in seen:
            raise r.fail(f"groups[{i}].name", f"duplicate group name {group.name!r}")
        seen.add(group.name)
    return groups


def _backend(r: _Reader, value: Any, path: str, public_name: str) -> Backend:
    data = r.mapping(value, path, {"url", "api_key", "model", "stream_usage", "max_tokens_field", "headers", "apis",
                                   "max_concurrency", "send_priority"})
    if "url" not in data:
        raise r.fail(_join(path, "url"), "is required")
    url = r.string(data["url"], _join(path, "url")).rstrip("/")
    if not (url.startswith(("http://", "https://")) or url == "builtin:echo"):
        raise r.fail(_join(path, "url"), f"must start with http:// or https:// or be builtin:echo, got {url!r}")
    return Backend(
        url=url,
        model=r.optional(data, "model", path, r.string, public_name),
        api_key=r.optional(data, "api_key", path, r.string, None),
        inject_stream_usage=r.optional(data, "stream_usage", path, r.boolean, True),
        max_tokens_field=r.optional(data, "max_tokens_field", path, lambda v, p: _choice(r, v, p, _OUTPUT_FIELDS),
                                    "max_tokens"),
        headers=r.optional(data, "headers", path, lambda v, p: _headers(r, v, p), {}),
        apis=r.optional(data, "apis", path, lambda v, p: _apis(r, v, p), None),
        max_concurrency=r.optional(data, "max_concurrency", path,
                                   lambda v, p: int(r.number(v, p, minimum=1, integer=True)), None),
        send_priority=r.optional(data, "send_priority", path, r.boolean, False),
    )


API_NAMES = ("chat", "completions", "embeddings", "responses", "messages")
"""What ``apis:`` may list: chat = /v1/chat/completions, responses = /v1/responses, messages = /v1/messages."""


def _apis(r: _Reader, value: Any, path: str) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise r.fail(path, f"must be a non-empty list of {', '.join(API_NAMES)}, got {_kind(value)}")
    for i, name in enumerate(value):
        if name not in API_NAMES:
            raise r.fail(f"{path}[{i}]", f"must be one of {', '.join(API_NAMES)}, got {_kind(name)}")
    return frozenset(value)


_RESERVED_HEADERS = frozenset({"authorization", "content-type", "content-length", "accept-encoding", "host",
                               "transfer-encoding", "connection", "x-request-id"})


def _headers(r: _Reader, value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise r.fail(path, f"must be a mapping of header names to values, got {_kind(value)}")
    headers = {}
    for name, text in value.items():
        where = _join(path, str(name))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9-]+", name):
            raise r.fail(where, "must be a header name (letters, digits and -)")
        if name.lower() in _RESERVED_HEADERS:
            raise r.fail(where, "is set by Lumen (use api_key for Authorization)")
        headers[name] = r.string(text, where)
        if any(c in headers[name] for c in "\r\n\0"):
            raise r.fail(where, "must be one line")
    return headers


_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens")


def _choice(r: _Reader, value: Any, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise r.fail(path, f"must be one of {', '.join(choices)}, got {_kind(value)}")
    return str(value)


def _default(cls: type, name: str) -> Any:
    """A dataclass field's default: defaults are written once, in the dataclass."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _mebibytes(r: _Reader, value: Any, path: str) -> int:
    return int(float(r.number(value, path, minimum=0.001)) * 1024 * 1024)


def _part_tokens(r: _Reader, value: Any, path: str) -> PartTokens:
    data = r.mapping(value, path, {"image", "audio", "video", "file"})
    count = lambda v, p: int(r.number(v, p, integer=True))  # noqa: E731
    default = PartTokens()
    return PartTokens(**{kind: r.optional(data, kind, path, count, getattr(default, kind))
                         for kind in ("image", "audio", "video", "file")})


def _model(r: _Reader, value: Any, path: str) -> Model:
    data = r.mapping(value, path, {"name", "backends", "price", "max_output_tokens", "part_tokens", "max_body_mb",
                                   "limits", "owned_by"})
    if "name" not in data:
        raise r.fail(_join(path, "name"), "is required")
    name = r.string(data["name"], _join(path, "name"))
    raw_backends = data.get("backends")
    if not isinstance(raw_backends, list) or not raw_backends:
        raise r.fail(_join(path, "backends"), "must be a non-empty list of backends")
    backends = tuple(_backend(r, b, f"{path}.backends[{i}]", name) for i, b in enumerate(raw_backends))
    price_path = _join(path, "price")
    price_data = r.mapping(data.get("price"), price_path, {"prompt", "completion", "cached_prompt"})
    cached = price_data.get("cached_prompt")
    price = Price(
        prompt=micro_coins(price_data.get("prompt", 0), _join(price_path, "prompt"), r),
        completion=micro_coins(price_data.get("completion", 0), _join(price_path, "completion"), r),
        cached_prompt=None if cached is None else micro_coins(cached, _join(price_path, "cached_prompt"), r),
    )
    return Model(
        name=name,
        backends=backends,
        price=price,
        max_output_tokens=r.optional(
            data, "max_output_tokens", path, lambda v, p: int(r.number(v, p, minimum=1, integer=True)), 4096
        ),
        part_tokens=r.optional(data, "part_tokens", path, lambda v, p: _part_tokens(r, v, p), PartTokens()),
        max_body_bytes=r.optional(data, "max_body_mb", path, lambda v, p: _mebibytes(r, v, p), None),
        limits=r.optional(data, "limits", path, lambda v, p: _limits(r, v, p), None),
        owned_by=r.optional(data, "owned_by", path, r.string, "lumen"),
        serving={api: tuple(b for b in backends if b.serves(api)) for api in API_NAMES},
    )


_TOP = {
    "listen", "database", "models", "limits", "timeouts", "circuit_breaker", "health_check_interval",
    "max_body_mb", "max_response_mb", "max_connections", "shutdown_grace", "admin_token", "log_prompts", "demo",
    "cors_origins",
    "usage_backlog", "response_ids", "timezone", "groups", "default_group", "public_url", "portal",
    "delegation", "queue_timeout",
}


def parse_config(data: Any, source: str, base_dir: Path, *, require_env: bool = True) -> Config:
    """Turn a parsed YAML document into a :class:`Config`, or raise :class:`ConfigError`."""
    r = _Reader(source, require_env=require_env)
    top = r.mapping(data, "", _TOP)
    listen = r.mapping(top.get("listen"), "listen", {"host", "port"})
    if "database" not in top:
        raise r.fail("database", "is required (path of the SQLite file)")
    database = Path(os.path.expanduser(r.string(top["database"], "database")))
    raw_models = top.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise r.fail("models", "must be a non-empty list of models")
    models = tuple(_model(r, m, f"models[{i}]") for i, m in enumerate(raw_models))
    by_name: dict[str, Model] = {}
    for i, m in enumerate(models):
        if m.name in by_name:
            raise r.fail(f"models[{i}].name", f"duplicate model name {m.name!r}")
        by_name[m.name] = m
    timeouts = r.mapping(top.get("timeouts"), "timeouts", {f.name for f in dataclasses.fields(Timeouts)})
    breaker = r.mapping(top.get("circuit_breaker"), "circuit_breaker", {"failures", "cooldown"})
    no_groups: tuple[Group, ...] = ()
    groups = r.optional(top, "groups", "", lambda v, p: _groups(r, v, by_name), no_groups)
    default_group = r.optional(top, "default_group", "", r.string, None)
    if default_group is not None and default_group not in {g.name for g in groups}:
        raise r.fail("default_group", f"no group named {default_group!r} in groups")
    seconds = lambda v, p: float(r.number(v, p))  # noqa: E731
    positive = lambda v, p: float(r.number(v, p, minimum=0.001))  # noqa: E731
    mebibytes = lambda v, p: _mebibytes(r, v, p)  # noqa: E731
    count = lambda v, p: int(r.number(v, p, minimum=1, integer=True))  # noqa: E731
    return Config(
        source=source,
        database=database if database.is_absolute() else base_dir / database,
        models=models,
        host=r.optional(listen, "host", "listen", r.string, "127.0.0.1"),
        port=r.optional(listen, "port", "listen", lambda v, p: int(r.number(v, p, integer=True)), 8080),
        limits=r.optional(top, "limits", "", lambda v, p: _limits(r, v, p), LimitSpec()),
        timeouts=Timeouts(**{f.name: r.optional(timeouts, f.name, "timeouts", positive, _default(Timeouts, f.name))
                             for f in dataclasses.fields(Timeouts)}),
        breaker=Breaker(
            failures=r.optional(breaker, "failures", "circuit_breaker",
                                lambda v, p: int(r.number(v, p, minimum=1, integer=True)), 3),
            cooldown=r.optional(breaker, "cooldown", "circuit_breaker", seconds, 30.0),
        ),
        health_check_interval=r.optional(top, "health_check_interval", "", seconds, 0.0),
        queue_timeout=r.optional(top, "queue_timeout", "", positive, _default(Config, "queue_timeout")),
        max_body_bytes=r.optional(top, "max_body_mb", "", mebibytes, _default(Config, "max_body_bytes")),
        max_response_bytes=r.optional(top, "max_response_mb", "", mebibytes, _default(Config, "max_response_bytes")),
        max_connections=r.optional(top, "max_connections", "", count, _default(Config, "max_connections")),
        shutdown_grace=r.optional(top, "shutdown_grace", "", seconds, 30.0),
        usage_backlog=r.optional(top, "usage_backlog", "", lambda v, p: _usage_backlog(r, v, p), UsageBacklog()),
        response_ids=r.optional(top, "response_ids", "", lambda v, p: _response_ids(r, v, p), ResponseIds()),
        timezone=r.optional(top, "timezone", "", lambda v, p: _zone(r, v, p), ZoneInfo("UTC")),
        groups=groups,
        default_group=default_group,
        admin_token=r.optional(top, "admin_token", "", r.string, None),
        log_prompts=r.optional(top, "log_prompts", "", r.boolean, False),
        cors_origins=r.optional(top, "cors_origins", "", lambda v, p: _origins(r, v, p), ("*",)),
        demo=r.optional(top, "demo", "", r.boolean, False),
        public_url=r.optional(top, "public_url", "", lambda v, p: parse_url(r, v, p), None),
        delegation_header=r.optional(top, "delegation", "", lambda v, p: _delegation(r, v, p),
                                     _default(Config, "delegation_header")),
        portal=r.optional(top, "portal", "", lambda v, p: parse_portal(r, v, p, [g.name for g in groups]), Portal()),
        by_name=by_name,
    )


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(source, "", f"{where}{problem}") from None


def load_config(path: str | Path | None, *, require_env: bool = True) -> Config:
    """Load ``path``, or the embedded demo default when ``path`` is None.

    ``require_env=False`` (admin commands) leaves unset ``${VAR}`` in place instead of failing.
    """
    if path is None:
        text = resources.files("lumen_proxy").joinpath("default.yaml").read_text()
        return parse_config(_parse_yaml(text, EMBEDDED), EMBEDDED, default_data_dir())
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(str(file), "", f"cannot read: {exc.strerror or exc}") from None
    return parse_config(_parse_yaml(text, str(file)), str(file), file.resolve().parent, require_env=require_env)


def default_data_dir() -> Path:
    """Where the embedded demo keeps its database and key (XDG data dir)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "lumen-proxy"


def find_config_path(cli_value: str | None) -> str | None:
    """``--config``, else ``$LUMEN_CONFIG``, else ``./lumen.yaml`` if present, else None (embedded)."""
    if cli_value:
        return cli_value
    if os.environ.get("LUMEN_CONFIG"):
        return os.environ["LUMEN_CONFIG"]
    return "lumen.yaml" if Path("lumen.yaml").is_file() else None
