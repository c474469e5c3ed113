"""The one exception type the CLI turns into a single line on stderr and exit status 2."""


class UserError(Exception):
    """A problem with the user's input (config, corpus, teacher, output folder) that they can fix.

    The message is one line that names the problem and how to fix it; the CLI prints it without a traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its type's name), for a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
