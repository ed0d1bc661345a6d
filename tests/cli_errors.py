"""The tools' bad-input contract, checked in one place: exit status 2 and one line on stderr."""

import pytest


def refused(main, argv, capsys):
    """Run a tool's ``main(argv)``, expect it to refuse; return its one-line message."""
    capsys.readouterr()  # drop earlier output
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()
