"""`python -m tests.helpers.process_facts`: what a command's process starts with, as JSON on stdout, for the test
that compares a forked command with a new interpreter (tests/helpers/commands.py)."""

import json
import multiprocessing
import os
import signal
import sys

if __name__ == "__main__":
    facts = {
        "multiprocessing start method": multiprocessing.get_start_method(allow_none=True),
        "arguments": sys.orig_argv[1:],
        "sys.argv": sys.argv[1:],
        "working folder": os.getcwd(),
        "first on sys.path": sys.path[0],
        "Ctrl-C": getattr(signal.getsignal(signal.SIGINT), "__name__", str(signal.getsignal(signal.SIGINT))),
        "blocked signals": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "standard input": sys.stdin.read(),
    }
    print(json.dumps(facts))
