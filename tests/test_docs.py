"""README's numbers are the code's: each sentence below is rebuilt from the constant it states.

A false sentence in README is a bug (STYLE.md 17): when a default or a bound changes, this test names
the sentence to update.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from lumen_proxy import auth, backends, endpoints, relay
from lumen_proxy.app import create_app
from lumen_proxy.config import Config, PartTokens, Timeouts

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
TEXT = re.sub(r"\s+", " ", README)  # sentences wrap across lines


def _mib(value: int) -> str:
    return f"{value // 2**20}"


def _int(value: float) -> str:
    return f"{value:g}"


PART = PartTokens()
TIMEOUTS = Timeouts()
DEFAULTS = Config(source="", database=Path("x"), models=())

PHRASES = [
    # the hold
    "request size / 2 + 1 tokens",
    f"+ {endpoints.PER_ITEM_TOKENS} per prompt or input of a list",
    f"image {PART.image}, audio {PART.audio}, video {PART.video}, file {PART.file} by default",
    f"`n`, `best_of` (integers 1 to {endpoints.MAX_CHOICES})",
    "integers 0 to 2^31 − 1" if endpoints.INT32_MAX == 2**31 - 1 else "INT32_MAX changed",
    # bodies, connections, answers
    f"`max_body_mb` (default {_mib(DEFAULTS.max_body_bytes)} MiB",
    f"over {relay.MAX_JSON_VALUES:,} plus one per {relay.BYTES_PER_JSON_VALUE} bytes",
    f"`timeouts.request_body` ({_int(TIMEOUTS.request_body)} s, then 408)",
    f"`timeouts.request_headers` ({_int(TIMEOUTS.request_headers)} s)",
    f"`timeouts.keepalive` ({_int(TIMEOUTS.keepalive)} s)",
    f"`max_connections` ({DEFAULTS.max_connections})",
    f"`max_response_mb` ({_mib(DEFAULTS.max_response_bytes)})",
    # backends
    f"`x-should-retry: false` when that is over {_int(backends.SDK_PATIENCE)} s",
    # the usage log
    f"committed within {_int(inspect.signature(create_app).parameters['usage_interval'].default * 1000)} ms",
]


@pytest.mark.parametrize("phrase", PHRASES)
def test_readme_states_the_number_the_code_uses(phrase: str) -> None:
    assert phrase in TEXT, f"README.md should say: {phrase!r}"


def test_the_miss_spacing_keeps_a_new_key_usable_at_once() -> None:
    """README promises a key works the moment `keys create` returns: a miss waits at most one spacing."""
    assert "works the moment" in TEXT or "work the moment" in TEXT
    assert auth.MISS_SPACING <= 0.05
