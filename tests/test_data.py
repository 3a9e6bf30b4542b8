"""Corpora: local JSONL, pairing, and errors that name the field before any training."""

import json

import pytest

from raylens.config import ConfigError, DataConfig
from raylens.data import collate, load_texts


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_local_jsonl_pairs_by_index(tmp_path):
    forget = _jsonl(tmp_path / "f.jsonl", [{"text": f"forget {i}"} for i in range(5)])
    retain = _jsonl(tmp_path / "r.jsonl", [{"text": f"retain {i}", "extra": 1} for i in range(7)])
    f, r = load_texts(DataConfig(forget=forget, retain=retain, num_examples=4))
    assert f == [f"forget {i}" for i in range(4)] and r == [f"retain {i}" for i in range(4)]


@pytest.mark.parametrize(
    "rows, message",
    [
        (["{not json"], r"data\.forget=.*line 1 is not JSON"),
        ([{"body": "x"}], r"data\.forget=.*line 1 has no non-empty 'text' field \(keys: \['body'\]\)"),
        ([{"text": "ok"}, {"text": "  "}], r"data\.forget=.*line 2 has no non-empty 'text'"),
        ([{"text": "ok"}], r"data\.num_examples=2 is invalid: allowed at most 1"),
    ],
)
def test_malformed_sources_name_the_field(tmp_path, rows, message):
    forget = _jsonl(tmp_path / "f.jsonl", rows)
    retain = _jsonl(tmp_path / "r.jsonl", [{"text": "r"}] * 3)
    with pytest.raises(ConfigError, match=message):
        load_texts(DataConfig(forget=forget, retain=retain, num_examples=2))


def test_missing_file_and_offline_hub_are_clear_errors(tmp_path):
    retain = _jsonl(tmp_path / "r.jsonl", [{"text": "r"}] * 3)
    with pytest.raises(ConfigError, match=r"data\.forget='/no/such\.jsonl': no such file"):
        load_texts(DataConfig(forget="/no/such.jsonl", retain=retain, num_examples=1))
    with pytest.raises(ConfigError, match=r"data\.forget='Unlearning/WMDP-Bio-Remove-Dataset' is "
                                          r"neither a local JSONL file nor a loadable hub dataset"):
        load_texts(DataConfig(forget="Unlearning/WMDP-Bio-Remove-Dataset", retain=retain,
                              num_examples=1))


def test_collate_right_pads_and_masks():
    batch = collate([[5, 6, 7], [8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.num_tokens == 4
