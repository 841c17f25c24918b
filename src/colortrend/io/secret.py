"""The per-output secret of ``privacy.hash_paths``: photo ids and stored path hashes are HMACs keyed with it.

An unkeyed hash of a path can be confirmed by anyone who guesses the path (hash it, compare); an HMAC cannot
without the key. The key is 32 random bytes created once, when the first run with ``hash_paths`` starts on an
empty output, stored at ``OUTPUT/_secret.key`` (mode 0600 on a local disk; on an object store, the bucket's access
rules apply) and never printed or recorded anywhere else. Share the tables, not that file.
"""
from __future__ import annotations

import os
import secrets

from colortrend.errors import ConfigError

KEY_NAME = "_secret.key"
KEY_BYTES = 32


def output_key(store, hash_paths: bool, create: bool = False) -> bytes | None:
    """The output's key (None without ``hash_paths``). Without a key yet: created with ``create`` (call it under
    the run's lock), else a throwaway one (nothing is committed, so any key plans the same work).

    Photo ids decide which photos are done, so an output keeps the ids it was written with: switching
    ``hash_paths`` on or off for an output that has commits would analyse every photo again under new ids next
    to the old rows; that is refused with one line.
    """
    key = _read(store)
    committed = store.has_commits()
    if not hash_paths:
        if key is not None and committed:
            raise ConfigError(f"privacy.hash_paths: {store.url} was written with hash_paths: true (its photo ids are "
                              "keyed); set it again, or write to a new output")
        return None
    if key is not None and len(key) == KEY_BYTES:
        return key
    if committed:
        raise ConfigError(
            f"privacy.hash_paths: {store.url} holds photos committed without keyed photo ids, which would all be "
            "analysed again under new ids; write to a new output" if key is None else
            f"privacy.hash_paths: {store.uri(KEY_NAME)} is damaged ({len(key)} bytes, not {KEY_BYTES}); restore it "
            "from a backup (the committed photo ids depend on it)")
    # None, or cut short by a crash while it was created (nothing committed under it): a new one
    return _create(store) if create else secrets.token_bytes(KEY_BYTES)


def _read(store) -> bytes | None:
    try:
        return store.fs.cat_file(store.path(KEY_NAME))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"privacy.hash_paths: cannot read {store.uri(KEY_NAME)} ({exc.strerror or exc})") from None


def _create(store) -> bytes:
    key = secrets.token_bytes(KEY_BYTES)
    if not store.local:
        store.fs.pipe_file(store.path(KEY_NAME), key)  # one PUT: whole or absent
        return key
    # 0600 from the first byte, whatever the umask; a crash before the write leaves a short file, replaced above.
    fd = os.open(store.path(KEY_NAME), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key
