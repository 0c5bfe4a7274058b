"""The kernel's view of memory errors in the region: HWPOISON frames and SIGBUS notices.

* A scan finds frames of the region with the HWPOISON page flag
  (/proc/self/pagemap gives each page's frame number, /proc/kpageflags its
  flags); the daemon scans at start and on ``dmemctl scan``.
* The kernel sends SIGBUS with si_code BUS_MCEERR_AO ("action optional") for
  an address in the region.  The daemon asks for that early notice with
  prctl(PR_MCE_KILL_EARLY), blocks SIGBUS and reads it from a signalfd.

What is found goes, as dpages or region offsets, to the plain bookkeeping in
files/poison.py.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import struct
from collections.abc import Awaitable, Callable

import numpy as np
import trio

from ..libc import libc

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
KPF_HWPOISON = 19
PFN_MASK = (1 << 55) - 1
PAGE_PRESENT = 1 << 63
PAGE_SWAP = 1 << 62
SWAP_TYPE_SHIFT = 5  # MAX_SWAPFILES_SHIFT
BUS_MCEERR_AR = 4
BUS_MCEERR_AO = 5
PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY = 33, 1, 1
SYS_RT_TGSIGQUEUEINFO = 297  # x86_64
SIGNALFD_SIGINFO = 128


# -- the kernel's view: HWPOISON frames ----------------------------------------------

def hwpoisoned_dpages(addr: int, size: int, dpage_size: int,
                      pagemap: str = "/proc/self/pagemap",
                      kpageflags: str = "/proc/kpageflags") -> tuple[list[int], int]:
    """Dpages of the mapping ``[addr, addr+size)`` that hold a frame flagged HWPOISON.

    Returns the dpages (relative to *addr*) and how many frames were checked.
    Needs root (frame numbers read as 0 otherwise: PermissionError then).
    """
    pages = size // PAGE_SIZE
    chunk = 1 << 18
    bad_pages: list[np.ndarray] = []
    checked = 0
    with open(pagemap, "rb", buffering=0) as pm, open(kpageflags, "rb", buffering=0) as kf:
        for first in range(0, pages, chunk):
            count = min(chunk, pages - first)
            raw = os.pread(pm.fileno(), count * 8, (addr // PAGE_SIZE + first) * 8)
            entries = np.frombuffer(raw, dtype=np.uint64)
            present = (entries & np.uint64(PAGE_PRESENT)) != 0
            swapped = (entries & np.uint64(PAGE_SWAP)) != 0
            pfns = (entries & np.uint64(PFN_MASK)).astype(np.int64)
            if present.any() and not pfns[present].any():
                raise PermissionError(errno.EPERM, "frame numbers are hidden (needs root)")
            # memory_failure() unmaps a poisoned page and leaves a hwpoison swap entry;
            # pagemap shows it as "swapped" with type | pfn << 5.  The locked region is
            # never really swapped, so every swap entry is checked by its frame's flags.
            pfns[swapped] >>= SWAP_TYPE_SHIFT
            index = np.flatnonzero(present | swapped)
            checked += len(index)
            flags = _kpageflags(kf.fileno(), pfns[index])
            poisoned = index[(flags >> np.uint64(KPF_HWPOISON)) & np.uint64(1) != 0]
            bad_pages.append(poisoned + first)
    if not bad_pages:
        return [], 0
    pages_bad = np.concatenate(bad_pages)
    found = sorted({int(p) * PAGE_SIZE // dpage_size for p in pages_bad})
    del raw, entries, present, swapped, pfns, index, flags, poisoned, bad_pages, pages_bad
    trim_heap()
    return found, checked


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc malloc_trim).

    The scan reads 8 bytes of pagemap per 4 KiB of region in chunks of a few
    MiB.  glibc keeps those freed chunks in the heap, which left the daemon
    about 14 MiB larger for good after scanning a 16 GiB region.
    """
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _kpageflags(fd: int, pfns: np.ndarray) -> np.ndarray:
    """Flags of each frame in *pfns*, read in as few preads as contiguous frames allow."""
    out = np.zeros(len(pfns), dtype=np.uint64)
    if not len(pfns):
        return out
    order = np.argsort(pfns, kind="stable")
    sorted_pfns = pfns[order]
    # A new read wherever the next frame is more than 512 frames (4 KiB of flags) further.
    breaks = np.flatnonzero(np.diff(sorted_pfns) > 512) + 1
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(sorted_pfns)], strict=True):
        start, stop = int(sorted_pfns[lo]), int(sorted_pfns[hi - 1]) + 1
        raw = os.pread(fd, (stop - start) * 8, start * 8)
        # Frames past the kernel's max_pfn (device memory) have no flags: read as 0.
        flags = np.zeros(stop - start, dtype=np.uint64)
        flags[: len(raw) // 8] = np.frombuffer(raw, dtype=np.uint64, count=len(raw) // 8)
        out[order[lo:hi]] = flags[sorted_pfns[lo:hi] - start]
    return out


# -- the kernel's notice: SIGBUS BUS_MCEERR_AO through a signalfd --------------------

def block_sigbus() -> bool:
    """Ask for early memory-error notices and block SIGBUS, so a signalfd can take it.

    Must run before any thread starts (threads inherit the mask; an unblocked
    thread would take the signal's default action, death).  A SIGBUS from a
    fault the daemon itself takes is forced through by the kernel whatever the
    mask, and kills the daemon as it would have anyway.  Returns whether the
    kernel accepted the early-notice request.
    """
    early = bool(libc.prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0) == 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGBUS})
    return early


def open_sigbus_fd() -> int:
    """A non-blocking signalfd that yields SIGBUS (which must be blocked)."""
    mask = ctypes.create_string_buffer(128)
    struct.pack_into("<Q", mask, 0, 1 << (signal.SIGBUS - 1))
    fd = libc.signalfd(-1, mask, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"signalfd: {os.strerror(err)}")
    return int(fd)


def parse_sigbus(data: bytes) -> tuple[int, int, int]:
    """``(si_code, si_addr, si_addr_lsb)`` of one struct signalfd_siginfo.

    si_addr_lsb is the log2 of the poisoned unit: 12 for a page, 21 for a 2M
    huge page."""
    code = struct.unpack_from("<i", data, 8)[0]
    addr, lsb = struct.unpack_from("<QH", data, 72)
    return int(code), int(addr), int(lsb)


def send_mce_notice(addr: int) -> None:
    """Send this process the SIGBUS BUS_MCEERR_AO the kernel sends for poison at *addr*.

    For testing the handling on kernels without CONFIG_MEMORY_FAILURE (as the
    kernel's hwpoison-inject module does for its own path).  Only a process
    may send itself a signal with a kernel si_code.
    """
    info = ctypes.create_string_buffer(128)
    struct.pack_into("<iii", info, 0, signal.SIGBUS, 0, BUS_MCEERR_AO)
    struct.pack_into("<Qh", info, 16, addr, PAGE_SIZE.bit_length() - 1)  # si_addr, si_addr_lsb
    if libc.syscall(SYS_RT_TGSIGQUEUEINFO, os.getpid(), libc.gettid(), signal.SIGBUS,
                    info) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"rt_tgsigqueueinfo: {os.strerror(err)}")


async def watch_sigbus(fd: int, region_addr: int, region_size: int,
                       on_error: Callable[[int, int], Awaitable[None]]) -> None:
    """Read SIGBUS notices from *fd* until cancelled; hand ``(region offset, length)`` of
    each poisoned unit to *on_error*."""
    try:
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, SIGNALFD_SIGINFO)
            except BlockingIOError:
                continue
            code, addr, lsb = parse_sigbus(data)
            if code not in (BUS_MCEERR_AO, BUS_MCEERR_AR):
                log.warning("SIGBUS with code %d at %#x: not a memory-error notice", code, addr)
                continue
            if not region_addr <= addr < region_addr + region_size:
                log.warning("memory-error notice for %#x, outside the region", addr)
                continue
            unit = 1 << lsb if 0 < lsb < 64 else PAGE_SIZE
            start = max(addr & ~(unit - 1), region_addr)
            await on_error(start - region_addr, unit)
    finally:
        os.close(fd)
