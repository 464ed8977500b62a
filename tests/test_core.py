"""comtip._core: rule logging (package records and third-party warnings reach the rule's log),
device resolution (a GPU asked for where there is none is a config error naming the key)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from comtip._core.devices import DEVICES, resolve_device
from comtip._core.errors import ConfigError
from comtip._core.runtime import rule_logging
from comtip.finetune.config import FinetuneConfig
from comtip.training.config import TrainConfig


def test_rule_log_holds_package_records_and_third_party_warnings(tmp_path):
    log = tmp_path / "logs" / "rule" / "s.log"
    with rule_logging(log):
        logging.getLogger("comtip.data.genes").info("panel of %d genes", 7)
        warnings.warn("Variable names are not unique", UserWarning, stacklevel=1)
    text = log.read_text()
    assert "INFO comtip.data.genes: panel of 7 genes" in text
    assert "WARNING py.warnings:" in text and "UserWarning: Variable names are not unique" in text
    # warnings go back to Python's default handling afterwards
    assert not logging.getLogger("py.warnings").handlers
    with pytest.warns(UserWarning, match="after"):
        warnings.warn("after", UserWarning, stacklevel=1)


def test_a_failing_rule_logs_the_exception(tmp_path):
    log = tmp_path / "r.log"
    with pytest.raises(ConfigError), rule_logging(log):
        raise ConfigError("config key 'x': bad")
    assert "ERROR comtip: failed" in log.read_text() and "config key 'x': bad" in log.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="config key 'finetune.device' is 'cuda'"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="config key 'embed.device'"):
        resolve_device("cuda", key="embed.device")
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"


def test_every_device_option_takes_the_same_values():
    for cfg in (TrainConfig, FinetuneConfig):
        for device in DEVICES:
            cfg(device=device).check()
        with pytest.raises(ConfigError, match="device"):
            cfg(device="tpu").check()
