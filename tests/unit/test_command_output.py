"""megatron_alp/runtime/command_output.py: an entry point's output through logging."""

import logging

from megatron_alp.runtime.command_output import command_logger


def test_output_on_stdout_refusals_on_stderr_bare_lines(capsys):
    log = command_logger("t1")
    log.info("the report %d", 1)
    log.error("REFUSED: %s", "why")
    out, err = capsys.readouterr()
    assert out == "the report 1\n" and err == "REFUSED: why\n"


def test_a_second_call_replaces_the_handlers_and_nothing_reaches_the_root_logger(capsys, caplog):
    command_logger("t2")
    log = command_logger("t2")  # main() run twice in one process
    with caplog.at_level(logging.DEBUG):
        log.info("once")
    assert capsys.readouterr().out == "once\n"
    assert len(log.handlers) == 2 and not log.propagate
    assert [r.getMessage() for r in caplog.records] == []  # the library's log format is not applied to it
