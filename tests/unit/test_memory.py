"""proxy.memory: the malloc thresholds that keep large read buffers in the heap."""

import ctypes
import ctypes.util
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.memory import keep_read_buffers

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                                reason="glibc's mallopt only")

# In a fresh interpreter: how many mmap-ed chunks a 512 KiB buffer adds (mallinfo2().hblks),
# with or without keep_read_buffers() first. glibc's default mmap threshold is 128 KiB.
_MMAPPED_CHUNKS = """
import ctypes, ctypes.util, sys
from proxy.memory import keep_read_buffers
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_read_buffers() is True
before = libc.mallinfo2().hblks
buffer = bytearray(512 * 1024)
print(libc.mallinfo2().hblks - before)
"""


def _mmapped_chunks(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _MMAPPED_CHUNKS, mode], capture_output=True, text=True,
                         timeout=30, check=True, cwd=Path(__file__).resolve().parents[2])
    return int(out.stdout)


@glibc_only
def test_thresholds_are_accepted_by_glibc_and_setting_them_twice_is_harmless():
    assert keep_read_buffers() is True
    assert keep_read_buffers() is True


@glibc_only
@pytest.mark.skipif(ctypes.util.find_library("c") is None
                    or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
                    reason="mallinfo2 needs glibc 2.33+")
def test_a_read_sized_buffer_comes_from_the_heap_not_from_mmap():
    """mallopt returns 1 even for a parameter glibc does not know: the effect is what
    proves the thresholds took."""
    assert _mmapped_chunks("default") == 1
    assert _mmapped_chunks("keep") == 0
