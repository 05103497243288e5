"""The error a user can fix by changing the config, shared by every part of localnet
without importing the config schema (which the channels' and rules' registries feed)."""


class ConfigError(ValueError):
    """A config that cannot be used; the message names every offending key."""


class DivergedError(RuntimeError):
    """Training produced NaN or inf (a loss, or an error or activation between actors):
    the numbers, not the machinery, failed.  The fix is in the config (a smaller
    `train.lr`, most often).  `what` says what was not finite."""

    @property
    def what(self) -> str:
        return str(self)
