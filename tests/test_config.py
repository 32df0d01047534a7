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


def test_health_flags_are_config_flags_checked_when_the_config_is_built(tmp_path):
    from pwopsd.health import HealthArguments

    config = OPSDConfig(output_dir=str(tmp_path), method="opsd", health_window=3, stop_on_collapse=True)
    assert isinstance(config, HealthArguments) and (config.health_window, config.stop_on_collapse) == (3, True)
    with pytest.raises(ConfigError, match=r"^--health_min_entropy_ratio must be in \(0, 1\)"):
        OPSDConfig(output_dir=str(tmp_path), method="opsd", health_min_entropy_ratio=1.0)


def test_position_schedule_file_sets_the_three_flags(tmp_path):
    import json

    path = tmp_path / "viability.json"
    fit = {"scale": 0.7, "w_min": 0.31, "tau": 0.42, "s": 0.07, "cost": 0.0}
    path.write_text(json.dumps({"settings": {}, "records": [], "summary": {"schedule_fit": fit}}))
    config = OPSDConfig(output_dir=str(tmp_path), method="pwopsd", position_schedule_from=str(path))
    assert (config.position_w_min, config.position_tau, config.position_s) == (0.31, 0.42, 0.07)
    again = dataclasses.replace(config)  # re-validating a config built from the file is not "both given"
    assert (again.position_w_min, again.position_tau, again.position_s) == (0.31, 0.42, 0.07)
    with pytest.raises(ConfigError, match=r"^--position_schedule_from .* sets the schedule; drop --position_s$"):
        OPSDConfig(output_dir=str(tmp_path), method="pwopsd", position_schedule_from=str(path), position_s=0.2)
    fit["s"] = 0.0  # a file value the loss refuses is reported with the loss's own check
    path.write_text(json.dumps({"summary": {"schedule_fit": fit}}))
    with pytest.raises(ConfigError, match="--position_s"):
        OPSDConfig(output_dir=str(tmp_path), method="pwopsd", position_schedule_from=str(path))


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("3", 3), (7, 7)])
def test_loss_chunk_size_is_auto_or_a_positive_integer(tmp_path, value, expected):
    assert OPSDConfig(output_dir=str(tmp_path), method="opsd", loss_chunk_size=value).loss_chunk_size == expected


@pytest.mark.parametrize("value", ["0", "-2", "big", 0, 1.5])
def test_bad_loss_chunk_size_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="--loss_chunk_size must be an integer >= 1 or auto"):
        OPSDConfig(output_dir=str(tmp_path), method="opsd", loss_chunk_size=value)
