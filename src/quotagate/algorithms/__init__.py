"""Pure rate-limit math: no I/O, no clock; integer microseconds in, integer microseconds out.

Every function here has a twin in ``storage/lua/decide.lua``; both compute with exact integers
(Lua's doubles are exact below 2**53 µs, about 285 years) so the memory and Redis storages give
identical answers. ``tests/unit/test_algorithm_cases.py`` holds them to one table of cases.
"""

from .concurrency import ConcurrencyResult, concurrency
from .fixed_window import FixedWindowResult, fixed_window, fixed_window_adjust
from .gcra import GcraResult, gcra, gcra_adjust
from .verdict import Verdict

__all__ = [
    "ConcurrencyResult",
    "FixedWindowResult",
    "GcraResult",
    "Verdict",
    "concurrency",
    "fixed_window",
    "fixed_window_adjust",
    "gcra",
    "gcra_adjust",
]
