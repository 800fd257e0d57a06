"""The SQLite schema: append-only migrations, recorded by name as they run (``sqlite_store.migrate``).

Never edit or rename a shipped migration: add a new one. Opening an older database applies the
missing ones in one transaction each; a database that records a name this list lacks (or, from before
the names, a ``PRAGMA user_version`` above its length) is newer than this program and refused.
Another engine keeps its own list.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "m001_accounts_and_keys",
        """
        CREATE TABLE accounts (
            id          INTEGER PRIMARY KEY,
            name        TEXT NOT NULL UNIQUE,
            models      TEXT,                          -- JSON list of model names; NULL = all models
            enabled     INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            created_at  REAL NOT NULL
        );
        CREATE TABLE keys (
            id           INTEGER PRIMARY KEY,
            account_id   INTEGER NOT NULL REFERENCES accounts(id),
            hash         TEXT NOT NULL UNIQUE,        -- sha256 of the full key; the key itself is never stored
            prefix       TEXT NOT NULL,               -- first characters, for listing
            label        TEXT,
            created_at   REAL NOT NULL,
            last_used_at REAL,
            expires_at   REAL,
            revoked_at   REAL
        );
        CREATE INDEX keys_account ON keys(account_id);
        """,
    ),
    (
        "m002_coins_and_ledger",
        """
        ALTER TABLE accounts ADD COLUMN balance INTEGER NOT NULL DEFAULT 0;   -- micro-coins
        CREATE TABLE ledger (
            id          INTEGER PRIMARY KEY,
            account_id  INTEGER NOT NULL REFERENCES accounts(id),
            time        REAL NOT NULL,
            amount      INTEGER NOT NULL,              -- micro-coins, negative for deductions
            note        TEXT
        );
        CREATE INDEX ledger_account ON ledger(account_id);
        """,
    ),
    (
        "m003_usage_log",
        """
        CREATE TABLE usage (
            id                INTEGER PRIMARY KEY,
            request_id        TEXT NOT NULL,
            time              REAL NOT NULL,
            account_id        INTEGER REFERENCES accounts(id),
            key_id            INTEGER,
            model             TEXT,
            backend           TEXT,
            endpoint          TEXT,
            status            INTEGER NOT NULL,
            prompt_tokens     INTEGER NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
            completion_tokens INTEGER NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
            cost              INTEGER NOT NULL DEFAULT 0 CHECK (cost >= 0),   -- micro-coins
            estimated         INTEGER NOT NULL DEFAULT 0,
            partial           INTEGER NOT NULL DEFAULT 0,
            duration_ms       REAL,
            ttfb_ms           REAL,
            details           TEXT                                            -- usage details JSON
        );
        CREATE INDEX usage_time ON usage(time);
        CREATE INDEX usage_request ON usage(request_id);
        CREATE TABLE usage_daily (
            day               TEXT NOT NULL,
            account_id        INTEGER NOT NULL,
            model             TEXT NOT NULL,
            key_id            INTEGER NOT NULL,
            requests          INTEGER NOT NULL DEFAULT 0,
            errors            INTEGER NOT NULL DEFAULT 0,
            prompt_tokens     INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cost              INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, account_id, model, key_id)
        ) WITHOUT ROWID;
        """,
    ),
    (
        "m004_account_limits",
        """
        ALTER TABLE accounts ADD COLUMN rpm INTEGER CHECK (rpm >= 0);
        ALTER TABLE accounts ADD COLUMN tpm INTEGER CHECK (tpm >= 0);
        ALTER TABLE accounts ADD COLUMN concurrency INTEGER CHECK (concurrency >= 0);
        """,
    ),
    (
        "m005_usage_daily_by_account",
        """
        CREATE INDEX usage_daily_account ON usage_daily(account_id, day);
        """,
    ),
    (
        "m006_usage_capped",
        """
        ALTER TABLE usage ADD COLUMN capped INTEGER NOT NULL DEFAULT 0;   -- reported usage cut to the request's bound
        """,
    ),
    (
        "m007_heartbeat",
        """
        CREATE TABLE heartbeat (                  -- one row: a server commits it before serving (start check)
            id    INTEGER PRIMARY KEY CHECK (id = 1),
            pid   INTEGER NOT NULL,               -- the server process that last proved it could write
            time  REAL NOT NULL                   -- when (Unix time)
        );
        """,
    ),
    (
        "m008_groups_and_allowances",
        """
        ALTER TABLE accounts ADD COLUMN group_name TEXT;        -- a group of the config; NULL = none
        ALTER TABLE accounts ADD COLUMN allowance INTEGER NOT NULL DEFAULT 0 CHECK (allowance >= 0);  -- micro-coins
        ALTER TABLE accounts ADD COLUMN allowance_start REAL;   -- UTC start of the period it was granted for
        CREATE INDEX accounts_group ON accounts(group_name);
        """,
    ),
    (
        "m009_portal",
        """
        ALTER TABLE accounts ADD COLUMN email TEXT;   -- matched case-insensitively at sign-in; NULL = none
        CREATE UNIQUE INDEX accounts_email ON accounts(lower(email)) WHERE email IS NOT NULL;
        CREATE TABLE sessions (                       -- the portal's signed-in browsers
            hash        TEXT PRIMARY KEY,             -- sha256 of the session id; the id is only in the cookie
            account_id  INTEGER NOT NULL REFERENCES accounts(id),
            csrf        TEXT NOT NULL,                -- the token every state-changing form must send back
            method      TEXT NOT NULL,                -- how it signed in: oidc, header or link
            created_at  REAL NOT NULL,
            expires_at  REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX sessions_account ON sessions(account_id);
        CREATE TABLE login_links (                    -- one-time sign-in links (lumen-proxy accounts login-link)
            hash        TEXT PRIMARY KEY,             -- sha256 of the link's token
            account_id  INTEGER NOT NULL REFERENCES accounts(id),
            created_at  REAL NOT NULL,
            expires_at  REAL NOT NULL,
            used_at     REAL                          -- set once, by the sign-in that used it
        ) WITHOUT ROWID;
        CREATE INDEX usage_account_time ON usage(account_id, time);   -- the Usage page's recent requests
        """,
    ),
    (
        "m010_delegating_keys",
        """
        ALTER TABLE keys ADD COLUMN delegate INTEGER NOT NULL DEFAULT 0 CHECK (delegate IN (0, 1));
            -- 1: a shared front end's key (Open WebUI) that may act for the person its request names
        """,
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
