"""Environment switches of the optimization package (``SEEDVR2_*``): one reading of on and off for all."""
from __future__ import annotations

import os

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def env_switch(name: str, default: bool) -> bool:
    """Whether the switch ``name`` is on: a default-off switch only for 1/true/yes/on, a default-on one unless
    it is 0/false/no/off (any case, surrounding spaces ignored)."""
    value = os.environ.get(name, "").strip().lower()
    return value not in OFF if default else value in ON
