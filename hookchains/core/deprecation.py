"""Renamed keywords keep working for one release, with a ``DeprecationWarning`` naming the new one."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar, cast

__all__ = ["renamed_keyword", "RenamedAttribute"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keyword(**renames: str) -> Callable[[F], F]:
    """Decorator: each ``old=new`` pair lets callers still pass ``old=...``; it is passed on as ``new=...``
    with a ``DeprecationWarning``. Passing both raises ``TypeError``.

    Example:
        >>> @renamed_keyword(mode="masking")
        ... def logits(masking="hard"):
        ...     return masking
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     logits(mode="mask"), str(caught[0].message)
        ('mask', 'logits(mode=...) is deprecated: use masking=...')
    """
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got {old}= (deprecated) and {new}=: pass {new}= only")
                    warnings.warn(f"{fn.__qualname__}({old}=...) is deprecated: use {new}=...", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return cast(F, call)
    return wrap


class RenamedAttribute:
    """Class attribute standing for a renamed one: reading or setting ``obj.old`` reads or sets
    ``obj.new`` with a ``DeprecationWarning`` (the old name is the one this is assigned to).

    Example:
        >>> class Hooks:
        ...     mode = RenamedAttribute("masking")
        ...     def __init__(self):
        ...         self.masking = "soft"
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     Hooks().mode, str(caught[0].message)
        ('soft', 'Hooks.mode is deprecated: use Hooks.masking')
    """

    def __init__(self, new: str) -> None:
        self.new, self.old, self.owner = new, "", ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.old, self.owner = name, owner.__name__

    def _warn(self) -> None:
        warnings.warn(f"{self.owner}.{self.old} is deprecated: use {self.owner}.{self.new}", DeprecationWarning,
                      stacklevel=3)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        self._warn()
        return getattr(obj, self.new)

    def __set__(self, obj: Any, value: Any) -> None:
        self._warn()
        setattr(obj, self.new, value)
