"""Only the compiled part of the build; all metadata lives in pyproject.toml.

setuptools has no pyproject.toml key for cffi's `cffi_modules`, hence this file. The
extensions are optional (see blocktarget/_uring_build.py, _pmem_build.py,
_fastpath_build.py, _tls_build.py): without liburing-dev or libpmem-dev the install still
succeeds and the bdev explains at create time what is missing; without a compiler the
NVMe/TCP C lane is absent and every command takes the Python path; without libssl-dev a
secure listener (TLS) is refused, saying why.
"""

from setuptools import setup

setup(cffi_modules=["blocktarget/_uring_build.py:ffibuilder", "blocktarget/_pmem_build.py:ffibuilder",
                   "blocktarget/_fastpath_build.py:ffibuilder",
                   "blocktarget/_tls_build.py:ffibuilder"])
