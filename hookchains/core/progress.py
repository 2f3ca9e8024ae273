"""What a long run tells its user while it works: status lines, progress bars, warnings, and at the
end where the time went.

Every stage of an extraction that can take more than a few seconds (fit, materialise, graph, chains,
feature visualisation, heatmaps, report page) runs inside :meth:`Progress.stage`, which prints a
status line when it starts and adds its wall-clock seconds to :attr:`Progress.seconds`; the loops
inside (the fit's steps, one feature visualisation per filter) show a tqdm bar from
:meth:`Progress.bar`. ``Progress(enabled=False)`` (``--quiet``) prints neither, but still times the
stages and still prints warnings (:meth:`Progress.warn`): a warning says the result may be
meaningless, which quiet output must not hide.

Example:
    >>> progress = Progress(enabled=False)
    >>> with progress.stage("materialise"):
    ...     pass
    >>> list(progress.seconds)
    ['materialise']
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Dict, Iterable, Iterator, Optional, TextIO, TypeVar

from tqdm.auto import tqdm

__all__ = ["Progress"]

T = TypeVar("T")


class Progress:
    """Status lines and bars on ``stream`` (default stderr) when ``enabled``; stage timings always.

    Attributes:
        seconds: stage name -> wall-clock seconds spent in it, in the order the stages first ran.
    """

    def __init__(self, enabled: bool = True, stream: Optional[TextIO] = None) -> None:
        self.enabled = enabled
        self.stream = stream
        self.seconds: Dict[str, float] = {}

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        """Announce stage ``name`` (``"name: detail ..."``) and time it; a stage may run several times."""
        if self.enabled:
            self._print(f"{name}: {detail} ..." if detail else f"{name} ...")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def bar(self, items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it") -> Iterable[T]:
        """``items`` with a tqdm bar (none when disabled); the bar is removed when the loop ends."""
        return tqdm(items, desc=desc, total=total, unit=unit, disable=not self.enabled, leave=False,
                    file=self.stream or sys.stderr)

    def warn(self, message: str) -> None:
        """Print ``warning: message`` (also when disabled: see the module docstring)."""
        self._print(f"warning: {message}")

    def breakdown(self, total: Optional[float] = None) -> str:
        """One line: the seconds of each stage, then the rest of ``total`` as ``other``.

        Example:
            >>> p = Progress(enabled=False); p.seconds.update({"fit": 41.2, "report": 95.0})
            >>> p.breakdown(total=140.0)
            'time: fit 41 s, report 95 s, other 4 s (total 140 s)'
        """
        parts = [f"{name} {seconds:.0f} s" for name, seconds in self.seconds.items()]
        if total is None:
            return "time: " + ", ".join(parts)
        rest = total - sum(self.seconds.values())
        if rest >= 0.5:
            parts.append(f"other {rest:.0f} s")
        return f"time: {', '.join(parts)} (total {total:.0f} s)"
