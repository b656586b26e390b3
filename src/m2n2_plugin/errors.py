"""The one exception type users see as a one-line error."""


class M2N2Error(Exception):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``m2n2: error: <message>`` and exits non-zero, without a traceback.
    """
