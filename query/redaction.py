"""The one redaction helper: secrets out of every line the process writes.

It sits in the bottom layer so every layer can use it: the storage URL is parsed here, and the composition
root installs `Redactor` on the logging handlers and runs the ready line and start-up errors through it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"


def redact_url(url: str) -> str:
    """`scheme://user:***@host/...`: the password in a URL's userinfo, masked; anything else unchanged."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return MASK if "@" in url else url
    if password is None:
        return url
    userinfo = parts.netloc.rpartition("@")[0]
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{parts.netloc.rpartition('@')[2]}"))


def url_secrets(url: str) -> list[str]:
    """The password in a URL, both as written and percent-decoded (either may end up in a message)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    if not password:
        return []
    return [password, unquote(password)]


class Redactor(logging.Filter):
    """Masks known secret strings in text, and in every log record that passes through a handler it filters."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Longest first, so a secret containing another is masked whole. Very short strings would mask
        # innocent text everywhere and protect nothing, so they are left to the operator.
        self._secrets = sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.msg, record.args = self(message), None
            if record.exc_text:
                record.exc_text = self(record.exc_text)
        return True

    def install(self) -> None:
        """On every handler of the root logger (filters on handlers see records from every logger)."""
        for handler in logging.getLogger().handlers:
            handler.addFilter(self)
