"""The exception types: ReparamError, which the CLI turns into a one-line message and a non-zero
exit, and Refused, a pattern found but not rewritable exactly, which the pass applying the rule
turns into a refusal in the report."""
from __future__ import annotations

# The library's arguments and the command line's flags that set them: a message read by both
# names both.
OPTIONS = {"input_shapes": "--input-shape", "inputs": "--inputs", "provider": "--provider",
           "static_shape=True": "--static-shape", "verify=False": "--no-verify",
           "weights_as_constants=True": "--weights-as-constants", "int8_ready=True": "--int8-ready",
           "keep_identity=True": "--keep-identity"}


def option(name: str) -> str:
    """An option as the library and the command line spell it: ``input_shapes (--input-shape)``."""
    return f"{name} ({OPTIONS[name]})"


class ReparamError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class Refused(Exception):
    """A pattern found that cannot be rewritten exactly.

    ``reason`` is the same words for every instance (the report groups by it); ``detail`` names this
    instance's tensors and nodes; ``size_dependent``: fixing the symbolic input sizes
    (--static-shape) would let the rewrite apply, so it is worth saying wherever it was looked for;
    ``kind`` is report.KINDS' key for who refused it.
    """

    def __init__(self, reason: str, detail: str = "", size_dependent: bool = False, kind: str = "refused") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason, self.detail, self.size_dependent, self.kind = reason, detail, size_dependent, kind

    def within(self, context: str, detail: str = "") -> Refused:
        """The same refusal, its reason prefixed by the larger pattern it stopped."""
        return Refused(f"{context}: {self.reason}", "; ".join(filter(None, (detail, self.detail))),
                       self.size_dependent, self.kind)


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
