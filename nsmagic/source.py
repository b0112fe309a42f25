"""Running a code string the way a notebook cell runs: statements, then a final expression
whose value is the cell's result.

The code is compiled in the calling process, before the fork (:func:`prepare`): a syntax error
then never starts a child, and compiling is warm there but several times slower in a fresh
fork. The child only executes (:func:`run_prepared`). The source is registered in
``linecache`` under its file name so tracebacks show the cell's own lines.
"""

from __future__ import annotations

import ast
import functools
import io
import linecache
import marshal
import tokenize
import traceback
from dataclasses import dataclass
from types import CodeType
from typing import Callable

from .outcome import NOTHING, Outcome


@dataclass(frozen=True)
class Prepared:
    filename: str
    body: CodeType
    last: CodeType | None
    quiet: bool


def prepare(code: str, *, filename: str = "<nsmagic>", flags: int = 0, shown_source: str | None = None,
            line_offset: int = 0) -> Prepared:
    """Compile *code*; raises ``SyntaxError`` as the interpreter would.

    *shown_source* is what tracebacks quote (for a cell magic: the whole visible cell, magic
    line included) and *line_offset* how many of its lines precede *code*, so that a traceback
    names the line number the student sees.
    """
    shown = shown_source if shown_source is not None else code
    linecache.cache[filename] = (len(shown), None, shown.splitlines(True), filename)
    return _compiled(code, filename, flags, line_offset)


@functools.lru_cache(maxsize=128)
def _compiled(code: str, filename: str, flags: int, line_offset: int) -> Prepared:
    """Compiled once per distinct cell (code objects are immutable, so one can serve every
    run): notebooks rerun the same cells, and right after the previous cell's fork the
    compiler's every write costs the kernel a page fault (docs/performance.md). As
    with an imported module's cached bytecode, a SyntaxWarning shows at the first compile only."""
    # Blank lines in front, rather than moving the AST's line numbers, so that a SyntaxError
    # names the right line too.
    tree = compile("\n" * line_offset + code, filename, "exec", flags | ast.PyCF_ONLY_AST, dont_inherit=True)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval", flags, dont_inherit=True)
    body = compile(tree, filename, "exec", flags, dont_inherit=True)
    return Prepared(filename, body, last, quiet=ends_with_semicolon(code))


def run_prepared(prepared: Prepared, namespace: dict, *, render_traceback: Callable | None = None,
                 formatter: Callable | None = None) -> Outcome:
    """Execute prepared code in *namespace*; return its final expression's value or its exception."""
    try:
        exec(prepared.body, namespace)
        value = NOTHING
        if prepared.last is not None:
            value = eval(prepared.last, namespace)
            if prepared.quiet:
                value = NOTHING
        return Outcome(value=value, namespace=namespace, formatter=formatter)
    except BaseException as e:  # the cell's failure is reported, whatever it is
        tb = _from_file(e.__traceback__, prepared.filename)
        e.__traceback__ = tb
        if render_traceback is not None:
            lines = render_traceback(type(e), e, tb)
        else:
            lines = traceback.format_exception(type(e), e, tb)
        return Outcome(error=e, traceback=lines, namespace=namespace)


def _from_file(tb, filename: str):
    """The traceback from the first frame of the code itself (our own frames are noise)."""
    start = tb
    while start is not None and start.tb_frame.f_code.co_filename != filename:
        start = start.tb_next
    return start if start is not None else tb


def ends_with_semicolon(code: str) -> bool:
    """Whether a cell's last expression ends in ``;``, which hides its value in IPython."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER,
            tokenize.INDENT, tokenize.DEDENT}
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type not in skip]
    except (tokenize.TokenError, SyntaxError):
        return False
    return bool(tokens) and tokens[-1].string == ";"


def dumps(prepared: Prepared, shown_source: str) -> bytes:
    """*prepared* as bytes for another process of this same interpreter (a box): code objects
    travel with marshal, and the source goes along for its tracebacks."""
    return marshal.dumps((prepared.filename, prepared.body, prepared.last, prepared.quiet, shown_source))


def loads(data: bytes) -> Prepared:
    """The other side of :func:`dumps`; registers the source for tracebacks."""
    filename, body, last, quiet, shown = marshal.loads(data)
    linecache.cache[filename] = (len(shown), None, shown.splitlines(True), filename)
    return Prepared(filename, body, last, quiet)
