"""RFC 9110 field syntax: which header names and values may be stored and sent again (pure, stdlib only).

An upstream can put any byte in a header. A value outside the field-value grammar cannot be sent by the HTTP server
under Moxy (it refuses the whole answer), so such a field is dropped when it arrives, before anything is stored."""

from __future__ import annotations

import re

__all__ = ["OWS", "valid_field_name", "valid_field_value"]

# RFC 9110 §5.6.3: optional whitespace around a value is SP and HTAB only. (str.strip() also removes \x0b, \x0c and
# \x1c-\x1f, which would hide a control byte at the end of a value.)
OWS = " \t"

# RFC 9110 §5.6.2: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: field-value = *field-content; field-vchar = VCHAR / obs-text, with SP and HTAB between. Anything
# else (NUL, CR, LF, the other C0 controls, DEL, and characters beyond latin-1) makes the value unsendable.
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def valid_field_name(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


def valid_field_value(value: str) -> bool:
    """Whether `value` (as decoded from latin-1) is a field value that may be sent as it is."""
    return _FIELD_VALUE.fullmatch(value) is not None
