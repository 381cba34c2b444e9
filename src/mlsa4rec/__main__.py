"""``python -m mlsa4rec``: the command line, and the program every torchrun rank runs.

A rank's work is over when ``main`` returns: its run is published (or its error printed) and every
rank has left the process group. It then ends with ``os._exit``, after flushing its streams and
logs, rather than through the interpreter's finalization: the process group's C++ threads can
still be torn down there, and on a loaded machine that was seen to abort ("terminate called
without an active exception") after a finished run, which turned a good run into a failed launch.
"""

import sys

from mlsa4rec.cli import main

if __name__ == "__main__":
    code = main()
    from mlsa4rec.runtime import exit_rank, launched_by_torchrun

    if launched_by_torchrun():
        exit_rank(code)
    sys.exit(code)
