"""The trainer: config in, a finished (or resumed) run out."""

from muon_recipes.train.entry import run

__all__ = ["run"]
