"""`EAOPSDTrainer`: the OPSD trainer with the loss chosen by `--method` from `distill_losses.METHODS`.

The reference stores the method as an integer code and branches in an 800-line `compute_loss`; here a method is one
registry entry (per-token terms + batch reduction), and everything else (rollouts, teacher pass, alignment) is the
shared `OPSDTrainer` machinery.
"""

from __future__ import annotations

from distill_losses import METHODS
from opsd_trainer import ConfigError, OPSDConfig, OPSDTrainer


class EAOPSDTrainer(OPSDTrainer):
    """`OPSDTrainer` whose loss is `METHODS[args.method]` (opsd | eopd | pwopsd | reopold)."""

    _name = "EA-OPSD"

    def __init__(self, model, args: OPSDConfig, *trainer_args, **trainer_kwargs) -> None:
        if args.method is None or args.method not in METHODS:
            got = "missing" if args.method is None else f"{args.method!r}"
            raise ConfigError(f"--method is {got}: choose one of {', '.join(METHODS)}")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)

    @property
    def method(self) -> str:
        return self.args.method
