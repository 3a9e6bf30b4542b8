"""Write a sweep's Pareto page (front.html, front.png) from MLflow into a folder, to open in a
browser without the MLflow UI (the same files are logged on the sweep's run, under pareto/).

    python dashboards/pareto.py EXPERIMENT [--uri URI] [--out DIR]
"""

import argparse
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from raylens.config import TrackingConfig
from raylens.report import plot_front_html, plot_front_png
from raylens.tracking import resolve_uri, trial_rows


def main(argv: list[str] | None = None) -> int:
    """Write the sweep's front plot (PNG and HTML) from MLflow alone."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="the sweep's name")
    parser.add_argument("--uri", default=None, help="tracking URI (default as `raylens report`)")
    parser.add_argument("--out", default="pareto", help="folder to write (default ./pareto)")
    args = parser.parse_args(argv)
    client = MlflowClient(resolve_uri(TrackingConfig(tracking_uri=args.uri)))
    parent, rows = trial_rows(client, args.experiment)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "front.html").write_text(plot_front_html(rows, parent))
    plot_front_png(rows, parent, out / "front.png")
    print(f"{out / 'front.html'}\n{out / 'front.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
