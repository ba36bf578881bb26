"""`raymoe submit`'s parsing: its own options before or after the kind, everything else the
command's, --help anywhere shows help and submits nothing (no job server is needed: one
would be reached only after parsing)."""

from __future__ import annotations

import pytest

from raymoe.cli import main, parse_args


def test_submit_options_go_before_or_after_the_kind():
    args = parse_args(["submit", "train", "tiny", "--address", "http://head:8265", "train.max_steps=3",
                       "--follow", "--wait", "--timeout", "60"])
    assert (args.kind, args.address, args.follow) == ("train", "http://head:8265", True)
    assert args.args == ["tiny", "train.max_steps=3", "--wait", "--timeout", "60"]
    before = parse_args(["submit", "--address", "http://head:8265", "--follow", "train", "tiny",
                         "train.max_steps=3"])
    assert (before.address, before.follow, before.args) == ("http://head:8265", True,
                                                            ["tiny", "train.max_steps=3"])
    # after --, every argument is the command's, even one that submit knows
    verbatim = parse_args(["submit", "eval", "runs/x", "--workers", "2", "--", "--address", "auto"])
    assert verbatim.address == "http://127.0.0.1:8265"
    assert verbatim.args == ["runs/x", "--workers", "2", "--address", "auto"]


@pytest.mark.parametrize("argv", [["submit", "train", "--help"], ["submit", "train", "tiny", "-h"],
                                  ["submit", "--help"]])
def test_help_anywhere_shows_help_and_submits_nothing(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: raymoe submit" in out and "before or after the kind" in out
    assert "submitted" not in out


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as done:
        main(["info", "tiny", "--address", "x"])
    assert done.value.code == 2
    assert "unrecognized arguments: --address x" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # train's own parsing, before any job server
        main(["submit", "train", "--follow"])
    assert done.value.code == 2
    assert "raymoe train: error: the following arguments are required: config" in capsys.readouterr().err


def test_an_env_file_is_read_strictly(tmp_path):
    from raymoe.jobs import JobError, read_env_file

    good = tmp_path / "good.env"
    good.write_text("# comment\n\nFI_PROVIDER=efa\nNCCL_SOCKET_IFNAME=^lo,docker\n")
    assert read_env_file(str(good)) == {"FI_PROVIDER": "efa", "NCCL_SOCKET_IFNAME": "^lo,docker"}
    bad = tmp_path / "bad.env"
    bad.write_text("FI_PROVIDER=efa\nexport NCCL_DEBUG\n")
    with pytest.raises(JobError, match=r"bad.env:2: expected NAME=VALUE, got 'export NCCL_DEBUG'"):
        read_env_file(str(bad))
    with pytest.raises(JobError, match="missing.env: cannot read the environment file"):
        read_env_file(str(tmp_path / "missing.env"))
