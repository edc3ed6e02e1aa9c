"""The one kind of error a user fixes rather than a developer: a parameter, a dataset folder, a missing input.

Commands print an ``InputError`` as one line (``hicmae: error: <file>: <key or what>: <problem>``) and exit
non-zero; any other exception is a bug and keeps its traceback. Work stopped on request (``Interrupted``) is not
an error either: one line says how to continue it.
"""


class InputError(Exception):
    """Something the user must fix; its message names the file and the problem."""


class Interrupted(Exception):
    """Work that stopped on request (SIGTERM, Ctrl-C) with what it had done saved, so that the same command
    continues it; its message says where it stopped. Commands print it as one line and exit ``EXIT_STATUS``."""

    EXIT_STATUS = 75  # EX_TEMPFAIL: a temporary failure, to be tried again
