"""docker-compose.yml matches what the code reads (no Docker engine here to run it)."""

from __future__ import annotations

import click
import yaml

from backflow.cli.main import cli
from tests.helpers import REPO
from topics.settings import KNOWN_ENV, _env_overrides, load

ROOT = REPO
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def resolve_command(argv: list[str]) -> click.Command:
    assert argv[0] == "backflow", argv
    command: click.Command = cli
    for word in argv[1:]:
        if word.startswith("-"):
            break
        assert isinstance(command, click.Group), f"{argv}: {word} under a plain command"
        sub = command.commands.get(word)
        assert sub is not None, f"{argv}: `{word}` is not a backflow command"
        command = sub
    return command


def test_cluster_services_present():
    assert {"kafka", "postgres", "synapse", "topics", "worker", "sink"} <= set(SERVICES)
    kafka = SERVICES["kafka"]
    assert kafka["image"].startswith("apache/kafka")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert kafka["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_backflow_services_run_real_commands():
    for name in ("topics", "worker", "sink"):
        command = resolve_command(SERVICES[name]["command"])
        assert not isinstance(command, click.Group), name


def test_whatsapp_history_follower_is_opt_in():
    follower = SERVICES["whatsapp-history"]
    assert follower["profiles"] == ["whatsapp"]  # `docker compose up` alone does not start it
    command = follower["command"]
    assert resolve_command(command[:2]).name == "import" and command[2] == "whatsapp-history"
    assert command[-1] == "--follow"
    # The password comes from the environment, never the command line.
    assert ":" not in command[3].split("//", 1)[1].split("@", 1)[0]
    assert "PGPASSWORD" in follower["environment"]


def test_environment_names_are_settings_the_code_reads():
    for name, service in SERVICES.items():
        env = service.get("environment") or {}
        backflow_env = {k: str(v) for k, v in env.items() if k.startswith("BACKFLOW_")}
        if not backflow_env:
            continue
        mapped = _env_overrides(backflow_env)
        for key in backflow_env:
            known = key in KNOWN_ENV or any(
                key == "BACKFLOW_" + dotted.replace(".", "_").upper() for dotted in mapped
            )
            assert known, f"{name}: {key} is not read by topics.settings"
        # And the values parse as settings.
        settings = load(env={k: v for k, v in backflow_env.items() if k != "BACKFLOW_CONFIG"})
        assert settings.kafka.bootstrap == "kafka:9092"
        assert settings.database.url and "@postgres:5432/" in settings.database.url
        assert settings.homeserver.url == "http://synapse:8008"


def test_mounted_files_exist_and_agree():
    registration = yaml.safe_load((ROOT / "deploy/registration.yaml").read_text())
    homeserver = yaml.safe_load((ROOT / "deploy/synapse/homeserver.yaml").read_text())
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    mounted = [v.split(":")[1] for v in SERVICES["synapse"]["volumes"]]
    assert set(homeserver["app_service_config_files"]) <= set(mounted)
    server_name = SERVICES["worker"]["environment"]["BACKFLOW_HOMESERVER_SERVER_NAME"]
    assert homeserver["server_name"] == server_name
    assert registration["url"] is None
    assert all(ns["exclusive"] for ns in registration["namespaces"]["users"])
    settings_file = yaml.safe_load((ROOT / "deploy/backflow.yaml").read_text())
    load(config=ROOT / "deploy/backflow.yaml", env={})  # parses with known names only
    assert "backfill" in settings_file
