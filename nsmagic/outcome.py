"""What a child's work produced, and how the kernel gets it back.

In the child, a job returns an :class:`Outcome` (a value, or an exception with its rendered
traceback, and the namespace ``-o`` names are looked up in). :func:`make_report` turns that into
a :class:`Report` of plain data and packed values, the payload of the DONE frame. In the kernel,
:func:`rebuild` turns the report into a :class:`Result`.

An exception raised by the cell comes back as itself (same class, same arguments) whenever it can
be unpickled in the kernel, so ``except ZeroDivisionError`` works around a namespaced cell and a
notebook's error reply names ``ZeroDivisionError``. Its traceback is the child's, attached for
IPython as ``_render_traceback_`` and for plain Python as a :class:`ChildTraceback` cause.
"""

from __future__ import annotations

import traceback as tb_module
from dataclasses import dataclass, field
from typing import Any

from . import protocol
from .errors import ChildTraceback, OutputError, ProtocolError, cell_error
from .values import Packed, Packer, Parked, Unpacker

#: Marks "no value" (a cell whose last statement is not an expression), unlike ``None``.
NOTHING = type("Nothing", (), {"__repr__": lambda self: "NOTHING", "__bool__": lambda self: False})()


@dataclass
class Outcome:
    """What a job returns inside the child."""

    value: Any = NOTHING
    error: BaseException | None = None
    #: The traceback as the notebook should show it (IPython's coloured lines for a cell).
    traceback: list[str] | None = None
    #: Where ``-o`` names are looked up.
    namespace: dict | None = None
    #: The value's mime bundle, used only when the value itself cannot be pickled.
    formatter: Any = None


@dataclass
class ErrorRecord:
    ename: str
    evalue: str
    traceback: list[str]
    text: str
    exception: Packed | None


@dataclass
class Report:
    result: Packed | None = None
    result_bundle: tuple[dict, dict] | None = None
    has_result: bool = False
    values: dict[str, Packed] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    error: ErrorRecord | None = None
    #: Large pieces the kernel fetches from the child before it lets the child exit.
    parked: Parked | None = None

    def plain(self, secret: bytes) -> tuple:
        """The report as plain data, the payload of DONE (the kernel decodes it without
        running anything: see nsmagic.protocol), led by the kernel's secret."""
        packed = lambda p: None if p is None else p.plain()  # noqa: E731
        error = self.error
        return (
            secret, packed(self.result), self.result_bundle, self.has_result,
            {name: p.plain() for name, p in self.values.items()}, self.failed,
            None if error is None else (error.ename, error.evalue, error.traceback, error.text,
                                        packed(error.exception)),
            None if self.parked is None else self.parked.plain(),
        )


def decode_report(payload: bytes, outputs: list[str]) -> Report:
    """The kernel's side of :meth:`Report.plain`: a report of the right shape, with the kernel's
    secret, naming only values that were asked for; a :class:`ProtocolError` otherwise."""
    data = protocol.load(payload)
    if not isinstance(data, tuple) or len(data) != 8:
        raise ProtocolError("the cell's final report is garbled (not a report); the cell was stopped")
    protocol.check_secret(data[0])
    try:
        _, result, bundle, has_result, values, failed, error, parked = data
        values, failed = dict(values), dict(failed)
        if not set(values) | set(failed) <= set(outputs):
            raise ValueError(f"it names values that were not asked for: {sorted(set(values) - set(outputs))}")
        if bundle is not None:
            bundle = (dict(bundle[0]), dict(bundle[1]))
        if error is not None:
            ename, evalue, lines, text, exception = error
            if not all(isinstance(x, str) for x in (ename, evalue, text, *lines)):
                raise ValueError("its error record holds something other than text")
            error = ErrorRecord(ename, evalue, list(lines), text,
                                None if exception is None else Packed.from_plain(exception))
        return Report(
            result=None if result is None else Packed.from_plain(result), result_bundle=bundle,
            has_result=bool(has_result),
            values={name: Packed.from_plain(p) for name, p in values.items()},
            failed={name: str(why) for name, why in failed.items()}, error=error,
            parked=None if parked is None else Parked.from_plain(parked),
        )
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"the cell's final report is garbled ({e}); the cell was stopped") from None


def capture(fn, *args, **kwargs) -> Outcome:
    """Run *fn* and keep its value or its exception, for jobs that are plain callables."""
    try:
        return Outcome(value=fn(*args, **kwargs))
    except BaseException as e:  # the child reports everything, even SystemExit
        return failed(e)


def failed(e: BaseException) -> Outcome:
    """The outcome of a job that raised *e* (its traceback without the frame that called it)."""
    tb = e.__traceback__.tb_next if e.__traceback__ else None
    return Outcome(error=e, traceback=tb_module.format_exception(type(e), e, tb))


def make_report(outcome: Outcome, outputs: list[str], packer: Packer) -> Report:
    """Pack an outcome (in the child). Each ``-o`` name is packed on its own, so one value that
    cannot be pickled does not stop the others from arriving."""
    report = Report()
    if outcome.error is not None:
        report.error = _error_record(outcome.error, outcome.traceback, packer)
    elif outcome.value is not NOTHING:
        report.has_result = True
        if outcome.value is not None:
            try:
                report.result = packer.pack(outcome.value)
            except Exception:
                if outcome.formatter is not None:
                    report.result_bundle = outcome.formatter(outcome.value)
                else:
                    report.result_bundle = ({"text/plain": repr(outcome.value)}, {})
    namespace = outcome.namespace or {}
    for name in outputs:
        if name not in namespace:
            if outcome.error is None:
                report.failed[name] = "not defined when the cell ended"
            continue
        value = namespace[name]
        try:
            report.values[name] = packer.pack(value)
        except Exception as e:
            report.failed[name] = f"cannot pickle a {type(value).__module__}.{type(value).__qualname__}: {e}"
    report.parked = packer.parked()
    return report


def _error_record(error: BaseException, lines: list[str] | None, packer: Packer) -> ErrorRecord:
    text = "".join(tb_module.format_exception(type(error), error, error.__traceback__))
    try:
        packed = packer.pack(error)
    except Exception:
        packed = None
    return ErrorRecord(
        ename=type(error).__name__,
        evalue=str(error),
        traceback=lines if lines is not None else text.splitlines(),
        text=text,
        exception=packed,
    )


@dataclass
class Result:
    """What a run brought back into the kernel."""

    #: The value of the cell's final expression or the function's return value (``None`` if none).
    value: Any = None
    #: Whether there was a value at all (a cell ending in a statement has none).
    has_value: bool = False
    #: A mime bundle standing for a value that could not be pickled (shown, not returned).
    bundle: tuple[dict, dict] | None = None
    #: The ``-o`` variables that arrived.
    values: dict[str, Any] = field(default_factory=dict)
    #: Why the others did not.
    failures: dict[str, str] = field(default_factory=dict)
    #: The cell's own exception, rebuilt in the kernel.
    error: BaseException | None = None
    #: The child's process id (in the kernel's PID namespace).
    pid: int = 0

    def raise_for_errors(self) -> None:
        """Raise the cell's exception, or else an :class:`OutputError` for missing values."""
        if self.error is not None:
            raise self.error
        if self.failures:
            raise OutputError(self.failures, list(self.values))


def rebuild(report: Report, unpacker: Unpacker, pid: int) -> Result:
    """Unpack a report in the kernel."""
    result = Result(pid=pid, has_value=report.has_result, bundle=report.result_bundle, failures=dict(report.failed))
    if report.result is not None:
        try:
            result.value = unpacker.unpack(report.result)
        except Exception as e:
            result.bundle = ({"text/plain": f"<a value that could not be unpickled in the kernel: {e}>"}, {})
    for name, packed in report.values.items():
        try:
            result.values[name] = unpacker.unpack(packed)
        except Exception as e:
            result.failures[name] = f"could not be unpickled in the kernel: {type(e).__name__}: {e}"
    if report.error is not None:
        result.error = _rebuild_error(report.error, unpacker)
    return result


def _rebuild_error(rec: ErrorRecord, unpacker: Unpacker) -> BaseException:
    exc = None
    if rec.exception is not None:
        try:
            exc = unpacker.unpack(rec.exception)
        except Exception:
            exc = None
    lines = rec.traceback
    if isinstance(exc, BaseException):
        try:
            exc._render_traceback_ = lambda: lines
        except (AttributeError, TypeError):
            pass
    else:
        exc = cell_error(rec.ename, rec.evalue, lines)
    if isinstance(exc, Exception):
        # Not for SystemExit and KeyboardInterrupt: IPython shows those without a traceback, and
        # its exception-only formatter breaks on a cause that has none.
        exc.__cause__ = ChildTraceback(rec.text)
    exc.__suppress_context__ = True
    return exc
