"""The perf sections' command lines are flexmoe's own: they run only when a section is measured,
so a renamed option or a refused value would otherwise surface an hour into a measurement."""

import pytest

from benchmarks.perf import perf
from flexmoe.cli import build_parser
from flexmoe.cli.run import new_settings
from flexmoe.federated.client_app import check_limits
from flexmoe.federated.protocol import DEPLOYED


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("deploy-local", perf.DEPLOYMENT),
        ("deploy-local", [*perf.DEPLOYMENT, "--no-node-worker"]),
        ("run", ["--clients", "2", *perf.SMALL]),
        ("run", ["--clients", "100", "--fraction-train", "0.1", *perf.SMALL]),
    ],
)
def test_a_sections_command_line_parses_into_valid_settings(tmp_path, command, options):
    args = build_parser().parse_args([command, "--out", str(tmp_path / "out"), *options])
    settings = new_settings(args)
    assert settings.federation.rounds == 3 and settings.device == "cpu"
    if command == "deploy-local":
        check_limits(settings, DEPLOYED)  # what a SuperNode would refuse
