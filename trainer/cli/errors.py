"""The two ways a command ends on something other than a config error (those are ``ConfigError``)."""


class UserError(Exception):
    """A mistake outside the config file (a run directory that exists, a missing checkpoint)."""


class FailedRun(Exception):
    """The user's code raised during a run (after the sanity pass): one line naming it, exit 1."""
