"""The one error class tinyllava raises for bad input, bad files and bad weights.

Command-line tools catch it, print its message as one line (naming the file and the problem) and exit with
status 2. Anything else that escapes is a bug in tinyllava, not in the user's input.
"""
import sys
from contextlib import contextmanager


class TinyLlavaError(Exception):
    """A problem with the user's input, files or weights, described in one line."""


@contextmanager
def cli_errors(prog):
    """Turn a TinyLlavaError (or Ctrl-C) into one line on stderr and exit status 2 (130 for Ctrl-C)."""
    try:
        yield
    except TinyLlavaError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
