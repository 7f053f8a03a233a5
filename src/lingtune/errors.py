"""What lingtune raises for bad input: one base class, a kind per area.

The CLI turns a `LingtuneError` (and only that) into one line, `error: <message>`, and exit status 2:
the message must say what is wrong and what to do. Anything else is a bug and keeps its traceback.
The kinds also subclass the builtin a caller would expect (ValueError for bad values, RuntimeError
for a step that could not run), so library users can catch either.
"""

from __future__ import annotations


class LingtuneError(Exception):
    """Bad input or state a user can fix: params, data files, model folders, registry, endpoints."""


class ConfigError(LingtuneError, ValueError):
    """params.yaml is missing, unreadable, or holds an unknown key or a bad value."""


class DataError(LingtuneError, ValueError):
    """A data file, corpus or split is unusable; the message names the file (and line)."""


class FormatError(DataError):
    """A record is not in the neutral format; the message names the file and line."""


class ModelError(LingtuneError, ValueError):
    """A model reference names nothing usable: no model or adapter there, a missing base, a bad template."""


class RegistryError(ModelError):
    """A `models:/` URI that is malformed, or a registry that cannot answer (a locked or broken store,
    a schema to migrate, a server error). Never a reason to serve something else."""


class RegistryMissing(RegistryError):
    """The registry store, or the registered model, alias or version a URI names, does not exist: the
    one registry error that may be answered with `serve.fallback_model`."""


class StageError(LingtuneError, RuntimeError):
    """A pipeline stage cannot run or produced something unusable (e.g. a non-finite loss)."""


class JudgeError(LingtuneError, RuntimeError):
    """The judge could not score (endpoint unreachable after retries, missing key, HTTP error)."""
