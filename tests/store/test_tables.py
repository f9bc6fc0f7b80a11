"""fedmpi.store.tables: the one CSV reader / writer / appender and the one table formatter."""

from __future__ import annotations

from fedmpi.store.tables import append_csv, format_table, read_csv, write_csv


def test_plain_table_aligns_columns_and_draws_rules():
    text = format_table(
        ["client", "size", "share"],
        [[1, 120, "50.0%"], [2, 7, "2.9%"], None, ["total", 127, "100.0%"]],
        align="rrr",
    )
    assert text.splitlines() == [
        "client  size   share",
        "--------------------",
        "     1   120   50.0%",
        "     2     7    2.9%",
        "--------------------",
        " total   127  100.0%",
    ]


def test_plain_table_default_alignment_strips_trailing_spaces():
    text = format_table(["run", "K", "status"], [["a", 2, "done"], ["longer", 10, "x"]], "lrl")
    assert text.splitlines() == [
        "run      K  status",
        "------------------",
        "a        2  done",
        "longer  10  x",
    ]
    # default: first column left, the others right
    assert format_table(["m", "n"], [["FULL", 3]]).splitlines()[2] == "FULL  3"


def test_markdown_table():
    text = format_table(["K", "split", "FULL"], [[2, "IID", "1.5 | 2"], None], markdown=True)
    assert text.splitlines() == [
        "| K | split | FULL |",
        "| --- | --: | --: |",
        "| 2 | IID | 1.5 \\| 2 |",
    ]
    assert format_table(["a", "b"], [], "rl", markdown=True).splitlines()[1] == "| --: | --- |"


def test_csv_round_trip_and_append(tmp_path):
    path = tmp_path / "t.csv"
    write_csv(path, [{"a": 1, "b": "x"}, {"a": 2, "c": 3.5}])
    assert read_csv(path) == [{"a": "1", "b": "x", "c": ""}, {"a": "2", "b": "", "c": "3.5"}]
    write_csv(path, [{"a": 1, "b": 2}], fields=["b"])
    assert read_csv(path) == [{"b": "2"}]
    assert read_csv(tmp_path / "missing.csv") == []

    log = tmp_path / "log.csv"
    append_csv(log, [])  # nothing to write, no header known: no file
    assert not log.exists()
    append_csv(log, [{"round": 1, "v": 0.5}])
    append_csv(log, [{"round": 2, "v": 0.25}])
    assert read_csv(log) == [{"round": "1", "v": "0.5"}, {"round": "2", "v": "0.25"}]

    # a row in another key order lands in the file's own columns; a new key widens the
    # header (a run resumed with a score its first rounds did not have)
    append_csv(log, [{"v": 0.125, "round": 3}])
    append_csv(log, [{"round": 4, "v": 0.1, "recall": 0.5}])
    append_csv(log, [{"round": 5, "v": 0.05}])
    assert log.read_text().splitlines()[0] == "round,v,recall"
    assert read_csv(log)[2:] == [
        {"round": "3", "v": "0.125", "recall": ""},
        {"round": "4", "v": "0.1", "recall": "0.5"},
        {"round": "5", "v": "0.05", "recall": ""},
    ]

    fixed = tmp_path / "fixed.csv"
    append_csv(fixed, [], fields=["round", "bytes"])  # a header even without rows
    append_csv(fixed, [{"round": 3, "bytes": 40, "extra": "dropped"}], fields=["round", "bytes"])
    assert fixed.read_text().splitlines() == ["round,bytes", "3,40"]


def test_read_csv_drops_a_partial_last_row(tmp_path, capsys):
    path = tmp_path / "cut.csv"
    path.write_text("round,client,fid\n1,global,30.5\n2,glo")
    assert read_csv(path) == [{"round": "1", "client": "global", "fid": "30.5"}]
    path.write_text("round,client,fid\n1,global,30.5\n2,global\n")
    assert read_csv(path) == [{"round": "1", "client": "global", "fid": "30.5"}]
    assert "partial last line" in capsys.readouterr().err
