"""The one exception type that every interface turns into a clear message."""


class HeliosError(ValueError):
    """Bad input or a bad checkpoint.

    The message is one line that names the field and what is allowed, e.g.
    ``temperature must be a finite number >= 0, got nan``. The CLI prints it and exits
    with code 2; the Triton models return it as the error of the response.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.detail = message
        super().__init__(f"{field} {message}")

    def renamed(self, names: dict[str, str]) -> str:
        """The message with the field called by an interface's own name (e.g. TOP_P)."""
        return f"{names.get(self.field, self.field)} {self.detail}"


class CachePoolExhausted(RuntimeError):
    """The paged KV cache has no free block left for a sequence."""
