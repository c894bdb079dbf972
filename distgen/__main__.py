import faulthandler
import os

from distgen.cli import main

if __name__ == "__main__":
    # A native crash (a kernel's segfault, an abort in a collective's library) prints every thread's Python stack
    # to stderr, into the job's log, rather than only the launcher's "exitcode -11".
    faulthandler.enable(all_threads=True)
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of several: without the interpreter's teardown
        from distgen import dist

        dist.end_rank(code if isinstance(code, int) else 1)
    raise SystemExit(code)
