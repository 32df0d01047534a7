"""The training config reuses the loss module's declaration of every loss flag (default, help, choices, check)."""

from __future__ import annotations

import dataclasses

import pytest

from pwopsd.config import ConfigError, OPSDConfig
from pwopsd.losses import LossHParams, loss_hparam_fields


def test_every_loss_flag_is_a_config_field_with_the_declared_default_and_help(tmp_path):
    config_fields = {f.name: f for f in dataclasses.fields(OPSDConfig)}
    for declared in loss_hparam_fields():
        field = config_fields[declared.name]
        assert field.metadata["help"] == declared.metadata["help"]
        assert field.metadata.get("choices") == (list(declared.metadata["choices"]) if "choices" in declared.metadata else None)
        assert field.default == declared.metadata.get("cli_default", declared.default)
    # the two inherited GKD defaults differ from the loss defaults on purpose (the launchers pass the paper's values)
    config = OPSDConfig(output_dir=str(tmp_path), method="opsd")
    assert (config.temperature, config.beta) == (0.9, 0.5)
    assert (LossHParams().temperature, LossHParams().beta) == (1.1, 0.0)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("position_s", 0.0, "--position_s"), ("reopold_lambda", 1.0, "--reopold_lambda"), ("jsd_clip_mode", "x", "--jsd_clip_mode")],
)
def test_the_config_checks_loss_flags_with_the_declared_checks(tmp_path, flag, value, message):
    method = "reopold" if flag.startswith("reopold") else "pwopsd"
    with pytest.raises(ConfigError, match=message):
        OPSDConfig(output_dir=str(tmp_path), method=method, **{flag: value})
