"""Config: defaults, YAML + dotted overrides, and one-line errors for bad input."""

import pytest

from lejepa.config import Config, load_config, parse_override, valid_keys
from lejepa.errors import ConfigError


def test_defaults_validate_and_flatten():
    cfg = load_config()
    assert cfg == Config()
    flat = cfg.flat()
    assert flat["loss.lam"] == 0.05 and flat["data.name"] == "digits-shifted"
    assert set(flat) == set(valid_keys())


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  lam: 0.1\nmodel:\n  arch: resnet10t\n")
    cfg = load_config(path, ["loss.lam=0.02", "views.global_scale=[0.4, 1.0]", "optim.grad_clip=1.5"])
    assert cfg.loss.lam == 0.02
    assert cfg.model.arch == "resnet10t"
    assert cfg.views.global_scale == (0.4, 1.0)
    assert cfg.optim.grad_clip == 1.5


def test_override_value_is_yaml_not_code():
    key, value = parse_override("train.run_name=__import__('os').system('x')")
    assert key == "train.run_name" and isinstance(value, str)
    assert parse_override("a.b=3")[1] == 3 and parse_override("a.b=true")[1] is True


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["loss.lamb=0.1"], "unknown config key 'loss.lamb' (did you mean 'loss.lam'"),
        (["los.lam=0.1"], "did you mean 'loss.lam'"),
        (["loss.lam=1.5"], "loss.lam=1.5 is invalid: input should be less than or equal to 1"),
        (["loss.lam=-0.1"], "loss.lam=-0.1 is invalid"),
        (["loss.num_slices=0"], "loss.num_slices=0 is invalid"),
        (["loss.knots=16"], "loss.knots=16 is invalid: must be odd"),
        (["loss.knots=1"], "loss.knots=1 is invalid"),
        (["views.global_views=0"], "views.global_views=0 is invalid"),
        (["optim.lr=abc"], "optim.lr='abc' is invalid"),
        (["train.device=tpu"], "train.device='tpu' is not allowed"),
        (["views.local_scale=[0.5, 0.2]"], "views.local_scale"),
        (["noequals"], "not of the form key=value"),
        (["loss.lam.x=1"], "unknown config key"),
    ],
)
def test_bad_values_name_field_value_and_rule(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing)


def test_a_numeric_run_name_is_a_folder_name():
    from lejepa.config import load_config

    assert load_config(None, ["train.run_name=2024"]).train.run_name == "2024"
