"""The allocator setting applies on Linux with glibc (the CI machine); elsewhere it is a no-op."""

import platform

from lightopd.memory import release_freed_memory


def test_release_freed_memory_applies_on_glibc():
    applied = release_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
