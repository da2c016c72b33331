"""Concepts as the user types them, and where their tokens sit in the encoded concept string."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

MAX_CONCEPTS = 32


@dataclass(frozen=True)
class ConceptSet:
    """Encoded concepts ready for the concept stream.

    embeddings [T, C] are the text encoder's outputs at the concepts' token positions (C = 4096 for
    SD3: CLIP-L + CLIP-G zero-padded); token_concept [T] says which concept each token belongs to.
    """

    names: tuple[str, ...]
    embeddings: torch.Tensor
    token_concept: torch.Tensor

    def __post_init__(self):
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != self.token_concept.numel():
            raise ValueError("embeddings must be [T, C] with one row per concept token")
        counts = torch.bincount(self.token_concept, minlength=len(self.names))
        if counts.numel() != len(self.names) or bool((counts == 0).any()):
            raise ValueError("every concept needs at least one token")


def parse_concepts(text: str) -> list[str]:
    """Concept names from "cat, dog" or one per line; blanks dropped, order and case kept."""
    if not isinstance(text, str):
        raise TypeError("concepts must be text")
    names = [part.strip() for part in re.split(r"[,\n;]", text)]
    names = [name for name in names if name]
    if not names:
        raise ValueError("No concepts given: type at least one concept, e.g. 'cat, dog' or one per line.")
    if len(names) > MAX_CONCEPTS:
        raise ValueError(f"{len(names)} concepts given; at most {MAX_CONCEPTS} are supported in one recording.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Concept(s) listed twice: {', '.join(duplicates)}.")
    return names


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
