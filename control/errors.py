"""Config errors that name the file, the field and the fix — never a traceback."""


class MeshError(ValueError):
    def __init__(self, file: str, field: str, reason: str, fix: str = "", line: int | None = None):
        self.file, self.field, self.reason, self.fix, self.line = file, field, reason, fix, line
        where = f"{file}:{line}" if line else file
        text = f"{where}: {field}: {reason}" if field else f"{where}: {reason}"
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)
