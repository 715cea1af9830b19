"""``loraswap.docfields``: field docs from a Google-style ``Attributes:`` section, made safe for argparse."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from loraswap.docfields import field_docs, help_text


@dataclass
class Documented:
    """A class whose docstring has more than one section.

    Attributes:
        plain: One line.
        wrapped: A long text that goes on
            over an indented line,

            and past a blank line.
        typed (int): A type in parentheses is dropped.
        empty:

    Note:
        Not an attribute: the section ended at ``Note:``.
    """

    plain: str = ""
    wrapped: str = ""
    typed: int = 0
    empty: str = ""


def test_entries_continuations_types_and_section_end() -> None:
    assert field_docs(Documented) == {
        "plain": "One line.",
        "wrapped": "A long text that goes on over an indented line, and past a blank line.",
        "typed": "A type in parentheses is dropped.",
        "empty": "",
    }


def test_a_class_without_the_section_documents_nothing() -> None:
    class Bare:
        """No sections here; Attributes: in running text is not a header."""

    assert field_docs(Bare) == {}
    assert field_docs(type("NoDoc", (), {})) == {}


def test_unreadable_and_repeated_entries_are_errors() -> None:
    class Misindented:
        """Bad.

        Attributes:
            first: Fine.
          second: Indented less than the first entry.
        """

    class Repeated:
        """Bad.

        Attributes:
            first: Once.
            first: Twice.
        """

    with pytest.raises(ValueError, match=r"Misindented.*second: Indented less"):
        field_docs(Misindented)
    with pytest.raises(ValueError, match="Repeated: Attributes documents 'first' twice"):
        field_docs(Repeated)


def test_help_text_survives_argparse_formatting() -> None:
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--share", help=help_text("50% of the memory, ~30% slower (%(prog)s is literal)"))
    out = " ".join(parser.format_help().split())
    assert "50% of the memory, ~30% slower (%(prog)s is literal)" in out
