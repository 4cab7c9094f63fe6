"""The one exception type that reaches the user as a single line (`cl-train: error: ...`)."""

import math


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit status 1, no traceback."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def positive(name: str, value, integer: bool = False, minimum: float = 0.0, strict: bool = True):
    """Return `value` if it is a number above (or, with strict=False, at least) `minimum`."""
    kind = "an integer" if integer else "a number"
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise UserError(f"{name}={value!r}: must be {kind} {bound}")
    if not math.isfinite(value):  # nan passes every comparison below, inf is no usable setting
        raise UserError(f"{name}={value}: must be a finite number {bound}")
    if value <= minimum if strict else value < minimum:
        raise UserError(f"{name}={value}: must be {kind} {bound}")
    return value


def probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:  # nan fails too
        raise UserError(f"{name}={value!r}: must be a probability in [0, 1]")
    return float(value)


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped training after a step, with a checkpoint written; the CLI prints the
    message as one line and exits with 128 + signum (143 / 130), as a killed process would."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
