"""proxy.memory: the malloc thresholds that keep large read buffers in the heap."""

import ctypes.util
import sys

import pytest

from proxy.memory import keep_read_buffers


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc's mallopt only")
def test_thresholds_are_accepted_by_glibc_and_setting_them_twice_is_harmless():
    assert keep_read_buffers() is True
    assert keep_read_buffers() is True
