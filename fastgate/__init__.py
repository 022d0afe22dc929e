"""fastgate: an API gateway and reverse proxy with a compiled hot path.

The package root stays light: it names the version and the two error kinds. The configuration
lives in `fastgate.config`, the command line in `fastgate.cli`.
"""

from fastgate.errors import ConfigError, HttpError

__version__ = "0.1.0"

__all__ = ["ConfigError", "HttpError", "__version__"]
