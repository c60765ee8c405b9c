"""The optimization package's environment switches: one reading of on and off."""
import pytest
from conftest import set_env

from src.optimization.switches import env_switch

NAME = "SEEDVR2_TEST_SWITCH"


@pytest.mark.parametrize("value, default_on, default_off", [
    (None, True, False), ("", True, False), ("1", True, True), (" On ", True, True), ("YES", True, True),
    ("true", True, True), ("0", False, False), ("off", False, False), (" No", False, False), ("False", False, False),
    ("maybe", True, False),  # neither: the default stands
])
def test_env_switch(monkeypatch, value, default_on, default_off):
    set_env(monkeypatch, NAME, value)
    assert env_switch(NAME, default=True) is default_on
    assert env_switch(NAME, default=False) is default_off
