"""Domain errors of the serving core. They carry no transport codes: `guard` maps them once.

    ServingError                 a request the server refuses, with a message saying what to fix
    ├── InvalidInput             the request itself is wrong             -> INVALID_ARGUMENT
    ├── ModelNotFound            no such model or version               -> NOT_FOUND
    ├── RegionNotFound           no such shared-memory region            -> NOT_FOUND
    ├── AlreadyExists            a name taken already (a region)         -> ALREADY_EXISTS
    ├── ModelNotReady            known, but not loaded or failed to load -> UNAVAILABLE
    ├── Overloaded               no room to take the request now         -> RESOURCE_EXHAUSTED
    ├── DeadlineExceeded         the caller's deadline passed before the run -> DEADLINE_EXCEEDED
    ├── NotAllowed               the caller may not do this here          -> PERMISSION_DENIED
    └── Unsupported              an RPC or feature nnserve does not offer -> UNIMPLEMENTED

`nnserve_contract.codec.TensorError` (a tensor whose bytes, shape and type disagree) maps to
INVALID_ARGUMENT too. Anything else is a bug: INTERNAL with a fixed message, traceback in the log.
"""

from __future__ import annotations


class ServingError(Exception):
    pass


class InvalidInput(ServingError):
    pass


class ModelNotFound(ServingError):
    pass


class RegionNotFound(ServingError):
    pass


class AlreadyExists(ServingError):
    pass


class ModelNotReady(ServingError):
    pass


class Overloaded(ServingError):
    pass


class DeadlineExceeded(ServingError):
    pass


class NotAllowed(ServingError):
    pass


class Unsupported(ServingError):
    pass


class StartupError(Exception):
    """The server cannot start as configured (a missing provider, an unreadable repository)."""
