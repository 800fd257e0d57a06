"""The portal: sign-in (OpenID Connect, a trusted proxy header, one-time links), sessions, and the
pages where people manage their own keys and read their own usage.

Nothing is imported here, so :mod:`config` can read :mod:`.settings` without the web side.
"""
