"""The one error type config parsing raises; its text becomes the NACK's error_detail."""


class ConfigError(ValueError):
    """A resource we cannot honour.  `where` names the resource and field, `reason` the fix."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
