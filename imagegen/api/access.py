"""What each route accepts in place of an API key, declared beside its handler (see api/auth.py).

Apart from auth.py so that the OpenAPI document (which auth.py's own handler uses) can read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

# "key": the Authorization header only (the default); "stream": or ?token=; "image": or a
# signed URL's ?exp=&sig=; "public": nothing at all.
Access = Literal["key", "stream", "image", "public"]
_ACCESS = "__imagegen_access__"
Handler = TypeVar("Handler", bound=Callable[..., Any])


def access(kind: Access) -> Callable[[Handler], Handler]:
    """Declare what a handler accepts in place of the Authorization header."""

    def mark(handler: Handler) -> Handler:
        setattr(handler, _ACCESS, kind)
        return handler

    return mark


def access_of(handler: Any) -> Access:
    # functools.wraps (problem_errors) copies the attribute onto the wrapper.
    return getattr(handler, _ACCESS, "key")
