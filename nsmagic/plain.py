"""Display data and comm messages as plain data, converted the way Jupyter's own JSON would.

The kernel decodes what a child sends as plain data only (see nsmagic.protocol), so a numpy
number, a date or a tuple subclass in a display's metadata cannot cross the pipe as it is. A
plain cell's kernel would turn such values into JSON anyway when it sends the message to the
notebook (jupyter_client's ``json_default``: numbers to int or float, dates to ISO text, bytes
to base64, any other iterable to a list), so the child does the same before sending, and the
notebook receives what a plain cell's would. What JSON cannot hold fails in the cell, as it does
in a plain cell, with a message that says what to convert.
"""

from __future__ import annotations

import json
import numbers
from binascii import b2a_base64
from collections.abc import Iterable
from datetime import date, datetime, timezone

_PLAIN = (str, int, float, bool, type(None), bytes)


def plain(obj, what: str):
    """*obj* if it is plain data already (the common case: a quick walk), else its JSON form."""
    if _is_plain(obj):
        return obj
    try:
        return json.loads(json.dumps(obj, default=_default, allow_nan=True))
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"{what} holds a value Jupyter cannot send to the notebook ({e}): it "
                        f"travels as JSON, so give str, int, float, bool, None, list or dict "
                        f"values") from None


def _is_plain(obj, depth: int = 0) -> bool:
    kind = type(obj)
    if kind in _PLAIN:
        return True
    if depth > 50:
        return False
    if kind is dict:
        return all(type(k) is str and _is_plain(v, depth + 1) for k, v in obj.items())
    if kind is list or kind is tuple:
        return all(_is_plain(v, depth + 1) for v in obj)
    return False


def _default(obj):
    """jupyter_client.jsonutil.json_default's conversions, without importing Jupyter."""
    if isinstance(obj, datetime):
        if obj.tzinfo is None:
            obj = obj.astimezone()  # Jupyter reads a naive datetime as local time, too
        return obj.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(obj, date):
        return obj.isoformat()
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return b2a_base64(bytes(obj), newline=False).decode("ascii")
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return obj.item()  # a numpy scalar that is not a number (numpy.bool_)
    if isinstance(obj, Iterable) and not isinstance(obj, (str, dict)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} {obj!r:.60} is not JSON")
