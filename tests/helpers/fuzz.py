"""Property-based tests' budget: a few seconds each in ``make test``, far more when fuzzing.

``FORKSERVER_FUZZ=1`` (or a number of examples, ``FORKSERVER_FUZZ=50000``)
selects the "fuzz" hypothesis profile that conftest.py registers, and lifts
the tests' timeout to match: ``FORKSERVER_FUZZ=1 make test``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

__all__ = ["FUZZING", "FUZZ_EXAMPLES", "fuzz_timeout", "register_profiles", "subprocess_examples"]

_SETTING = os.environ.get("FORKSERVER_FUZZ", "")
FUZZING = _SETTING not in ("", "0")
FUZZ_EXAMPLES = int(_SETTING) if _SETTING.isdigit() and int(_SETTING) > 1 else 10_000
DEFAULT_EXAMPLES = 200

# A property test's timeout: pytest's 60 s, or hours when fuzzing.
fuzz_timeout = pytest.mark.timeout(6 * 3600 if FUZZING else 60)


def register_profiles() -> None:
    """Register "default" (a few seconds a test) and "fuzz", and load the one asked for.

    No example database: a run leaves nothing in the checkout, and the failing
    example is printed (with the blob to reproduce it)."""
    base = hypothesis_settings(deadline=None, database=None, print_blob=True)
    hypothesis_settings.register_profile("forkserver", base, max_examples=DEFAULT_EXAMPLES)
    hypothesis_settings.register_profile(
        "forkserver-fuzz",
        base,
        max_examples=FUZZ_EXAMPLES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    hypothesis_settings.load_profile("forkserver-fuzz" if FUZZING else "forkserver")


def subprocess_examples(default: int) -> int:
    """Examples for a property that starts processes: *default*, or a share of the
    fuzz budget (one in 25) when fuzzing."""
    return max(default, FUZZ_EXAMPLES // 25) if FUZZING else default
