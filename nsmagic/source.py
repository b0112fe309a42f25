"""Running a code string the way a notebook cell runs: statements, then a final expression
whose value is the cell's result.

Used inside the child both by the library's :func:`nsmagic.run_code` and by the magic (which
first lets IPython turn ``!cmd`` and ``%magic`` lines into Python). The source is registered in
``linecache`` under its file name so tracebacks show the cell's own lines.
"""

from __future__ import annotations

import ast
import io
import linecache
import tokenize
import traceback
from typing import Callable

from .outcome import NOTHING, Outcome


def run_source(code: str, namespace: dict, *, filename: str = "<nsmagic>", flags: int = 0,
               shown_source: str | None = None, line_offset: int = 0,
               render_traceback: Callable | None = None, formatter: Callable | None = None) -> Outcome:
    """Execute *code* in *namespace*; return its final expression's value or its exception.

    *shown_source* is what tracebacks quote (for a cell magic: the whole visible cell, magic
    line included) and *line_offset* how many of its lines precede *code*, so that a traceback
    names the line number the student sees.
    """
    linecache.cache[filename] = (len(shown_source or code), None,
                                 (shown_source or code).splitlines(True), filename)
    try:
        tree = compile(code, filename, "exec", flags | ast.PyCF_ONLY_AST, dont_inherit=True)
        if line_offset:
            ast.increment_lineno(tree, line_offset)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec", flags, dont_inherit=True), namespace)
        value = NOTHING
        if last is not None:
            value = eval(compile(last, filename, "eval", flags, dont_inherit=True), namespace)
            if ends_with_semicolon(code):
                value = NOTHING
        return Outcome(value=value, namespace=namespace, formatter=formatter)
    except BaseException as e:  # the cell's failure is reported, whatever it is
        tb = _from_file(e.__traceback__, filename)
        e.__traceback__ = tb
        if render_traceback is not None:
            lines = render_traceback(type(e), e, tb)
        else:
            lines = traceback.format_exception(type(e), e, tb)
        return Outcome(error=e, traceback=lines, namespace=namespace)


def _from_file(tb, filename: str):
    """The traceback from the first frame of the cell itself (our own frames are noise),
    or whole for a syntax error, which has no cell frame."""
    start = tb
    while start is not None and start.tb_frame.f_code.co_filename != filename:
        start = start.tb_next
    return start if start is not None else (tb.tb_next if tb is not None else None)


def ends_with_semicolon(code: str) -> bool:
    """Whether a cell's last expression ends in ``;``, which hides its value in IPython."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER,
            tokenize.INDENT, tokenize.DEDENT}
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type not in skip]
    except (tokenize.TokenError, SyntaxError):
        return False
    return bool(tokens) and tokens[-1].string == ";"
