"""Any option line gives a run request or a one-line UsageError, never a traceback (parse only:
no child is started)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError


@pytest.fixture(scope="module")
def magics():
    from IPython.testing.globalipapp import get_ipython
    from nsmagic.magics import InNamespaceMagics

    return InNamespaceMagics(shell=get_ipython())


def _option_strings() -> list[str]:
    from nsmagic.magics import InNamespaceMagics

    parser = InNamespaceMagics.innamespace.parser
    strings = [s for s in parser._option_string_actions if s.startswith("-")]
    return strings + [s[:n] for s in strings if s.startswith("--") for n in range(3, len(s))]


VALUES = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e20", "-1e20", "3e6", "0", "-0", "1.5", "64M", "1.5K",
                     "1.3K", "99999999999999999999T", "class", "None", "a,b", "x,,y", ",", "lo",
                     "10.0.0.1/30", "10.0.0.1/30:10.0.0.2", "/", "/proc/1/ns/net", "1", "-1", "box",
                     "'", '"', "\\", "'a b'", "--", "-", "=", "é", "\x00"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers().map(str),
    st.text(max_size=12),
)
TOKENS = st.one_of(st.sampled_from(_option_strings()), VALUES,
                   st.tuples(st.sampled_from(_option_strings()), VALUES).map("=".join))
LINES = st.one_of(st.lists(TOKENS, max_size=8).map(" ".join), st.text(max_size=60))

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _checked(magics, line: str, cell: str | None):
    """What the magic does before any child exists: parse the line, build the request, and
    check every part's values (as runner.execute does first; the magic shows its OptionError
    as a UsageError)."""
    from nsmagic.environment import build
    from nsmagic.errors import OptionError

    request = magics._request(line, cell)
    try:
        for part in build(request[1]):
            part.check()
    except OptionError as e:
        raise UsageError(str(e)) from None
    return request


def _request_or_usage_error(magics, line: str, cell: str | None) -> None:
    try:
        _checked(magics, line, cell)
    except UsageError as e:
        assert "\n" not in str(e).strip(), f"a usage error of more than one line: {e}"


@SETTINGS
@given(line=LINES)
def test_any_cell_magic_line_is_a_request_or_a_usage_error(magics, line):
    _request_or_usage_error(magics, line, "x = 1")


@SETTINGS
@given(line=LINES, code=st.sampled_from(["x", "f(1)", "1 + 2", "print('a  b')", ""]))
def test_any_line_magic_line_is_a_request_or_a_usage_error(magics, line, code):
    _request_or_usage_error(magics, f"{line} {code}", None)


@pytest.mark.parametrize("line, words", [
    ("--timeout 3e6", None), ("--timeout inf", "--timeout"), ("--timeout nan", "--timeout"),
    ("--timeout 0", "--timeout"), ("--monotonic nan", "--monotonic"), ("--monotonic inf", "--monotonic"),
    ("--monotonic 1e20", "--monotonic"), ("--boottime=-1e12", "--boottime"), ("--boottime inf", "--boottime"),
    ("--boottime -1e12", r"--boottime -1e\+12: the offset must keep the clock"), ("--monotonic -1.5e3", None),
    ("-o class", "'class' is a Python keyword"), ("-o None", "'None' is a Python keyword"),
    ("--memory 1.5", "--memory '1.5' is not a whole number of bytes"), ("--memory 1.5M", None),
    ("-n 'unbalanced", "cannot be split into words"), ("--cpus nan", "--cpus"), ("--pids 0", "--pids"),
])
def test_odd_values_are_usage_errors_naming_the_option(magics, line, words):
    if words is None:
        _checked(magics, line, "x = 1")
        return
    with pytest.raises(UsageError, match=words.replace("(", r"\(")) as info:
        _checked(magics, line, "x = 1")
    assert "\n" not in str(info.value)


def test_the_line_magic_takes_the_abbreviations_the_cell_magic_takes(magics):
    cell_args = magics._request("--mem 64M --host box --time", "x")[0]
    line_args, _, code, *_ = magics._request("--mem 64M --host box --time x", None)
    assert code == "x"
    assert (line_args.memory, line_args.hostname, line_args.time) == (cell_args.memory, cell_args.hostname, True)


@pytest.mark.parametrize("trait, value", [("grace_period", float("inf")), ("grace_period", -1.0),
                                          ("grace_period", float("nan")), ("default_timeout", float("inf"))])
def test_unbounded_waits_are_refused_by_the_traits(magics, trait, value):
    from traitlets import TraitError

    with pytest.raises(TraitError, match=trait):
        setattr(magics, trait, value)


def test_the_library_refuses_unbounded_waits():
    from nsmagic import OptionError, execute

    for kw in ({"timeout": float("inf")}, {"timeout": float("nan")}, {"grace": float("inf")}):
        with pytest.raises(OptionError):
            execute(lambda channel: None, **kw)
