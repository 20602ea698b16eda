import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from scanner import config
from scanner.config import ConfigError

MINIMAL = '[device]\nid = "gate-01"\nsite = "ben-xe-mien-dong"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gate.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    return info.value.problems


def test_minimal_config_gets_documented_defaults(tmp_path):
    c = config.load(write(tmp_path, MINIMAL))
    assert c.device.id == "gate-01"
    assert c.camera.source == "picamera2" and (c.camera.width, c.camera.height) == (640, 480)
    assert c.decoder.engines == ("zxing", "zbar")
    assert c.gpio.relay_pin == 17 and c.gpio.relay_active_high
    assert c.topic("checkin") == "gate/ben-xe-mien-dong/gate-01/checkin"
    assert len(c.digest) == 64


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('[device]\nid = "x"\nsite = "s"\ncolour = "red"\n', "device.colour: unknown key"),
        (MINIMAL + '[gpio]\nrelay_pin = "seventeen"\n', "gpio.relay_pin: expected an integer"),
        (MINIMAL + "[gpio]\nrelay_pin = 99\n", "gpio.relay_pin: 99 is out of range 0..53"),
        (MINIMAL + "[gpio]\nrelay_active_high = 1\n", "gpio.relay_active_high: expected true or false"),
        (MINIMAL + "[mqtt]\nport = 70000\n", "mqtt.port: 70000 is out of range"),
        (MINIMAL + "[mqtt]\nkeepalive_s = 3600\n", "mqtt.keepalive_s: 3600 is out of range 5..300"),
        (MINIMAL + '[mqtt]\nprotocol = "4"\n', "mqtt.protocol: must be one of"),
        (MINIMAL + '[decoder]\nengines = ["zxing", "opencv"]\n', "decoder.engines: unknown 'opencv'"),
        (MINIMAL + '[policy]\naccept = ["plain", "plain"]\n', "policy.accept: lists a value twice"),
        (MINIMAL + '[policy]\nallowlist_file = "nope.txt"\n', "policy.allowlist_file: file"),
        (MINIMAL + "[gpio]\nrelay_pulse_s = 12.0\n", "gpio.relay_pulse_s: 12.0 exceeds gpio.relay_max_on_s"),
        (MINIMAL + "[gpio]\nred_pin = 17\n", "gpio.red_pin: pin 17 is already used by gpio.relay_pin"),
        (MINIMAL + "[mqtt]\ntls = true\n", "mqtt.ca_file: required when mqtt.tls = true"),
        (MINIMAL + '[camera]\nsource = "http://x"\n', "camera.source: 'http://x' is not"),
        ('[device]\nid = "has/slash"\nsite = "s"\n', "device.id: 'has/slash' must be"),
        ('[device]\nsite = "s"\n', "device.id: required"),
        (MINIMAL + "[nonsense]\n", "nonsense: unknown key"),
        ("camera = 3\n" + MINIMAL, "camera: expected a table"),
        ("[device\n", "TOML syntax"),
    ],
)
def test_each_error_names_file_key_and_problem(tmp_path, extra, expected):
    found = problems(tmp_path, extra)
    assert all(p.startswith(str(tmp_path / "gate.toml") + ": ") for p in found)
    assert any(expected in p for p in found), found


def test_all_problems_are_reported_together(tmp_path):
    found = problems(tmp_path, MINIMAL + "[gpio]\nrelay_pin = -1\ngreen_pin = 'x'\nbogus = 1\n")
    assert len(found) == 3


def test_relative_list_paths_resolve_beside_the_config(tmp_path):
    (tmp_path / "allow.txt").write_text("A\n")
    c = config.load(write(tmp_path, MINIMAL + '[policy]\nallowlist_file = "allow.txt"\n'))
    assert c.policy.allowlist_file == tmp_path / "allow.txt"


def test_password_is_read_from_its_file_and_kept_out_of_repr(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    c = config.load(write(tmp_path, MINIMAL + '[mqtt]\nusername = "gate-01"\npassword_file = "pw"\n'))
    assert c.mqtt_password == "s3cret"
    assert "s3cret" not in repr(c)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scanner", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_cli_exit_codes(tmp_path):
    good = write(tmp_path, MINIMAL)
    result = run_cli("check-config", str(good))
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + "[gpio]\nrelay_pin = 'x'\n")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: gpio.relay_pin: expected an integer" in result.stderr
    assert run_cli("check-config", str(tmp_path / "missing.toml")).returncode == 2


def test_run_with_bad_config_exits_2_with_a_clear_message(tmp_path):
    bad = write(tmp_path, MINIMAL + "[camera]\nfps = 0\n")
    result = run_cli("run", "--config", str(bad))
    assert result.returncode == 2
    assert "camera.fps: 0 is out of range" in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_what_is_not_a_finite_number(tmp_path, value):
    sections = typing.get_type_hints(config.Config)
    floats = [
        (name, key)
        for name, section in sections.items()
        if dataclasses.is_dataclass(section)
        for key, hint in typing.get_type_hints(section).items()
        if hint is float
    ]
    assert ("policy", "anti_passback_s") in floats and ("gpio", "relay_max_on_s") in floats
    for section, key in floats:
        found = problems(tmp_path, f"{MINIMAL}[{section}]\n{key} = {value}\n")
        assert found == [
            f"{tmp_path / 'gate.toml'}: {section}.{key}: must be a finite number, got {value}"
        ], (
            section,
            key,
            found,
        )


def test_toml_nested_past_the_stack_is_a_config_error_not_a_traceback(tmp_path):
    deep = MINIMAL + "[policy]\naccept = " + "[" * 100_000 + "]" * 100_000 + "\n"
    assert problems(tmp_path, deep) == [f"{tmp_path / 'gate.toml'}: TOML nested too deep"]


@pytest.mark.parametrize(
    ("site", "expected"),
    [
        ('day_start = "4:00"', "site.day_start: '4:00' must be a time HH:MM from 00:00 to 23:59"),
        ('day_start = "24:00"', "site.day_start: '24:00' must be a time HH:MM"),
        ('timezone = "Mars/Olympus"', "site.timezone: 'Mars/Olympus' is neither a known IANA time zone nor"),
        ('timezone = "+25:00"', "site.timezone: '+25:00': offsets run from -14:00 to +14:00"),
        ("capacity = -1", "site.capacity: -1 is out of range 0..1000000"),
        ('capacity_mode = "maybe"', "site.capacity_mode: must be one of 'hard', 'soft'"),
        ('gates = ["gate-02"]', "site.gates: lists the site's gates but not this one ('gate-01')"),
        ('gates = ["gate-01", "a/b"]', "site.gates: 'a/b': each must be 1-64 letters"),
    ],
)
def test_site_problems_name_the_key(tmp_path, site, expected):
    found = problems(tmp_path, MINIMAL + f"[site]\n{site}\n")
    assert any(expected in p for p in found), found


def test_site_time_zone_offsets_and_day_start():
    from datetime import timedelta

    assert config.time_zone("+07:00").utcoffset(None) == timedelta(hours=7)
    assert config.time_zone("UTC-0530").utcoffset(None) == -timedelta(hours=5, minutes=30)
    assert config.SiteConfig(day_start="04:30").day_start_offset == timedelta(hours=4, minutes=30)
