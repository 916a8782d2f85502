"""Readers and tasks against the real samples in shared/data, plus the error paths.

The samples are read in place (never copied into the repo: their licences are
research-only); small edge-case files are written into tmp_path.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

from scaling_fl import hub
from scaling_fl.data import TASK_NAMES, DataError, TextDataset, check_task_options, load_task, readers, tasks

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shared_data() -> Path:
    """The real samples are part of this project's environment: missing them is a failure, not a skip."""
    assert DATA.is_dir(), f"the shared test data is missing at {DATA} (see ../shared/data/README.md)"
    return DATA


needs_data = pytest.mark.usefixtures("shared_data")


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def assert_one_line_error(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


# ---------------------------------------------------------------- the shared samples


SAMPLES = [
    (
        "agnews",
        "agnews/test.csv",
        [1900, 1900, 1900, 1900],
        "Fears for T N pension after talks Unions representing workers at Turner Newall say",
    ),
    (
        "agnews",
        "agnews/train.csv",
        [163, 132, 137, 149],
        "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers, "
        "Wall Street's dwindling band of ultra-cynics, are seeing green again.",
    ),
    (
        "spooky_author",
        "spooky_author/train.csv",
        [7900, 5635, 6044],
        "This process, however, afforded me no means of ascertaining the dimensions of my dungeon;",
    ),
    (
        "imdb",
        "imdb/IMDB Dataset.csv",
        [1394, 1404],
        "One of the other reviewers has mentioned that after watching just 1 Oz episode "
        "you'll be hooked. They are right, as this is exactly what happened with me. The first thing",
    ),
    (
        "yelp",
        "yelp/train_sample.csv",
        [131, 69],
        "Unfortunately, the frustration of being Dr. Goldberg's patient is a repeat",
    ),
    (
        "yelp",
        "yelp/test_sample.csv",
        [12, 8],
        "Contrary to other reviews, I have zero complaints about the service or the prices.",
    ),
]


@needs_data
@pytest.mark.parametrize("task, relpath, histogram, first_text", SAMPLES, ids=[s[1] for s in SAMPLES])
def test_reader_parses_shared_sample(task, relpath, histogram, first_text):
    data = tasks.READERS[task](str(DATA / relpath))
    assert len(data) == sum(histogram)
    assert np.bincount(data.labels, minlength=len(data.label_names)).tolist() == histogram
    assert data.labels.dtype == np.int64
    assert data.texts[0].startswith(first_text)
    assert all(text and text == text.strip() for text in data.texts)


@needs_data
def test_load_task_agnews_pair_shares_label_names():
    train, test = load_task("agnews", DATA / "agnews/train.csv", DATA / "agnews/test.csv")
    assert (len(train), len(test)) == (581, 7600)
    assert train.label_names == test.label_names == ("World", "Sports", "Business", "Sci/Tech")


@needs_data
def test_agnews_backslash_line_breaks_become_spaces():
    """AG News marks line breaks with a bare backslash and escapes dollars as \\$."""
    data = readers.read_agnews(str(DATA / "agnews/test.csv"))
    assert not any("\\" in text for text in data.texts)
    assert any("$1 billion" in text for text in data.texts)
    assert any("social network" in text for text in data.texts)


@needs_data
def test_yelp_escapes_are_decoded():
    train, test = load_task("yelp", DATA / "yelp/train_sample.csv", DATA / "yelp/test_sample.csv")
    assert train.label_names == ("negative", "positive")
    texts = train.texts + test.texts
    assert not any("\\n" in text or '\\"' in text for text in texts)
    assert any("K\u00f6lsch" in text for text in texts)


@needs_data
def test_imdb_br_tags_removed():
    data = readers.read_imdb(str(DATA / "imdb/IMDB Dataset.csv"))
    assert data.label_names == ("negative", "positive")
    assert not any("<br" in text.lower() for text in data.texts)


# ---------------------------------------------------------------- other layouts


def test_agnews_kaggle_variant_with_header(tmp_path):
    path = write(
        tmp_path / "train.csv",
        "Class Index,Title,Description\n"
        '3,Wall St. Bears,"Reuters - Short-sellers, Wall Street\'s dwindling\\band"\n'
        "2,Game on,The home team won\n",
    )
    data = readers.read_agnews(path)
    assert data.labels.tolist() == [2, 1]
    assert data.texts[0] == "Wall St. Bears Reuters - Short-sellers, Wall Street's dwindling band"


def test_yelp_full_reads_five_star_file(tmp_path):
    path = write(tmp_path / "full.csv", '"5","great"\n"3","fine\\nok"\n"1","bad"\n')
    data = readers.read_yelp_full(path)
    assert data.labels.tolist() == [4, 2, 0]
    assert data.texts[1] == "fine ok"
    assert len(data.label_names) == 5


def make_aclimdb(root) -> None:
    fs, base = fsspec.core.url_to_fs(str(root))
    files = {
        "pos/0_9.txt": "A fine film.<br /><br />Loved it.",
        "pos/1_8.txt": "Great acting.",
        "neg/0_2.txt": "Dull.<br />Boring plot.",
        "unsup/0_0.txt": "not labelled, must be ignored",
    }
    for name, text in files.items():
        fs.makedirs(f"{base}/{name.rsplit('/', 1)[0]}", exist_ok=True)
        fs.pipe_file(f"{base}/{name}", text.encode("utf-8"))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_imdb_aclimdb_directory(tmp_path, where):
    root = str(tmp_path / "aclImdb" / "train") if where == "local" else f"memory://{tmp_path.name}/aclImdb/train"
    make_aclimdb(root)
    data = readers.read_imdb(root)
    assert data.labels.tolist() == [0, 1, 1]
    assert data.texts == ["Dull. Boring plot.", "A fine film. Loved it.", "Great acting."]


def test_imdb_directory_without_reviews(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as excinfo:
        readers.read_imdb(str(tmp_path / "empty"))
    assert_one_line_error(excinfo, str(tmp_path / "empty"), "neg/*.txt", "aclImdb")


def test_reader_works_through_fsspec_memory_filesystem():
    with fsspec.open("memory://agnews-sample/test.csv", "w") as handle:
        handle.write('"1","Title","Body"\n"4","Chips","New chip\\design"\n')
    data = readers.read_agnews("memory://agnews-sample/test.csv")
    assert data.labels.tolist() == [0, 3]
    assert data.texts[1] == "Chips New chip design"


def test_generic_csv_task(tmp_path):
    train_path = write(
        tmp_path / "train.csv",
        'id,title,body,topic\n1,Rain,Wet day,weather\n2,Goal,"Late\nwinner",sport\n3,Sun,,weather\n',
    )
    test_path = write(tmp_path / "test.csv", "id,title,body,topic\n9,Snow,Cold,weather\n")
    train, test = load_task("csv", train_path, test_path, text_columns=["title", "body"], label_column="topic")
    assert train.label_names == test.label_names == ("sport", "weather")
    assert train.labels.tolist() == [1, 0, 1]
    assert train.texts == ["Rain Wet day", "Goal Late winner", "Sun"]
    assert test.labels.tolist() == [1]


def test_generic_csv_test_label_must_occur_in_train(tmp_path):
    train_path = write(tmp_path / "train.csv", "text,label\na,x\nb,y\n")
    test_path = write(tmp_path / "test.csv", 'text,label\na,x\nb,"y"\nc,z\n')
    with pytest.raises(DataError) as excinfo:
        load_task("csv", train_path, test_path, text_columns=["text"], label_column="label")
    assert_one_line_error(excinfo, f"{test_path}:4:", "'z'", "train file")


def test_generic_csv_missing_column_lists_the_header(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\na,x\n")
    with pytest.raises(DataError) as excinfo:
        readers.read_generic_csv(path, ["body"], "label")
    assert_one_line_error(excinfo, f"{path}:1:", "'body'", "text, label")


# ---------------------------------------------------------------- malformed rows


MALFORMED = [
    # (reader, file contents, bad line, words the message must hold)
    ("agnews", '"1","a","b"\n"2","only two"\n', 2, ["expected 3 fields"]),
    ("agnews", '"1","a","b"\n"1","c","d"\n"x","e","f"\n', 3, ["'x' is not a number", "1-4"]),
    ("agnews", '"1","a","b"\n"5","c","d"\n', 2, ["label 5", "1-4"]),
    ("yelp", '1,"bad"\r\n2,"good\nstill the same row"\r\n3,"meh"\r\n', 4, ["label 3", "yelp_full"]),
    ("yelp_full", '1,"bad"\n6,"great"\n', 2, ["label 6", "1-5"]),
    ("yelp", '1,"fine"\n2,"   "\n', 2, ["empty text"]),
    ("imdb", "review,sentiment\nGood,positive\nBad,awful\n", 3, ["unknown sentiment 'awful'", "'positive'"]),
    ("imdb", "review,sentiment\nGood,positive\nBad,negative,extra\n", 3, ["expected 2 fields"]),
    ("spooky_author", "id,text,author\nid1,Once upon,EAP\nid2,A night,XYZ\n", 3, ["unknown author 'XYZ'", "'HPL'"]),
    ("spooky_author", "id,text,author\nid1,,EAP\n", 2, ["empty text"]),
]


@pytest.mark.parametrize("task, contents, line, words", MALFORMED)
def test_malformed_row_names_file_and_line(tmp_path, task, contents, line, words):
    path = write(tmp_path / f"{task}.csv", contents)
    with pytest.raises(DataError) as excinfo:
        tasks.READERS[task](path)
    assert_one_line_error(excinfo, f"{path}:{line}:", *words)


def test_spooky_test_file_without_author_points_to_split_script(tmp_path):
    path = write(tmp_path / "test.csv", '"id","text"\n"id02310","Still, as I urged our leaving Ireland"\n')
    with pytest.raises(DataError) as excinfo:
        readers.read_spooky_author(path)
    assert_one_line_error(excinfo, path, "'author'", "scripts/spooky_author/split_data.py")


@pytest.mark.parametrize("task", ["agnews", "imdb", "spooky_author", "yelp"])
def test_missing_path_is_named(tmp_path, task):
    missing = str(tmp_path / "nowhere" / "train.csv")
    with pytest.raises(DataError) as excinfo:
        tasks.READERS[task](missing)
    assert_one_line_error(excinfo, missing, "no such file")


@pytest.mark.parametrize(
    "contents, words",
    [("", ["file is empty"]), ("\n\n", ["file is empty"]), ("review,sentiment\r\n", ["header but no rows"])],
)
def test_empty_files(tmp_path, contents, words):
    path = write(tmp_path / "empty.csv", contents)
    with pytest.raises(DataError) as excinfo:
        readers.read_imdb(path)
    assert_one_line_error(excinfo, path, *words)


def test_directory_given_as_csv_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        readers.read_agnews(str(tmp_path))
    assert_one_line_error(excinfo, str(tmp_path), "directory")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes('"1","caf\u00e9","ol\u00e9"\n'.encode("latin-1"))
    with pytest.raises(DataError) as excinfo:
        readers.read_agnews(str(path))
    assert_one_line_error(excinfo, str(path), "UTF-8")


def test_text_dataset_checks_labels_and_subsets():
    data = TextDataset(texts=["a", "b", "c"], labels=[0, 1, 1], label_names=("x", "y"), source="t")
    part = data.subset([2, 0])
    assert part.texts == ["c", "a"] and part.labels.tolist() == [1, 0] and part.label_names == ("x", "y")
    with pytest.raises(DataError):
        TextDataset(texts=["a"], labels=[2], label_names=("x", "y"), source="t")
    with pytest.raises(DataError):
        TextDataset(texts=["a", "b"], labels=[0], label_names=("x", "y"), source="t")


# ---------------------------------------------------------------- task options


@pytest.mark.parametrize(
    "args, words",
    [
        (("nope", None, None, None, None), ["unknown task_name 'nope'", "agnews"]),
        (("agnews", "a.csv", None, None, None), ["both train_path and test_path"]),
        (("spooky_author", None, None, None, None), ["needs train_path", "split_data.py"]),
        (("csv", "a.csv", "b.csv", None, "label"), ["text_columns"]),
        (("csv", "a.csv", "b.csv", "text", "label"), ["list of column names"]),
        (("csv", "a.csv", "b.csv", ["text"], None), ["label_column"]),
        (("csv", "a.csv", "b.csv", ["text", "label"], "label"), ["also in text_columns"]),
        (("agnews", None, None, ["text"], None), ["only to task_name=csv"]),
        (("synthetic", "a.csv", "b.csv", None, None), ["drop train_path"]),
        (("imdb", "", "b.csv", None, None), ["train_path is empty"]),
    ],
)
def test_check_task_options_rejects(args, words):
    with pytest.raises(DataError) as excinfo:
        check_task_options(*args)
    assert_one_line_error(excinfo, *words)


def test_check_task_options_accepts_valid_combinations():
    for task in TASK_NAMES:
        if task == "csv":
            check_task_options(task, "a.csv", "b.csv", ["title", "body"], "label")
        elif task == "synthetic":
            check_task_options(task, None, None, None, None)
        else:
            check_task_options(task, "s3://bucket/train.csv", "gs://bucket/test.csv", None, None)


# ---------------------------------------------------------------- Hugging Face fallback


def test_hub_unreachable_fails_fast_with_one_line(monkeypatch):
    """Point the probe at a closed local port so the test never touches the network."""
    monkeypatch.setattr(hub, "endpoint", lambda: "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "offline_mode", lambda: False)
    started = time.monotonic()
    with pytest.raises(DataError) as excinfo:
        load_task("agnews", None, None)
    assert time.monotonic() - started < 30
    assert_one_line_error(excinfo, "task agnews", "could not be reached", "train_path=", "test_path=")


def test_hub_offline_mode_fails_fast_with_one_line(tmp_path):
    """HF_HUB_OFFLINE with an empty cache: datasets' own error, reworded, in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "from scaling_fl.data import load_task, DataError\n"
        "try:\n    load_task('imdb', None, None)\n"
        "except DataError as exc:\n    print(exc)\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    assert "task imdb" in lines[0] and "train_path=" in lines[0]


def test_hub_split_is_cleaned_like_local_files():
    import datasets

    split = datasets.Dataset.from_dict({"text": ["Nice.<br /><br />Really", "Bad"], "label": [1, 0]})
    data = tasks.hub_split_to_dataset(split, readers.IMDB_LABELS, readers.clean_imdb, "hf://imdb[test]")
    assert data.texts == ["Nice. Really", "Bad"]
    assert data.labels.tolist() == [1, 0]


# ---------------------------------------------------------------- spooky split script


@needs_data
def test_spooky_split_script_is_stratified_and_loadable(tmp_path):
    script = REPO / "scripts" / "spooky_author" / "split_data.py"
    source = DATA / "spooky_author" / "train.csv"
    out = tmp_path / "spooky"
    command = [
        sys.executable,
        str(script),
        "--input",
        str(source),
        "--output-dir",
        str(out),
        "--test-fraction",
        "0.2",
        "--seed",
        "7",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)

    train_rows, test_rows = (read_raw(out / name) for name in ("train.csv", "test.csv"))
    train_ids, test_ids = {r["id"] for r in train_rows}, {r["id"] for r in test_rows}
    assert not train_ids & test_ids
    assert train_ids | test_ids == {r["id"] for r in read_raw(source)}
    for author, total in {"EAP": 7900, "HPL": 5635, "MWS": 6044}.items():
        held_out = sum(r["author"] == author for r in test_rows)
        assert held_out == round(0.2 * total)

    train, test = load_task("spooky_author", str(out / "train.csv"), str(out / "test.csv"))
    assert (len(train), len(test)) == (len(train_rows), len(test_rows))
    assert train.label_names == test.label_names == ("EAP", "HPL", "MWS")

    again = tmp_path / "again"
    subprocess.run([*command[:5], str(again), *command[6:]], check=True, capture_output=True, timeout=60)
    assert (again / "test.csv").read_bytes() == (out / "test.csv").read_bytes()


def test_spooky_split_script_reports_bad_input(tmp_path):
    script = REPO / "scripts" / "spooky_author" / "split_data.py"
    missing = str(tmp_path / "missing.csv")
    result = subprocess.run(
        [sys.executable, str(script), "--input", missing, "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert missing in result.stderr and len(result.stderr.strip().splitlines()) == 1


def read_raw(path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))
