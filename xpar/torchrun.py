"""`python -m xpar.torchrun [torchrun arguments]`: torchrun (`torch.distributed.run`, in this
process, so its signal handling is torchrun's own), except that a job its workers refused for
bad input ends as one job run in one process does: the workers' `xpar: error:` line last, after
torchrun's failure report, and exit code 2 (torchrun's own is 1 for any failed worker).
launch/torchrun.sh runs it.

The workers find the file to write that line to in XPAR_ERROR_FILE (xpar.train's `fail`); they
also write it to torchrun's per-worker error file, so that plain torchrun shows it as the root
cause.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

from torch.distributed.run import main as torchrun_main

BAD_INPUT = 2


def main(argv: list[str]) -> int:
    fd, name = tempfile.mkstemp(prefix="xpar-errors-", suffix=".txt")
    os.close(fd)
    errors = Path(name)
    os.environ["XPAR_ERROR_FILE"] = str(errors)  # the workers inherit torchrun's environment
    try:
        torchrun_main(argv)
        return 0
    except SystemExit as e:  # torchrun's own argument errors
        code = e.code if isinstance(e.code, int) else 1
    except Exception:  # ChildFailedError (its report of every failed worker), rendezvous errors
        traceback.print_exc()
        code = 1
    finally:
        lines = errors.read_text().splitlines() if errors.is_file() else []
        errors.unlink(missing_ok=True)
    if lines and code:
        sys.stderr.write(lines[0] + "\n")
        return BAD_INPUT
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
