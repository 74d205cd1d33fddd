"""Names a request gives that the daemon logs once each: a model name it maps to another
model, a built-in tool type it does not offer. They are the client's text, so a log line
shows them escaped and cut short (a line break in one must not forge a line of the log),
and only so many are remembered (a client sending endless new names must grow neither the
daemon's memory nor its log without bound)."""

from __future__ import annotations

MAX_SHOWN = 200  # characters of a name in a log line
MAX_REMEMBERED = 1024  # names logged once each; any later new name is not logged


def shown(name: str) -> str:
    """`name` for a log line: quoted as Python quotes it (control characters escaped), cut
    after MAX_SHOWN characters."""
    return repr(name) if len(name) <= MAX_SHOWN else repr(name[:MAX_SHOWN]) + "..."


class OncePerName:
    """Which names were logged already: remembered by hash, at most `limit` of them."""

    def __init__(self, limit: int = MAX_REMEMBERED):
        self.limit = limit
        self._seen: set[int] = set()

    def first_time(self, name: str) -> bool:
        """True the first time `name` comes, while fewer than `limit` names have; False for
        any name after that (its line would be one of endless)."""
        key = hash(name)
        if key in self._seen or len(self._seen) >= self.limit:
            return False
        self._seen.add(key)
        return True
