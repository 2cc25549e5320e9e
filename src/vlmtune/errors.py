"""The one exception type users see.

Every problem caused by the user's input (a bad YAML key, a missing image, a malformed record) is
raised as :class:`VlmtuneError` with a message that names the file, record and field. The CLI turns
it into a one-line ``error: ...`` and exit code 1, never a Python traceback.
"""


class VlmtuneError(Exception):
    """A user-facing error: its message is printed as one line and the command exits with 1."""


def where(file: str | None = None, record: int | None = None, field: str | None = None) -> str:
    """Format a location as ``file: record 3: field 'images'`` (parts that are None are left out)."""
    parts = []
    if file is not None:
        parts.append(str(file))
    if record is not None:
        parts.append(f"record {record}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ": ".join(parts)


def brief(exc: BaseException, limit: int = 200) -> str:
    """A library exception's message for a one-line error: its lines joined (a message that continues on its next
    line — "... from one of:" and a list — is not cut there), cut at `limit` characters; its class name when it
    has no message."""
    text = " ".join(str(exc).split())
    if not text:
        return exc.__class__.__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
