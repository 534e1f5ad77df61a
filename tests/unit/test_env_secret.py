"""DSV4RT_API_KEY is a known variable whose value is never printed."""
from dsv4rt import env
from dsv4rt.cli import main


def test_api_key_is_known_and_masked(monkeypatch, capsys):
    monkeypatch.setenv("DSV4RT_API_KEY", "sekrit-123")
    env.refresh()
    try:
        assert "DSV4RT_API_KEY" not in env.unknown()
        assert env.in_effect()["DSV4RT_API_KEY"] == "<set>" and env.get("DSV4RT_API_KEY") == "sekrit-123"
        assert main(["info"]) == 0
        assert "sekrit-123" not in capsys.readouterr().out
    finally:
        monkeypatch.delenv("DSV4RT_API_KEY")
        env.refresh()
