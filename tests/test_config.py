"""The YAML config: what a valid file gives, and the one clear line every mistake gives.

Every ConfigError reads ``<file>: <key path>: <problem>``; ``lumen-proxy serve`` prints it alone on
stderr and exits 2. config.example.yaml is checked against the parser both ways: every key in it
parses, and every key the parser accepts is in it.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lumen_proxy.config import ConfigError, load_config, parse_config
from tests.conftest import cli

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"


def minimal() -> dict[str, Any]:
    return {
        "database": "lumen.db",
        "models": [{"name": "gpt-4o", "backends": [{"url": "http://127.0.0.1:9/v1", "api_key": "k"}]}],
    }


def write(tmp_path: Path, text_or_data: str | dict[str, Any], name: str = "lumen.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text_or_data if isinstance(text_or_data, str) else yaml.safe_dump(text_or_data, sort_keys=False))
    return path


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return caught.value


# ---- a good file ----


def test_the_issue_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-123")
    path = write(tmp_path, """\
listen: {host: 127.0.0.1, port: 8080}
database: lumen.db              # relative paths are relative to the config file
models:
  - name: gpt-4o                # what clients send as "model"
    backends:                   # one or more; requests are spread over the healthy ones
      - url: https://api.openai.com/v1
        api_key: ${OPENAI_API_KEY}   # ${VAR} expands from the environment; unset var = config error
        model: gpt-4o-2024-08-06     # name upstream; default: the public name
    price: {prompt: 2.5, completion: 10}   # coins per million tokens (used from part 3 on)
""")
    config = load_config(path)
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.database == tmp_path / "lumen.db"
    model = config.model("gpt-4o")
    assert model is not None
    backend = model.backends[0]
    assert (backend.url, backend.api_key, backend.model) == (
        "https://api.openai.com/v1", "sk-upstream-123", "gpt-4o-2024-08-06"
    )
    assert (model.price.prompt, model.price.completion) == (2_500_000, 10_000_000)  # micro-coins, exact


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, minimal()))
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.max_body_bytes == 8 * 1024 * 1024
    assert config.models[0].backends[0].model == "gpt-4o"  # the public name when not given
    assert (config.timeouts.connect, config.timeouts.first_byte) == (10.0, 300.0)
    assert (config.breaker.failures, config.breaker.cooldown) == (3, 30.0)


def test_env_vars_expand_anywhere_in_a_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_HOST", "10.0.0.5")
    monkeypatch.setenv("VLLM_KEY", "secret")
    data = minimal()
    data["models"][0]["backends"][0] = {"url": "http://${VLLM_HOST}:8000/v1", "api_key": "token-${VLLM_KEY}"}
    backend = load_config(write(tmp_path, data)).models[0].backends[0]
    assert (backend.url, backend.api_key) == ("http://10.0.0.5:8000/v1", "token-secret")


def test_relative_database_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc" / "lumen"
    etc.mkdir(parents=True)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    data = {**minimal(), "database": "data/lumen.db"}
    assert load_config(write(etc, data)).database == etc / "data" / "lumen.db"
    assert load_config(Path("../../etc/lumen/lumen.yaml")).database == etc / "data" / "lumen.db"


def test_absolute_and_home_database_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config(write(tmp_path, {**minimal(), "database": "/var/lib/x.db"})).database == Path("/var/lib/x.db")
    assert load_config(write(tmp_path, {**minimal(), "database": "~/x.db"})).database == tmp_path / "home" / "x.db"


def test_max_body_mb_is_a_byte_limit(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, {**minimal(), "max_body_mb": 0.5})).max_body_bytes == 512 * 1024


# ---- mistakes ----


def test_a_typo_at_the_top_names_the_key(tmp_path: Path) -> None:
    data = minimal()
    data["modles"] = data.pop("models")
    error = config_error(write(tmp_path, data))
    assert error.path == "modles"
    assert "unknown key" in error.problem and "models" in error.problem  # the allowed keys are listed


def test_a_nested_typo_names_the_whole_key_path(tmp_path: Path) -> None:
    data = minimal()
    data["models"].append({"name": "b", "backends": [{"url": "http://h/v1"}, {"url": "http://h2/v1", "api_kye": "x"}]})
    error = config_error(write(tmp_path, data))
    assert error.path == "models[1].backends[1].api_kye"
    assert "unknown key" in error.problem
    assert str(error).startswith(f"{tmp_path / 'lumen.yaml'}: models[1].backends[1].api_kye: unknown key")


def test_an_unset_variable_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUMEN_TEST_SURELY_UNSET", raising=False)
    data = minimal()
    data["models"][0]["backends"][0]["api_key"] = "${LUMEN_TEST_SURELY_UNSET}"
    error = config_error(write(tmp_path, data))
    assert error.path == "models[0].backends[0].api_key"
    assert "LUMEN_TEST_SURELY_UNSET" in error.problem and "not set" in error.problem


def test_admin_commands_may_leave_variables_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUMEN_TEST_SURELY_UNSET", raising=False)
    data = minimal()
    data["models"][0]["backends"][0]["api_key"] = "${LUMEN_TEST_SURELY_UNSET}"
    config = load_config(write(tmp_path, data), require_env=False)
    assert config.models[0].backends[0].api_key == "${LUMEN_TEST_SURELY_UNSET}"


def test_duplicate_model_names(tmp_path: Path) -> None:
    data = minimal()
    data["models"].append(copy.deepcopy(data["models"][0]))
    error = config_error(write(tmp_path, data))
    assert error.path == "models[1].name"
    assert "duplicate" in error.problem and "gpt-4o" in error.problem


def test_invalid_yaml_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "database: lumen.db\nmodels:\n  - name: [gpt-4o\n    backends: []\n")
    error = config_error(path)
    assert re.search(r"line \d+, column \d+", error.problem)


def test_tabs_in_yaml_give_line_and_column(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, "database: lumen.db\nmodels:\n\t- name: x\n"))
    assert "line 3, column 1" in error.problem


def test_a_missing_file(tmp_path: Path) -> None:
    error = config_error(tmp_path / "nope.yaml")
    assert "cannot read" in error.problem


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set ``a.b[0].c`` in data (a fresh copy) to value; ``...`` as value deletes the key."""
    data = copy.deepcopy(data)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
    node: Any = data
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
    last = parts[-1]
    key: Any = int(last[1:-1]) if last.startswith("[") else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return data


@pytest.mark.parametrize(
    ("where", "value", "path", "problem"),
    [
        ("listen.port", "eighty", "listen.port", "must be an integer"),
        ("listen.port", 80.5, "listen.port", "must be an integer"),
        ("listen", "127.0.0.1:8080", "listen", "must be a mapping"),
        ("database", 42, "database", "must be a non-empty string"),
        ("database", ..., "database", "is required"),
        ("models", ..., "models", "non-empty list"),
        ("models", [], "models", "non-empty list"),
        ("models", {"name": "gpt-4o"}, "models", "non-empty list"),
        ("models[0].name", ..., "models[0].name", "is required"),
        ("models[0].name", ["gpt-4o"], "models[0].name", "must be a non-empty string"),
        ("models[0].backends", [], "models[0].backends", "non-empty list"),
        ("models[0].backends", "http://h/v1", "models[0].backends", "non-empty list"),
        ("models[0].backends[0].url", ..., "models[0].backends[0].url", "is required"),
        ("models[0].backends[0].url", "api.openai.com/v1", "models[0].backends[0].url", "http://"),
        ("models[0].backends[0].stream_usage", "yes", "models[0].backends[0].stream_usage", "true or false"),
        ("models[0].price", {"prompt": "cheap"}, "models[0].price.prompt", "must be a number"),
        ("models[0].price", {"prompt": -1}, "models[0].price.prompt", ">= 0"),
        ("models[0].price", {"prompt": 0.0000001}, "models[0].price.prompt", "6 decimals"),
        ("models[0].max_output_tokens", 0, "models[0].max_output_tokens", ">= 1"),
        ("timeouts", {"first_byte": "5m"}, "timeouts.first_byte", "must be a number"),
        ("circuit_breaker", {"failures": 0}, "circuit_breaker.failures", ">= 1"),
        ("limits", {"rpm": True}, "limits.rpm", "must be an integer"),
        ("limits", {"rpm": -5}, "limits.rpm", ">= 0"),
        ("max_body_mb", "32MB", "max_body_mb", "must be a number"),
        ("log_prompts", "no", "log_prompts", "true or false"),
        ("models[0].backends[0].headers", {"Authorization": "Bearer x"}, "models[0].backends[0].headers.Authorization",
         "set by Lumen"),
        ("models[0].backends[0].headers", {"X-A": "one\ntwo"}, "models[0].backends[0].headers.X-A", "one line"),
        ("models[0].backends[0].headers", {"bad name": "x"}, "models[0].backends[0].headers.bad name", "header name"),
        ("models[0].backends[0].headers", ["X-A"], "models[0].backends[0].headers", "mapping"),
        ("models[0].backends[0].max_tokens_field", "n_predict", "models[0].backends[0].max_tokens_field", "one of"),
        ("models[0].part_tokens", {"image": -1}, "models[0].part_tokens.image", ">= 0"),
        ("models[0].max_body_mb", 0, "models[0].max_body_mb", ">= 0.001"),
        ("timeouts", {"request_body": 0}, "timeouts.request_body", ">= 0.001"),
        ("max_connections", 0, "max_connections", ">= 1"),
    ],
)
def test_bad_values_name_the_key_path(tmp_path: Path, where: str, value: Any, path: str, problem: str) -> None:
    error = config_error(write(tmp_path, _set(minimal(), where, value)))
    assert error.path == path
    assert problem in error.problem


def test_a_document_that_is_not_a_mapping(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, "- database: lumen.db\n"))
    assert "must be a mapping" in error.problem


def test_an_empty_file(tmp_path: Path) -> None:
    error = config_error(write(tmp_path, ""))
    assert error.path == "database" and "is required" in error.problem


# ---- through the real command ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("database: x.db\nmodles: []\n", "modles: unknown key", id="typo"),
        pytest.param("database: x.db\nmodels:\n  - name: [a\n", "line ", id="yaml-syntax"),
        pytest.param("database: x.db\nmodels:\n  - name: a\n    backends:\n      - url: http://h/v1\n"
                     "        api_key: ${LUMEN_TEST_SURELY_UNSET}\n",
                     "models[0].backends[0].api_key: environment variable LUMEN_TEST_SURELY_UNSET is not set",
                     id="unset-var"),
    ],
)
def test_serve_with_a_bad_config_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.delenv("LUMEN_TEST_SURELY_UNSET", raising=False)
    path = write(tmp_path, text, "bad.yaml")
    result = cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_serve_with_a_missing_config_exits_2(tmp_path: Path) -> None:
    result = cli("serve", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "missing.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_lumen_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "database: x.db\nmodels: nope\n", "from-env.yaml")
    result = cli("serve", env={"LUMEN_CONFIG": str(path)})
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert f"{path}: models: must be a non-empty list" in result.stderr


# ---- config.example.yaml ----


def example() -> dict[str, Any]:
    if not EXAMPLE.is_file():
        pytest.skip("config.example.yaml does not exist yet (the lead writes it)")
    data: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return data


def test_every_key_in_the_example_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    data = example()
    for var in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", EXAMPLE.read_text())):
        monkeypatch.setenv(var, f"value-of-{var}")
    config = load_config(EXAMPLE)
    assert [m.name for m in config.models] == [m["name"] for m in data["models"]]
    assert config.database == EXAMPLE.parent / data["database"]


FREE_FORM = ("models[].backends[].headers", "portal.oidc.groups")  # keys are the admin's (header or group names)


def _mappings(node: Any, path: str = "") -> list[tuple[str, str, dict[str, Any]]]:
    """(general path like models[].price, concrete path like models[0].price, mapping) for every mapping."""
    found: list[tuple[str, str, dict[str, Any]]] = []
    if isinstance(node, dict) and re.sub(r"\[\d+\]", "[]", path) not in FREE_FORM:
        found.append((re.sub(r"\[\d+\]", "[]", path), path, node))
        for key, value in node.items():
            found += _mappings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _mappings(item, f"{path}[{i}]")
    return found


def test_the_example_documents_every_key_the_parser_accepts(tmp_path: Path) -> None:
    """Put a typo at each level of the example; the error lists what that level allows."""
    data = example()
    documented: dict[str, set[str]] = {}
    first: dict[str, str] = {}
    for general, concrete, mapping in _mappings(data):
        documented.setdefault(general, set()).update(mapping)
        first.setdefault(general, concrete)
    for general, concrete in first.items():
        typo = f"{concrete}.zz_typo" if concrete else "zz_typo"
        path = write(tmp_path, _set(data, typo, 1))
        with pytest.raises(ConfigError) as caught:
            load_config(path, require_env=False)
        assert caught.value.path == typo
        allowed = re.search(r"allowed here: ([^)]*)\)", caught.value.problem)
        assert allowed is not None, caught.value.problem
        missing = {k.strip() for k in allowed.group(1).split(",")} - documented[general]
        assert not missing, f"config.example.yaml does not show {sorted(missing)} under {general or 'the top'}"


def test_backend_labels_never_carry_credentials(tmp_path: Path) -> None:
    """Labels name backends in logs, /healthz (no key needed) and /metrics: no user, password or query."""
    data = {"database": "x.db", "models": [{"name": "m", "backends": [
        {"url": "https://svc:hunter2@llm.internal:8443/v1?api-key=abc"}, {"url": "builtin:echo"}]}]}
    config = parse_config(data, str(tmp_path / "lumen.yaml"), tmp_path)
    assert [b.label for b in config.models[0].backends] == ["https://llm.internal:8443/v1", "builtin:echo"]
    assert config.models[0].backends[0].url.startswith("https://svc:hunter2@")  # still used to connect


def test_check_validates_the_config_without_starting(tmp_path: Path) -> None:
    """`lumen-proxy check` before `systemctl reload`: exit 0 and a summary, or exit 2 and the one line."""
    good = tmp_path / "good.yaml"
    good.write_text("database: lumen.db\nmodels:\n  - name: echo\n    backends: [{url: 'builtin:echo'}]\n")
    done = cli("check", config=good)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"{good}: ok (1 models: echo; database {tmp_path / 'lumen.db'}; "
                                   "portal http://127.0.0.1:8080/ with sign-in links)")
    assert json.loads(cli("check", "--json", config=good).stdout)["models"] == ["echo"]
    assert not (tmp_path / "lumen.db").exists()  # nothing was started or created
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text(good.read_text() + "timezone: Europe/Berlin\ndefault_group: students\n"
                       "groups: [{name: students, allowance: {coins: 100, every: month}}, {name: staff}]\n")
    done = cli("check", config=grouped)
    assert "2 groups: students (default), staff, periods in Europe/Berlin" in done.stdout
    summary = json.loads(cli("check", "--json", config=grouped).stdout)
    assert (summary["groups"], summary["default_group"], summary["timezone"]) == (
        ["students", "staff"], "students", "Europe/Berlin")
    for bad_groups, problem in [("timezone: Mars/Olympus\n", "unknown time zone"),
                                ("default_group: nobody\n", "no group named 'nobody'"),
                                ("groups: [{name: a, models: [gpt-9]}]\n", "no model named 'gpt-9'"),
                                ("groups: [{name: a, allowance: {coins: 1, every: year}}]\n", "must be one of day"),
                                ("groups: [{name: a}, {name: a}]\n", "duplicate group name")]:
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(good.read_text() + bad_groups)
        done = cli("check", config=wrong)
        assert done.returncode == 2 and problem in done.stderr, (bad_groups, done.stderr)

    bad = tmp_path / "bad.yaml"
    bad.write_text("database: lumen.db\nmodels:\n  - name: echo\n    backend: [{url: 'builtin:echo'}]\n")
    done = cli("check", config=bad)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"lumen-proxy: {bad}: models[0].backend: unknown key (allowed here: backends, limits, max_body_mb, "
        "max_output_tokens, name, owned_by, part_tokens, price)"
    ]
