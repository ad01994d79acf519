"""The process group's explicit timeout: how long any collective waits for the slowest rank."""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from distillbev.pipeline.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, init_from_env, process_group_timeout
from distillbev.pipeline.errors import ConfigError


def test_the_default_is_explicit_and_the_environment_overrides_it(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert process_group_timeout() == DEFAULT_TIMEOUT_S == 1800
    monkeypatch.setenv(TIMEOUT_ENV, "7200")
    assert process_group_timeout() == 7200.0


@pytest.mark.parametrize("value", ["0", "-5", "ten", "nan"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(monkeypatch, value):
    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(ConfigError, match=f"{TIMEOUT_ENV}=.*positive number of seconds"):
        process_group_timeout()


def test_a_torchrun_rank_joins_with_that_timeout(monkeypatch):
    joined = {}
    for name, value in (("RANK", 1), ("WORLD_SIZE", 2), ("LOCAL_RANK", 1)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv(TIMEOUT_ENV, "900")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    world, device = init_from_env("cpu")
    assert (world.rank, world.world_size, device) == (1, 2, "cpu")
    assert joined == {"backend": "gloo", "timeout": datetime.timedelta(seconds=900)}
