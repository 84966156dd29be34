"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ReparamError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def internal_error(exc: BaseException) -> str:
    """A defect of ours, as a refusal's reason."""
    return f"internal error: {type(exc).__name__}: {first_line(exc)} (please report)"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException, limit: int = 400) -> str:
    """The whole message of an exception on one line (onnxruntime puts what matters on its later
    lines: "... for the following indices / index: 2 Got: 8 Expected: 16"), cut at ``limit``."""
    text = " ".join(" ".join(line.split()) for line in str(exc).strip().splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
