"""JSON from clients (the HTTP server's bodies, the Triton model's `messages` and `parameters`).

``json.loads`` accepts text that later fails deep inside a request with an internal error: escapes
of lone surrogates (``"\\ud800"``: a str that cannot be encoded, which the tokenizer rejects),
nesting deeper than Python's recursion limit, and integers past Python's digit limit. ``loads``
turns each into a ``RequestJSONError`` with one line that says what is wrong.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import QmoeError


class RequestJSONError(QmoeError, ValueError):
    """Text that is not JSON a request can carry; the message is one line."""


def loads(text: str | bytes) -> Any:
    try:
        value = json.loads(text)
    except UnicodeDecodeError as e:
        raise RequestJSONError(f"not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestJSONError(f"{e.msg} (line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise RequestJSONError("nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise RequestJSONError(str(e).split(";")[0]) from None
    _check_strings(value)
    return value


def _check_strings(value: Any) -> None:
    """Every string (keys too) must be encodable, i.e. hold no lone surrogate."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestJSONError(f"a string holds a lone surrogate (\\u{ord(v[e.start]):04x}), "
                                       "which is not a Unicode character") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
