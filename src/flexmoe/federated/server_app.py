"""The Flower ServerApp: a thin shell around ``run_federation``."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flexmoe.federated.federation import run_federation
from flexmoe.runconfig import RunConfig

OUT_KEY = "out-dir"


def make_server_app(config: RunConfig, out: Path, progress: bool = True) -> ServerApp:
    """A ServerApp running ``config`` and writing to ``out`` (for in-process simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, out, progress)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: settings come from the run config."""
    settings = dict(context.run_config)
    out = Path(str(settings.pop(OUT_KEY, "runs/flwr-run")))
    run_federation(grid, RunConfig().updated(settings), out, progress=False)
