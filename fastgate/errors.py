"""The two error kinds that cross module boundaries: bad configuration and bad HTTP input."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration value is invalid; `path` names the key (e.g. `routes[0].service`).

    One error may carry several problems: `errors` lists every (path, reason) pair, and the
    message has one `path: reason` line per pair. `path`/`reason` are those of the first.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason
        self.errors: list[tuple[str, str]] = [(path, reason)]

    @classmethod
    def from_errors(cls, errors: list[tuple[str, str]]) -> ConfigError:
        """One ConfigError listing several problems (at least one)."""
        exc = cls(*errors[0])
        exc.errors = list(errors)
        exc.args = ("\n".join(f"{p}: {r}" if p else r for p, r in errors),)
        return exc

    def lines(self) -> list[str]:
        """Each problem as `path: reason`, for printing."""
        return [f"{p}: {r}" if p else r for p, r in self.errors]


class HttpError(Exception):
    """Input that must be answered with `status` and a closed connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
