"""System shared memory (the KServe v2 / Triton extension): regions of POSIX shared-memory objects that
clients beside the server register once, so big tensors pass without being copied through gRPC.

A region is mapped at registration and read in place: an input is a view of the mapping, an output is
written into it. The object must stay at least as large as the region while it is registered; each
use checks the object's size first, so one that shrank is refused (a client that truncates it during
a request is reading its own answer out of a hole; the check makes that window one request wide).

Off by default (`--shared-memory`): a caller maps objects of the server's user, reads them and has
outputs written into them. A registration may name only objects that match the operator's patterns
(`--shared-memory-keys`) and that the server's user owns, and all regions together span at most
`--shared-memory-max-mb`.

Regions are per process. Unregistering a region that requests are using takes it out of the registry
at once (a new request naming it gets NOT_FOUND); its mapping goes when the last of those requests
is done.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import mmap
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nnserve_server.core.errors import AlreadyExists, InvalidInput, NotAllowed, Overloaded, RegionNotFound

log = logging.getLogger(__name__)

SHM_DIRECTORY = Path("/dev/shm")  # where Linux keeps POSIX shared-memory objects (shm_open's namespace)
MAX_REGIONS = 256
# A POSIX shared-memory name: one path component after an optional leading slash (no '..', no '/').
_KEY = re.compile(r"/?(?!\.\.?$)[A-Za-z0-9_.\-]{1,250}")
_NAME = re.compile(r"[^\x00-\x1f]{1,256}")


@dataclass(eq=False)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    _mapping: mmap.mmap
    _start: int  # where the region begins inside the mapping (the mapping starts on a page boundary)
    users: int = 0
    retired: bool = False

    def slice(self, offset: int, byte_size: int, what: str) -> memoryview:
        """`byte_size` bytes at `offset` into the region, in place; refused unless they lie inside it."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidInput(
                f"{what}: {byte_size} bytes at offset {offset} do not fit in shared-memory region "
                f"'{self.name}' ({self.byte_size} bytes)"
            )
        needed = self.offset + self.byte_size
        size = self._mapping.size()
        if size < needed:
            raise InvalidInput(
                f"{what}: the shared-memory object '{self.key}' of region '{self.name}' has shrunk to {size} "
                f"bytes, below the {needed} the region was registered with; register it again"
            )
        start = self._start + offset
        return memoryview(self._mapping)[start : start + byte_size]

    def close(self) -> None:
        try:
            self._mapping.close()
        except BufferError:
            # An array made from the mapping outlives its request (a traceback holding it, say):
            # the mapping goes with that last reference instead.
            log.debug("shared-memory region '%s' is still viewed; its mapping goes with the last view", self.name)


class SharedMemoryRegions:
    """The regions registered with this process, by name."""

    def __init__(
        self,
        directory: Path = SHM_DIRECTORY,
        limit: int = MAX_REGIONS,
        patterns: tuple[str, ...] = ("*",),
        max_bytes: int = 1 << 30,
    ) -> None:
        self._directory = directory
        self._limit = limit
        self._patterns = patterns  # of the object names (no leading '/') a caller may register
        self._max_bytes = max_bytes
        self._regions: dict[str, Region] = {}

    def _spanned(self) -> int:
        return sum(region.byte_size for region in self._regions.values())

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not _NAME.fullmatch(name):
            raise InvalidInput("a shared-memory region needs a name of 1 to 256 printable characters")
        if name in self._regions:
            raise AlreadyExists(
                f"shared-memory region '{name}' is already registered; unregister it first or pick another name"
            )
        if not _KEY.fullmatch(key):
            raise InvalidInput(
                f"key {key!r} is not a POSIX shared-memory name: use '/name' (letters, digits, '_', '.', '-'), "
                "as shm_open and tritonclient.utils.shared_memory take it"
            )
        if byte_size <= 0 or offset < 0:
            raise InvalidInput(f"shared-memory region '{name}' needs a byte_size above 0 and an offset of 0 or more")
        if not any(fnmatch.fnmatchcase(key.lstrip("/"), pattern) for pattern in self._patterns):
            raise NotAllowed(
                f"shared-memory object '{key}' is not one this server maps: the operator allows "
                f"{list(self._patterns)} (--shared-memory-keys)"
            )
        if len(self._regions) >= self._limit:
            raise Overloaded(f"{self._limit} shared-memory regions are registered, the most this server keeps")
        spanned = self._spanned()
        if byte_size > self._max_bytes - spanned:
            raise Overloaded(
                f"shared-memory region '{name}' of {byte_size} bytes does not fit: registered regions span "
                f"{spanned} of the {self._max_bytes} bytes allowed (--shared-memory-max-mb)"
            )
        self._regions[name] = self._map(name, key, offset, byte_size)
        log.info("registered shared-memory region '%s' (%s, %d bytes at offset %d)", name, key, byte_size, offset)

    def _map(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        path = self._directory / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidInput(f"no shared-memory object is named '{key}'; create it (shm_open) first") from None
        except OSError as error:
            raise InvalidInput(f"cannot open the shared-memory object '{key}': {error.strerror}") from None
        try:
            stat = os.fstat(fd)
            if stat.st_uid != os.geteuid():  # never read or write another user's memory, however its mode
                raise NotAllowed(f"shared-memory object '{key}' belongs to uid {stat.st_uid}, not this server's user")
            size = stat.st_size
            if offset > size or byte_size > size - offset:
                raise InvalidInput(
                    f"shared-memory region '{name}' ({byte_size} bytes at offset {offset}) runs past the end of "
                    f"the object '{key}' ({size} bytes)"
                )
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                mapping = mmap.mmap(fd, offset + byte_size - start, offset=start)
            except (OSError, ValueError, OverflowError) as error:
                raise Overloaded(f"cannot map shared-memory region '{name}' ({byte_size} bytes): {error}") from None
        finally:
            os.close(fd)
        return Region(name, key, offset, byte_size, mapping, offset - start)

    def unregister(self, name: str) -> None:
        """Take a region (every region when `name` is empty) out of the registry; unknown names are no error,
        as in Triton, so a client may clean up unconditionally."""
        for region in list(self._regions.values()) if not name else [self._regions.get(name)]:
            if region is None:
                continue
            del self._regions[region.name]
            region.retired = True
            if not region.users:
                region.close()
            log.info("unregistered shared-memory region '%s'", region.name)

    def status(self, name: str) -> list[Region]:
        if not name:
            return list(self._regions.values())
        return [self._get(name)]

    def _get(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"no shared-memory region is registered as '{name}'; register it first")
        return region

    @contextlib.contextmanager
    def using(self, names: Iterable[str]) -> Iterator[dict[str, Region]]:
        """The named regions, held for one request: an unregister meanwhile leaves their mappings until it ends."""
        held: dict[str, Region] = {}
        try:
            for name in names:
                if name not in held:
                    region = self._get(name)
                    region.users += 1
                    held[name] = region
            yield held
        finally:
            for region in held.values():
                region.users -= 1
                if region.retired and not region.users:
                    region.close()

    def close(self) -> None:
        self.unregister("")
