import faulthandler

from distgen.cli import main

if __name__ == "__main__":
    # A native crash (a kernel's segfault, an abort in a collective's library) prints every thread's Python stack
    # to stderr, into the job's log, rather than only the launcher's "exitcode -11".
    faulthandler.enable(all_threads=True)
    raise SystemExit(main())
