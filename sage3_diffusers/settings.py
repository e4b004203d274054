"""On/off switches read from the environment (one spelling of yes and no for all of them)."""
from __future__ import annotations

import os


def env_switch(name: str, on: str, off: str) -> bool:
    """$name as a switch, on when unset: 1/on/true/yes (or empty) or 0/off/false/no, any case. Anything else is a
    ValueError naming the variable and what 1 (`on`) and 0 (`off`) mean."""
    value = os.environ.get(name, "1").strip().lower()
    if value in ("1", "", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{name}={value!r}: use 1 ({on}) or 0 ({off})")
