"""An error no check foresaw still ends a sync in one line (click would print only `Aborted!`
for an EOFError, a traceback for the rest); -v keeps the traceback."""

from __future__ import annotations

import pytest

from connectors.errors import InterruptedRunError, TwinhubError
from flows.cli._output import State
from flows.cli.sources import _one_line


@pytest.mark.parametrize("error", [EOFError("Compressed file ended early"), ValueError("bad")])
def test_an_unforeseen_error_ends_in_one_line_naming_the_source(error: Exception) -> None:
    with pytest.raises(TwinhubError) as raised, _one_line("ehr"):
        raise error
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"source 'ehr' stopped on an unexpected {type(error).__name__}: {error};")
    assert "twinhub status" in message and "-v" in message


def test_known_errors_pass_as_they_are_and_verbose_keeps_the_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    interrupted = InterruptedRunError("r1", "ehr", 10)
    with pytest.raises(InterruptedRunError) as raised, _one_line("ehr"):
        raise interrupted
    assert raised.value is interrupted
    monkeypatch.setattr(State, "verbose", True)
    with pytest.raises(EOFError), _one_line("ehr"):
        raise EOFError("kept for -v")
