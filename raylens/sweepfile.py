"""A sweep file (``sweeps/*.py``): its ``REAL`` and ``TOY`` sweeps and the command-line options
that select and override one (``--toy``, ``--trials``, ``--storage``, ``--study-url``, ``--set``),
shared by the file's own entry point and ``raylens preflight``/``prefetch``. Light on purpose:
the ``raylens`` command builds its parser from it without importing Ray, Optuna or torch."""

from __future__ import annotations

import os
from pathlib import Path

from raylens.config import (
    ConfigError,
    SweepConfig,
    parse_overrides,
    replace_sweep,
    split_overrides,
)


def add_sweep_options(parser) -> None:
    """The options of a sweep file (and of ``raylens preflight``/``prefetch``)."""
    parser.add_argument("--toy", action="store_true", help="the toy-world version, on this machine")
    parser.add_argument("--trials", type=int, default=None, help="override the trial budget")
    parser.add_argument("--storage", default=os.environ.get("RAYLENS_STORAGE"),
                        help="storage root (default $RAYLENS_STORAGE, else the sweep's own)")
    parser.add_argument("--study-url", default=os.environ.get("RAYLENS_STUDY_URL"),
                        help="Optuna storage (default $RAYLENS_STUDY_URL, else sqlite in the "
                             "sweep folder); no password in it: PostgreSQL reads ~/.pgpass")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base setting (flat key, e.g. data.num_examples=64) "
                             "or a sweep setting (sweep.retain_floor=0.2); repeatable")


def sweep_from_options(real: SweepConfig, toy: SweepConfig, args) -> tuple[SweepConfig,
                                                                          Path | None]:
    """The sweep the options select (``--toy``) with their overrides, and its toy world folder
    (None for the real sweep). ``ConfigError`` naming the field on bad input."""
    sweep = toy if args.toy else real
    overrides = parse_overrides(args.set)
    own, base = split_overrides(overrides)
    changes = {k: v for k, v in (("num_trials", args.trials), ("storage", args.storage),
                                 ("study_url", args.study_url)) if v is not None}
    sweep = replace_sweep(sweep, {**own, **changes}, base)
    toyworld = None
    if args.toy:
        from raylens import toyworld as tw

        toyworld = tw.load_or_build().root
    return sweep, toyworld


def load_sweep_file(path: str | Path) -> tuple[SweepConfig, SweepConfig]:
    """``REAL`` and ``TOY`` of a ``sweeps/*.py`` file (importing it runs no sweep)."""
    import importlib.util

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"raylens_sweep_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"sweep file {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError as exc:  # a setting of the file's REAL or TOY sweep
        raise ConfigError(f"sweep file {str(path)!r}: {exc}") from None
    except Exception as exc:  # SyntaxError, NameError, ...: the file, not raylens
        where = f" line {exc.lineno}" if isinstance(exc, SyntaxError) else ""
        raise ConfigError(f"sweep file {str(path)!r} is invalid:{where} {type(exc).__name__}: "
                          f"{exc}; allowed a Python file that defines REAL and TOY") from None
    real, toy = getattr(module, "REAL", None), getattr(module, "TOY", None)
    if not (isinstance(real, SweepConfig) and isinstance(toy, SweepConfig)):
        raise ConfigError(f"sweep file {str(path)!r} defines no REAL and TOY SweepConfig")
    return real, toy
