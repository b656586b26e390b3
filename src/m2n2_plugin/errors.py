"""The exception types of the package: plain exceptions, turned into one line only by a CLI."""

from __future__ import annotations


class M2N2Error(Exception):
    """A problem with the user's input or environment, explained in one line.

    Library code raises it and nothing else decides how it is shown: the ``m2n2`` CLI prints
    ``m2n2: error: <message>`` and exits non-zero, and the mergekit method re-raises it as the
    click exception that ``mergekit-yaml`` prints as ``Error: m2n2: <message>``.
    """


class M2N2ConfigError(M2N2Error):
    """A merge that cannot be done as asked: bad parameters, wrong inputs, unequal parents.

    Deliberately not a ``ValueError``: pydantic turns a ``ValueError`` raised in a mergekit
    parameter validator into a multi-line ``ValidationError``.
    """
