import atexit
import faulthandler
import os
import sys

from distgen.cli import main

if __name__ == "__main__":
    # A native crash (a kernel's segfault, an abort in a collective's library) prints every thread's Python stack
    # to stderr, into the job's log, rather than only the launcher's "exitcode -11".
    faulthandler.enable(all_threads=True)
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One rank of several: the command is over and has left its process group (cli.main's finally). The
        # interpreter's own teardown after that was still seen to abort a rank that had written its output
        # ("terminate called without an active exception", exit -6, no Python frame left: a gloo thread's objects
        # freed as the interpreter went), failing the whole launch. Python's exit handlers run (logging,
        # trackers, worker processes), then the process ends without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    raise SystemExit(code)
