"""The Flower ServerApp: a thin shell around ``run_federation``, set up by the run config."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexmoe.federated.federation import run_federation
from flexmoe.federated.protocol import split_run_config
from flexmoe.federated.run import Resume, resolve_run
from flexmoe.io import folder_lock
from flexmoe.settings import FLOWER_OUT_DIR

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: settings and the output folder come from the run config; a
    run saved in that folder is continued."""
    given, out = split_run_config(dict(context.run_config))
    folder = Path(out or FLOWER_OUT_DIR)
    with folder_lock(folder):
        run = resolve_run(folder, given=given, resume=Resume.IF_SAVED)
        run_federation(grid, run, progress=False)
