"""Errors of the ground segment (torch-free, so `python -m ground` can report them before any import of
torch).

Two config errors meet in ground/ and are named apart:
  ExperimentConfigError   a ground experiment config (ground/configs/*.yaml: teachers, student, loss
                          terms, data, schedule) that cannot be used; a ValueError
  flight.errors.ConfigError  a flight gate config (tile, policy, early_exit, log, ...; `.key` names the
                          key), raised by CloudGate when ground scores a model through the gate
"""
from __future__ import annotations


class ExperimentConfigError(ValueError):
    """A ground experiment config that cannot be used; the message names the file and the key."""
