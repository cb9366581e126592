"""Errors that a user can fix; the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class MecqtkError(Exception):
    """Base class for every error caused by user input (recipe, model name, data, files).

    The message must be one line that says what is wrong and how to fix it; the CLI prints
    ``error: <message>`` on stderr and exits with code 2, without a traceback.
    """

    exit_code = 2


class RecipeError(MecqtkError):
    """A recipe key is unknown, has the wrong type or an out-of-range value."""


class ModelError(MecqtkError):
    """Unknown model name, or a checkpoint that does not fit the model."""


class DataError(MecqtkError):
    """A data source is missing, empty or inconsistent."""


class GraphError(MecqtkError):
    """The model cannot be traced or rewritten."""


class ExportError(MecqtkError):
    """The model cannot be exported, or a file given to export/verify is not what it should be."""


class IncompleteRunError(MecqtkError):
    """The run stopped short of a complete result but kept what it had (summary.json, the last
    good checkpoint): training failed, or an end stage (export, verify or report) did; the
    message names it and the command that retries it."""

    exit_code = 1

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary


def one_line(err: BaseException) -> str:
    """The first line of an exception's message, with its type when it is not a user error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, MecqtkError):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
