"""What every node module shares and no backbone owns: the user-facing error type and the
block-list parser."""
from __future__ import annotations


class AnchorDiffError(ValueError):
    """A problem the user can fix; the message says how."""


def parse_layers(text: str, num_blocks: int, what: str, model: str) -> tuple[int, ...]:
    """'9, 18' -> (9, 18); empty -> () (the caller's default). Out of range is a clear error naming `model`."""
    text = (text or "").strip()
    if not text:
        return ()
    try:
        layers = tuple(sorted({int(part) for part in text.replace(";", ",").split(",") if part.strip()}))
    except ValueError:
        raise AnchorDiffError(f"{what} must be comma-separated block indices like '9, 18'; got '{text}'.") from None
    bad = [layer for layer in layers if not 0 <= layer < num_blocks]
    if bad:
        raise AnchorDiffError(f"{what} {bad} out of range: {model} has {num_blocks} joint blocks (0..{num_blocks - 1}).")
    return layers
