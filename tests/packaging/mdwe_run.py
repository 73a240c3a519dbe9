"""Run a Python script under MemoryDenyWriteExecute's rule, enforced by the
kernel: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (Linux >= 6.3) refuses
writable+executable mappings and mprotect() adding PROT_EXEC, as systemd's
MemoryDenyWriteExecute=yes does with seccomp. The agent then runs in this
process, so its ctypes/libffi callbacks are held to that rule.

usage: python3 mdwe_run.py SCRIPT [ARGS...]
"""

import ctypes
import mmap
import runpy
import sys

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"mdwe_run: PR_SET_MDWE failed: errno {ctypes.get_errno()}")
try:  # prove the rule is in force
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("mdwe_run: a writable+executable mapping was allowed: MDWE not in force")
print("mdwe_run: PR_SET_MDWE in force", file=sys.stderr, flush=True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
