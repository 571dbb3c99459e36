"""Readers, column mapping, source recognition, file layout, fallback and download."""

import json
import shutil
from pathlib import Path

import pytest

from phyassist.config import ConfigError, load_config
from phyassist.data.download import make_fetcher
from phyassist.data.records import DataError
from phyassist.data.schema import DataConfig, SourceConfig
from phyassist.data.sources import (MissingDataError, group_of, locate, map_rows, post_of, recognise,
                                    source_for_file)
from phyassist.data.tables import read_table
from phyassist.paths import SAMPLE_DIR


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# --- bad input ---------------------------------------------------------------------------------

def test_non_utf8_names_file_and_line(tmp_path):
    p = write(tmp_path / "x.csv", "question,answer\nok,fine\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"x\.csv: line 3: not UTF-8 text \(byte 0xe9\)"):
        read_table(p)


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"e\.csv: file is empty"):
        read_table(write(tmp_path / "e.csv", "  \n"))
    with pytest.raises(DataError, match="header but no data rows"):
        read_table(write(tmp_path / "h.csv", "question,answer\n"))


def test_malformed_csv_names_line(tmp_path):
    p = write(tmp_path / "m.csv", 'question,answer\n"a","b"\n"c","d","e"\n')
    with pytest.raises(DataError, match=r"m\.csv: line 3: expected 2 fields"):
        read_table(p)


def test_multiline_fields_keep_their_start_line(tmp_path):
    p = write(tmp_path / "ml.csv", 'question,answer\n"line one\nline two",a\nq2,a2\n')
    assert [line for line, _ in read_table(p)] == [2, 4]


def test_malformed_json_and_jsonl(tmp_path):
    with pytest.raises(DataError, match=r"j\.json: line 2: not valid JSON"):
        read_table(write(tmp_path / "j.json", '[{"question": "a",\n "answer": }]'))
    with pytest.raises(DataError, match=r"l\.jsonl: line 2: not valid JSON"):
        read_table(write(tmp_path / "l.jsonl", '{"question": "a", "answer": "b"}\n{oops\n'))
    with pytest.raises(DataError, match=r"item 2: expected an object"):
        read_table(write(tmp_path / "k.json", '[{"question": "a", "answer": "b"}, 3]'))


def test_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type \.xlsx"):
        read_table(write(tmp_path / "t.xlsx", "x"))


def test_missing_column_named(tmp_path):
    p = write(tmp_path / "q.csv", "query,answer\na,b\n")
    src = SourceConfig(name="DR", kind="imhi")
    with pytest.raises(DataError, match=r"q\.csv: missing column\(s\) \['gpt-3.5-turbo'\]; found \['query', 'answer'\]"):
        map_rows(p, read_table(p), src)


def test_missing_field_in_jsonl_record_names_line(tmp_path):
    p = write(tmp_path / "r.jsonl", '{"q": "a", "a": "b"}\n{"q": "c"}\n')
    src = SourceConfig(name="mine", kind="table", path=str(p), question_column="q", answer_column="a")
    with pytest.raises(DataError, match=r"r\.jsonl: line 2: record has no field 'a'"):
        map_rows(p, read_table(p), src)


def test_unknown_source_and_columns(tmp_path):
    p = write(tmp_path / "u.csv", "foo,bar\n1,2\n")
    with pytest.raises(DataError, match=r"cannot tell which source.*\['foo', 'bar'\].*--source"):
        recognise(p, ["foo", "bar"])
    with pytest.raises(DataError, match="unknown source 'nope'"):
        source_for_file(p, kind="nope")


def test_bad_config_values_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.kind"):
        load_config("smoke", {"data.sources": [{"name": "x", "kind": "excel"}]})
    with pytest.raises(ConfigError, match="kind 'table' needs a path"):
        load_config("smoke", {"data.sources": [{"name": "x", "kind": "table"}]})
    with pytest.raises(ConfigError, match=r"data\.fallback_split"):
        load_config("smoke", ["data.fallback_split=test"])
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        load_config("smoke", ["data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"data\.cleaning\.max_tokens"):
        load_config("smoke", ["data.cleaning.max_tokens=0"])
    with pytest.raises(ConfigError, match="duplicate source name"):
        load_config("smoke", {"data.sources": [{"name": "DR"}, {"name": "DR"}]})


# --- column mapping ----------------------------------------------------------------------------

def test_imhi_instruction_mapping_and_post():
    p = SAMPLE_DIR / "MentalLLaMA/train_data/instruction_data/DR/train.csv"
    rows = map_rows(p, read_table(p), SourceConfig(name="DR"))
    assert rows[0].origin == "DR/train.csv:2"
    assert rows[0].answer.startswith("Yes, the poster suffers from depression. Reasoning:")
    assert post_of(rows[0].question).startswith("[Synthetic example] Most mornings")
    shouted = rows[0].question.replace("Most mornings I lie", "MOST   mornings, I lie")
    assert group_of(rows[0]) == group_of(rows[0].__class__("x", shouted, "", "o"))  # same post, same group


def test_imhi_complete_mapping(tmp_path):
    p = write(tmp_path / "complete_data/DR/reddit_train.csv",
              'post,question,response\n"Post: I feel low."," Question: The answer to the question ""Does the '
              'poster suffers from depression?"" is ","yes. Reasoning: low mood."\n')
    src, rows = source_for_file(p)
    assert src.kind == "imhi" and src.variant == "complete" and src.name == "DR"
    assert rows[0].question.startswith("Post: I feel low. Question: The answer")
    assert rows[0].answer == "yes. Reasoning: low mood." and post_of(rows[0].question) == "I feel low."


def test_counsel_chat_mapping_joins_title_and_text():
    p = SAMPLE_DIR / "counsel-chat/20200325_counsel_chat.csv"
    src, rows = source_for_file(p)
    assert src.kind == "counsel_chat"
    assert rows[0].question.startswith("How do I stop overthinking at night?\n\n[Synthetic example] Every night")
    assert rows[0].answer.startswith("[Synthetic example] Many people") and rows[0].extra["split"] == "train"
    assert rows[0].group == rows[1].group  # same questionID


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl"])
def test_table_mapping_any_format(tmp_path, suffix):
    recs = [{"prompt_text": "Q1?", "reply": "A1.", "id": 1}, {"prompt_text": "Q2?", "reply": "A2.", "id": 2}]
    if suffix == ".json":
        text = json.dumps({"data": recs})
    elif suffix == ".jsonl":
        text = "\n".join(json.dumps(r) for r in recs)
    else:
        sep = "\t" if suffix == ".tsv" else ","
        text = sep.join(recs[0]) + "\n" + "\n".join(sep.join(str(v) for v in r.values()) for r in recs)
    p = write(tmp_path / f"mine{suffix}", text)
    src = SourceConfig(name="mine", kind="table", path=str(p), question_column="prompt_text", answer_column="reply")
    rows = map_rows(p, read_table(p), src)
    assert [(r.question, r.answer) for r in rows] == [("Q1?", "A1."), ("Q2?", "A2.")]


def test_recognise_by_columns():
    assert recognise(Path("x"), ["query", "gpt-3.5-turbo"]) == "imhi"
    assert recognise(Path("x"), ["", "post", "question", "response"]) == "imhi_complete"
    assert recognise(Path("x"), ["questionID", "questionTitle", "questionText", "answerText", "split"]) == "counsel_chat"
    assert recognise(Path("x"), ["question", "answer"]) == "table"


# --- layout, fallback, download ----------------------------------------------------------------

def sample_copy(tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(SAMPLE_DIR / "MentalLLaMA", root / "MentalLLaMA")
    shutil.copytree(SAMPLE_DIR / "counsel-chat", root / "counsel-chat")
    return root


def test_missing_train_falls_back_to_val_never_test(tmp_path):
    root = sample_copy(tmp_path)
    dcfg = DataConfig(data_dir=str(root))
    loc = locate(SourceConfig(name="Irf"), dcfg)
    assert loc.split == "val" and loc.path.name == "val.csv" and "train split missing" in loc.note
    (root / "MentalLLaMA/train_data/instruction_data/Irf/val.csv").unlink()
    assert (root / "MentalLLaMA/test_data/test_instruction/Irf.csv").exists()
    with pytest.raises(MissingDataError, match=r"Irf/train\.csv: file not found.*val split is missing too.*"
                                               r"raw\.githubusercontent\.com/SteveKGYang/MentalLLaMA"):
        locate(SourceConfig(name="Irf"), dcfg)


def test_fallback_off_names_file_and_where_to_get_it(tmp_path):
    root = sample_copy(tmp_path)
    with pytest.raises(MissingDataError, match=r"MultiWD/train\.csv: file not found.*fallback_split is off"):
        locate(SourceConfig(name="MultiWD"), DataConfig(data_dir=str(root), fallback_split=None))
    (root / "counsel-chat/20200325_counsel_chat.csv").unlink()
    with pytest.raises(MissingDataError, match=r"20200325_counsel_chat\.csv: file not found.*nbertagnolli"):
        locate(SourceConfig(name="counsel-chat", kind="counsel_chat"), DataConfig(data_dir=str(root)))


def test_download_fetches_missing_files_atomically(tmp_path):
    """The real download code, pointed at a file:// mirror of the upstream layout."""
    mirror = sample_copy(tmp_path / "mirror")
    dest = tmp_path / "raw"
    dcfg = DataConfig(data_dir=str(dest), download=True, mentalllama_url=(mirror / "").as_uri().rstrip("/"),
                      counsel_chat_url=(mirror / "counsel-chat/20200325_counsel_chat.csv").as_uri())
    fetch = make_fetcher(dcfg, dest)
    loc = locate(SourceConfig(name="DR"), dcfg, fetch)
    assert loc.path == dest / "MentalLLaMA/train_data/instruction_data/DR/train.csv" and loc.path.exists()
    loc = locate(SourceConfig(name="Irf"), dcfg, fetch)  # upstream has no Irf train: 404 -> val
    assert loc.split == "val" and loc.path.exists()
    loc = locate(SourceConfig(name="counsel-chat", kind="counsel_chat"), dcfg, fetch)
    assert loc.path.read_bytes() == (mirror / "counsel-chat/20200325_counsel_chat.csv").read_bytes()
    assert not list(dest.rglob(".*.tmp"))


def test_download_without_network_says_what_to_do(tmp_path):
    dcfg = DataConfig(data_dir=str(tmp_path), download=True, mentalllama_url="http://127.0.0.1:9/none")
    with pytest.raises(OSError, match="download failed.*point data.data_dir at a local copy"):
        locate(SourceConfig(name="DR"), dcfg, make_fetcher(dcfg, tmp_path))
    assert not any(tmp_path.rglob("*.csv"))


def test_shared_layout_found(shared_data):
    dcfg = DataConfig(data_dir=str(shared_data))
    for name in ("DR", "dreaddit", "SAD"):
        assert locate(SourceConfig(name=name), dcfg).split == "train"
    for name in ("Irf", "MultiWD"):
        assert locate(SourceConfig(name=name), dcfg).split == "val"
    loc = locate(SourceConfig(name="DR_complete"), dcfg)
    assert loc.path.name == "reddit_train.csv"
    rows = map_rows(loc.path, read_table(loc.path), SourceConfig(name="DR_complete"))
    assert len(rows) > 500 and rows[0].question.startswith("Post:")
