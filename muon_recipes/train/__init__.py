"""The trainer: config in, a finished (or resumed) run out.

`run` is imported on first use, so that the entry point can use the torch-free parts of this package
(`failures`) before torch is imported.
"""

__all__ = ["run"]


def __getattr__(name: str):
    if name == "run":
        from muon_recipes.train.entry import run

        return run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
