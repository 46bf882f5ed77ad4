"""`sd-loha webui` / `python -m webui`: arguments and the refusal to listen off this machine without a login."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sd_loha.cli import build_parser, main


def test_parser_has_the_webui_subcommand():
    args = build_parser().parse_args(["webui", "--port", "7861", "--data-dir", "d", "--models-dir", "m",
                                      "--outputs-dir", "o", "--auth", "u:p"])
    assert (args.host, args.port, args.data_dir, args.models_dir, args.outputs_dir, args.auth) == \
        ("127.0.0.1", 7861, "d", "m", "o", "u:p")
    assert args.share is False and args.no_auth is False


@pytest.mark.parametrize("argv", [["webui", "--host", "0.0.0.0"], ["webui", "--share"]])
def test_exposed_without_auth_is_refused(argv, capsys, monkeypatch):
    monkeypatch.delenv("SD_LOHA_WEBUI_AUTH", raising=False)
    assert main(argv) == 2
    assert "--auth" in capsys.readouterr().err


def test_bad_auth_format(tmp_path):
    from webui.app import parse_auth

    assert parse_auth("me:se:cret") == ("me", "se:cret")
    with pytest.raises(SystemExit):
        parse_auth("nopassword")


def test_launch_refuses_too(tmp_path):
    from webui.app import launch

    class FakeDemo:
        pass

    with pytest.raises(SystemExit, match="--auth"):
        launch(FakeDemo(), host="0.0.0.0")


def test_python_dash_m_webui_help():
    out = subprocess.run([sys.executable, "-m", "webui", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--outputs-dir" in out.stdout
