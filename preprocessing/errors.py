"""The one kind of error a user fixes rather than a developer: a parameter, a dataset folder, a missing input.

Commands print an ``InputError`` as one line (``hicmae: error: <file>: <key or what>: <problem>``) and exit
non-zero; any other exception is a bug and keeps its traceback.
"""


class InputError(Exception):
    """Something the user must fix; its message names the file and the problem."""
