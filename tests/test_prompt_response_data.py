"""Prompt/response SFT data (objective=causal_lm): CSV and JSON Lines files read into TextDataset.responses,
label_column optional, one-line DataErrors for bad files, and the responses carried through the prepared
Arrow files to the workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scaling_fl import config
from scaling_fl.config import resolve
from scaling_fl.data import DataError, TextDataset, check_task_options, load_task, readers, tasks
from scaling_fl.data.prepared import load_worker_data, prepare_data, save_prepared


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def write_jsonl(path: Path, records: list[dict]) -> str:
    return write(path, "".join(json.dumps(record) + "\n" for record in records))


def assert_one_line_error(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


def causal(train_path, test_path, **columns):
    return load_task("csv", train_path, test_path, objective="causal_lm", **columns)


# ---------------------------------------------------------------- reading


def test_csv_prompt_response_rows(tmp_path):
    train = write(
        tmp_path / "train.csv",
        'id,q,a\n1,What is 2+2?," 4"\n2,"Name a colour","Blue,\nlike the sky."\n3,Capital of France?,Paris\n',
    )
    test = write(tmp_path / "test.csv", "id,q,a\n9,Say hi,hi\n")
    train_rows, test_rows = causal(train, test, prompt_column="q", response_column="a")
    assert train_rows.texts == ["What is 2+2?", "Name a colour", "Capital of France?"]
    assert train_rows.responses == [" 4", "Blue,\nlike the sky.", "Paris"]  # kept as written
    assert train_rows.labels.tolist() == [0, 0, 0] and train_rows.label_names == ("text",)
    assert test_rows.texts == ["Say hi"] and test_rows.responses == ["hi"] and test_rows.label_names == ("text",)


def test_jsonl_prompt_response_rows(tmp_path):
    records = [
        {"prompt": "Translate: chat", "response": "cat", "extra": [1, 2]},
        {"prompt": "Add 1 and 2", "response": 3},  # a number is text as written
        {"Prompt": "Case of the key", "Response": "found"},  # a unique case-insensitive match, as for CSV
    ]
    path = tmp_path / "train.jsonl"
    write(path, "\ufeff" + "".join(json.dumps(r) + "\n" for r in records[:2]) + "\n" + json.dumps(records[2]) + "\n")
    test = write_jsonl(tmp_path / "test.JSONL", [{"prompt": "p", "response": "r"}])
    train_rows, test_rows = causal(str(path), test, prompt_column="prompt", response_column="response")
    assert train_rows.texts == ["Translate: chat", "Add 1 and 2", "Case of the key"]
    assert train_rows.responses == ["cat", "3", "found"]
    assert train_rows.label_names == ("text",) and train_rows.labels.tolist() == [0, 0, 0]
    assert test_rows.responses == ["r"]


def test_csv_train_with_jsonl_test(tmp_path):
    train = write(tmp_path / "train.csv", "prompt,response\nA,B\n")
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "C", "response": "D"}])
    train_rows, test_rows = causal(train, test, prompt_column="prompt", response_column="response")
    assert (train_rows.texts, train_rows.responses, test_rows.texts, test_rows.responses) == (
        ["A"],
        ["B"],
        ["C"],
        ["D"],
    )


def test_label_column_is_optional_for_causal_lm(tmp_path):
    train = write(tmp_path / "train.csv", "title,body\nRain,Wet  day\nSun,Warm\n")
    test = write(tmp_path / "test.csv", "title,body\nSnow,Cold\n")
    train_rows, test_rows = causal(train, test, text_columns=["title", "body"])
    assert train_rows.texts == ["Rain Wet day", "Sun Warm"] and train_rows.responses is None
    assert train_rows.labels.tolist() == [0, 0] and train_rows.label_names == test_rows.label_names == ("text",)
    with pytest.raises(DataError) as excinfo:  # a classifier still needs its labels
        load_task("csv", train, test, text_columns=["title", "body"])
    assert_one_line_error(excinfo, "label_column")


def test_a_label_column_still_labels_causal_lm_rows_for_the_split(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"q": "a", "r": "b", "topic": "x"}, {"q": "c", "r": "d", "topic": "y"}, {"q": "e", "r": "f", "topic": 1}],
    )
    test = write_jsonl(tmp_path / "test.jsonl", [{"q": "g", "r": "h", "topic": "y"}])
    train_rows, test_rows = causal(train, test, prompt_column="q", response_column="r", label_column="topic")
    assert train_rows.label_names == ("1", "x", "y") and train_rows.labels.tolist() == [1, 2, 0]
    assert test_rows.labels.tolist() == [2] and test_rows.responses == ["h"]


def test_builtin_tasks_are_unchanged_under_causal_lm():
    plain = load_task("synthetic", None, None, synthetic_train_size=40, synthetic_test_size=8)
    lm = load_task("synthetic", None, None, synthetic_train_size=40, synthetic_test_size=8, objective="causal_lm")
    for a, b in zip(plain, lm, strict=True):
        assert a.texts == b.texts and a.labels.tolist() == b.labels.tolist() and a.label_names == b.label_names
        assert b.responses is None


# ---------------------------------------------------------------- errors


def test_missing_response_column_names_the_file_and_the_fix(tmp_path):
    train = write(tmp_path / "train.csv", "q,answer\nA,B\n")
    test = write(tmp_path / "test.csv", "q,a\nC,D\n")
    with pytest.raises(DataError) as excinfo:
        causal(train, test, prompt_column="q", response_column="a")
    assert_one_line_error(excinfo, f"{train}:1:", "no column 'a'", "q, answer", "response_column")


def test_missing_jsonl_key_names_the_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": "A", "a": "B"}, {"q": "C", "answer": "D"}])
    with pytest.raises(DataError) as excinfo:
        causal(train, train, prompt_column="q", response_column="a")
    assert_one_line_error(excinfo, f"{train}:2:", "no key 'a'", "q, answer", "response_column")


@pytest.mark.parametrize(
    "contents, line, words",
    [
        ('{"q": "A", "a": "B"}\n{"q": "C", "a": "D"\n', 2, ["malformed JSON", "one complete JSON object"]),
        ('{"q": "A", "a": "B"}\n\n["C", "D"]\n', 3, ["expected a JSON object, got a list"]),
        ('{"q": "A", "a": {"text": "B"}}\n', 1, ["key 'a' holds an object, not text"]),
        ('{"q": "A", "a": "B"}\n{"q": "C", "a": "  "}\n', 2, ["empty response in column 'a'"]),
        ('{"q": "", "a": "B"}\n', 1, ["empty prompt in column 'q'"]),
        ('{"q": "A", "a": null}\n', 1, ["empty response in column 'a'"]),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, contents, line, words):
    path = write(tmp_path / "train.jsonl", contents)
    with pytest.raises(DataError) as excinfo:
        readers.read_generic_csv(path, None, None, prompt_column="q", response_column="a")
    assert_one_line_error(excinfo, f"{path}:{line}:", *words)


def test_empty_csv_prompt_is_named(tmp_path):
    path = write(tmp_path / "train.csv", "q,a\nA,B\n,D\n")
    with pytest.raises(DataError) as excinfo:
        readers.read_generic_csv(path, None, None, prompt_column="q", response_column="a")
    assert_one_line_error(excinfo, f"{path}:3:", "empty prompt in column 'q'")


@pytest.mark.parametrize("contents", ["", "\n  \n"])
def test_empty_jsonl_file(tmp_path, contents):
    path = write(tmp_path / "train.jsonl", contents)
    with pytest.raises(DataError) as excinfo:
        readers.read_generic_csv(path, ["text"], None)
    assert_one_line_error(excinfo, path, "file is empty")


def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes('{"q": "caf\u00e9", "a": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as excinfo:
        readers.read_generic_csv(str(path), None, None, prompt_column="q", response_column="a")
    assert_one_line_error(excinfo, str(path), "UTF-8")


@pytest.mark.parametrize(
    "columns, words",
    [
        (dict(prompt_column="q"), ["prompt_column is set but response_column is not"]),
        (dict(response_column="a"), ["response_column is set but prompt_column is not"]),
        (dict(prompt_column="q", response_column="q"), ["both 'q'"]),
        (dict(prompt_column="q", response_column="a", text_columns=["t"]), ["not both", "drop text_columns"]),
        (dict(prompt_column="q", response_column="a", label_column="a"), ["'a' is also the prompt or response"]),
        (dict(text_columns=["t"], label_column="t"), ["also in text_columns"]),
        (dict(), ["objective=causal_lm needs text_columns", "prompt_column and response_column"]),
        (dict(prompt_column="", response_column="a"), ["prompt_column must be a column name"]),
    ],
)
def test_static_checks_of_causal_lm_columns(columns, words):
    """check_task_options does no I/O: the launcher reports these before reading or starting anything."""
    columns = dict(dict(text_columns=None, label_column=None), **columns)
    with pytest.raises(DataError) as excinfo:
        check_task_options("csv", "train.csv", "test.csv", objective="causal_lm", **columns)
    assert_one_line_error(excinfo, *words)


def test_static_checks_of_prompt_response_outside_causal_lm_or_csv():
    with pytest.raises(DataError) as excinfo:
        check_task_options("csv", "a.csv", "b.csv", None, None, "sequence_classification", "q", "a")
    assert_one_line_error(excinfo, "objective=causal_lm")
    with pytest.raises(DataError) as excinfo:
        check_task_options("agnews", None, None, None, None, "causal_lm", "q", "a")
    assert_one_line_error(excinfo, "prompt_column and response_column apply only to task_name=csv")
    with pytest.raises(DataError) as excinfo:
        check_task_options("csv", "a.csv", "b.csv", ["t"], "l", "regression")
    assert_one_line_error(excinfo, "unknown objective 'regression'")
    check_task_options("csv", "a.jsonl", "b.jsonl", None, None, "causal_lm", "q", "a")
    check_task_options("csv", "a.csv", "b.csv", ["t"], None, "causal_lm")
    check_task_options("agnews", None, None, None, None, "causal_lm")


def test_objectives_match_the_config():
    assert tasks.OBJECTIVES == config.OBJECTIVES


def test_text_dataset_responses_are_checked_and_subset():
    data = TextDataset(texts=["a", "b", "c"], labels=[0, 0, 0], label_names=("text",), source="t", responses="xyz")
    assert data.responses == ["x", "y", "z"]
    part = data.subset([2, 0])
    assert part.texts == ["c", "a"] and part.responses == ["z", "x"]
    assert TextDataset(texts=["a"], labels=[0], label_names=("x",), source="t").subset([0]).responses is None
    with pytest.raises(DataError) as excinfo:
        TextDataset(texts=["a", "b"], labels=[0, 0], label_names=("text",), source="t", responses=["x"])
    assert_one_line_error(excinfo, "2 prompts but 1 responses")


# ---------------------------------------------------------------- through the prepared files


def _qa_config(train, test, **more):
    """A causal-LM config reading prompt/response columns q and a."""
    base = dict(task_name="csv", objective="causal_lm", model="tiny-gpt2", prompt_column="q", response_column="a")
    return resolve({**base, "train_path": train, "test_path": test, **more})


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_responses_reach_the_workers(tmp_path, suffix):
    rows = [{"q": f"question {i}", "a": f"answer {i}\n"} for i in range(12)]
    if suffix == "jsonl":
        train = write_jsonl(tmp_path / "train.jsonl", rows[:10])
        test = write_jsonl(tmp_path / "test.jsonl", rows[10:])
    else:
        quote = lambda r: f'"{r["q"]}","{r["a"]}"\n'  # noqa: E731
        train = write(tmp_path / "train.csv", "q,a\n" + "".join(map(quote, rows[:10])))
        test = write(tmp_path / "test.csv", "q,a\n" + "".join(map(quote, rows[10:])))
    cfg = _qa_config(train, test, validation_fraction=0.2)
    prepared = prepare_data(cfg, 2)
    assert prepared.label_names == ("text",) and len(prepared.validation) == 2
    answer = {r["q"]: r["a"] for r in rows}
    assert [answer[q] for q in prepared.train.texts] == prepared.train.responses
    out = str(tmp_path / "prepared")
    save_prepared(prepared, out)
    shards = [load_worker_data(out, (site,), site, 2, full_validation=True) for site in range(2)]
    seen = []
    for site, shard in enumerate(shards):
        rows_of_site = shard.train[site]
        assert rows_of_site.texts == [prepared.train.texts[i] for i in prepared.parts[site]]
        for part in (rows_of_site, shard.validation_shard, shard.test_shard, shard.validation_full):
            assert part.responses is not None and [answer[q] for q in part.texts] == part.responses
        seen += rows_of_site.texts + shard.validation_shard.texts
    assert sorted(seen) == sorted(prepared.train.texts)
    assert sorted(q for shard in shards for q in shard.test_shard.texts) == ["question 10", "question 11"]


def test_plain_rows_have_no_response_column(tmp_path):
    cfg = resolve({"synthetic_train_size": 40, "synthetic_test_size": 8, "validation_fraction": 0})
    save_prepared(prepare_data(cfg, 2), str(tmp_path))
    data = load_worker_data(str(tmp_path), (0, 1), 0, 1)
    assert all(rows.responses is None for rows in data.train.values()) and data.test_shard.responses is None
    assert np.array_equal(data.test_shard.labels, prepare_data(cfg, 2).test.labels)


@pytest.mark.parametrize(
    "train_text, needle",
    [
        ("q,answer\nA,B\nC,D\n", "no column 'a'"),  # read by the launcher, before any worker
        ("q,a\nA,B\nC,\n", "empty response in column 'a'"),
    ],
)
def test_the_launcher_reports_a_bad_prompt_response_file_before_any_worker(tmp_path, train_text, needle):
    from scaling_fl import job
    from scaling_fl.errors import UserError

    train = write(tmp_path / "train.csv", train_text)
    test = write(tmp_path / "test.csv", "q,a\nE,F\n")
    cfg = _qa_config(train, test, runs_dir=str(tmp_path / "runs"))
    with pytest.raises(UserError) as excinfo:
        job.preflight(cfg)
    assert_one_line_error(excinfo, train, needle)
    assert not (tmp_path / "runs").exists()
