"""Concepts as the user types them, and where their tokens sit in the encoded concept string."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

MAX_CONCEPTS = 32


@dataclass(frozen=True)
class ConceptSet:
    """Encoded concepts ready for the concept stream.

    embeddings [T, C] are the text encoder's outputs at the concepts' token positions (C = 4096 for
    SD3: CLIP-L + CLIP-G zero-padded; 4096 for Flux.1: T5-XXL); token_concept [T] says which
    concept each token belongs to. `encoder` names the text encoders' family ("" = not stated), so a
    recording can refuse concepts encoded for another backbone of the same width. `positions` [T]
    (optional) are the tokens' places in the encoded concept sequence (0 = its first token), for
    backbones whose text tokens carry RoPE positions (Qwen-Image; Flux.2: their RoPE text positions,
    which add the model's left padding, nodes/models/flux2.py); None where text has no positions.
    """

    names: tuple[str, ...]
    embeddings: torch.Tensor
    token_concept: torch.Tensor
    encoder: str = ""
    positions: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != self.token_concept.numel():
            raise ValueError("embeddings must be [T, C] with one row per concept token")
        if self.positions is not None and self.positions.shape != self.token_concept.shape:
            raise ValueError("positions must be [T], one per concept token")
        counts = torch.bincount(self.token_concept, minlength=len(self.names))
        if counts.numel() != len(self.names) or bool((counts == 0).any()):
            raise ValueError("every concept needs at least one token")


# Separators between concepts: commas, semicolons and new lines, ASCII and full-width (，、；､).
SEPARATORS = re.compile(r"[,;\n\uff0c\u3001\uff1b\uff64]")
# How the concepts are joined into the one string the text encoder sees. The spaces matter: CLIP's
# tokenizer splits at white space and between letters and other characters, but keeps a run of
# symbols together, so "c++, python" would encode "++," as one piece that "c++" alone never gives;
# with " , " every concept is tokenised exactly as on its own.
JOINER = " , "


def parse_concepts(text: str) -> list[str]:
    """Concept names from "cat, dog" or one per line; blanks dropped, order and case kept."""
    if not isinstance(text, str):
        raise TypeError("concepts must be text")
    names = [part.strip() for part in SEPARATORS.split(text)]
    names = [name for name in names if name]
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", "backslashreplace").decode()
            raise ValueError(f"Concept '{shown}' holds a character that is not text (a lone UTF-16 surrogate): "
                             "retype the concept (or paste it again from a source that saves proper text).") from None
    if not names:
        raise ValueError("No concepts given: type at least one concept, e.g. 'cat, dog' or one per line.")
    if len(names) > MAX_CONCEPTS:
        raise ValueError(f"{len(names)} concepts given; at most {MAX_CONCEPTS} are supported in one recording.")
    folded = [name.casefold() for name in names]
    duplicates = [name for i, name in enumerate(names) if folded.index(folded[i]) < i]
    if duplicates:  # the text encoder ignores case, and so do concept look-ups
        raise ValueError(f"Concept(s) listed twice (case is ignored): {', '.join(duplicates)}.")
    return names


def join_concepts(names) -> str:
    """The concept string the text encoder sees (see JOINER)."""
    return JOINER.join(names)


def concept_number(text: str) -> Optional[int]:
    """The 1-based concept number `text` writes ('2', '０２'), or None if it is not a plain number
    ('²', '①' and 'two' are not: int() refuses them, so they are looked up as names)."""
    text = text.strip()
    return int(text) if text.isdecimal() else None


def concept_index(names, name: str) -> int:
    """Index of concept `name` in `names`, ignoring case and surrounding spaces ("Cat" finds "cat");
    -1 if absent. Names never differ only by case (parse_concepts refuses that)."""
    wanted = name.strip().casefold()
    for index, candidate in enumerate(names):
        if candidate.casefold() == wanted:
            return index
    return -1


def locate_tokens(sequence: list[int], pieces: list[list[int]], names: list[str]) -> list[list[int]]:
    """Positions of each piece's token ids in `sequence`, searched left to right in order.

    The concept string is encoded once as a whole (as the model would see a prompt); each concept's
    own tokenisation is then found in it, so multi-token concepts keep all their tokens.
    """
    positions: list[list[int]] = []
    cursor = 0
    for name, piece in zip(names, pieces):
        if not piece:
            raise ValueError(f"Concept '{name}' tokenises to nothing; use a word the text encoder knows.")
        for start in range(cursor, len(sequence) - len(piece) + 1):
            if sequence[start : start + len(piece)] == piece:
                positions.append(list(range(start, start + len(piece))))
                cursor = start + len(piece)
                break
        else:
            raise ValueError(f"Could not find the tokens of concept '{name}' in the encoded concept string.")
    return positions
