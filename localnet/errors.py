"""The error a user can fix by changing the config, shared by every part of localnet
without importing the config schema (which the channels' and rules' registries feed)."""


class ConfigError(ValueError):
    """A config that cannot be used; the message names every offending key."""
