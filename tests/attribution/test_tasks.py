"""The task format: the loader, its errors (each names the line), tokenizing, padding, the bundled tasks."""
import numpy as np
import pytest

from _attribution_cases import write_lines
from crossjax.attribution import tasks
from crossjax.errors import CrossjaxError

GOOD = {"clean": "he said thou", "corrupted": "he said ye", "right": " art", "wrong": " are"}


def test_a_task_file_tokenizes_right_padded_with_the_metric_at_the_last_real_token(tmp_path, word_tokenizer):
    path = write_lines(tmp_path / "t.jsonl", [GOOD, "", {"clean": "thou", "corrupted": "ye", "right": "hast",
                                                         "wrong": "have", "meta": {"any": "thing"}},
                                              {"clean_ids": [0, 9, 3], "corrupted_ids": [0, 9, 2], "right_id": 5,
                                               "wrong_id": 4}])
    task = tasks.read_task(path)
    assert task.name == "t" and [p.where for p in task.pairs] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    t = tasks.tokenize(task, word_tokenizer)
    ids = {w: i for i, w in enumerate(["<|endoftext|>", "<|padding|>", "thou", "ye", "art", "are", "hast", "have",
                                       "and", "he", "said"])}
    np.testing.assert_array_equal(t.clean, [[0, ids["he"], ids["said"], ids["thou"]], [0, ids["thou"], 1, 1],
                                            [0, 9, 3, 1]])
    np.testing.assert_array_equal(t.corrupted[0], [0, ids["he"], ids["said"], ids["ye"]])
    np.testing.assert_array_equal(t.last, [3, 1, 2])
    np.testing.assert_array_equal(t.mask, [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(t.valid, t.mask & (np.arange(4) > 0))     # BOS is not read by the crosscoder
    np.testing.assert_array_equal(t.right, [ids["art"], ids["hast"], 5])
    np.testing.assert_array_equal(t.wrong, [ids["are"], ids["have"], 4])


@pytest.mark.parametrize("line, message", [
    ('{"clean": "thou", "corrupted": "ye", "right": " art"', "not a JSON object"),
    ('["thou", "ye", "art", "are"]', "holds list, not a JSON object"),
    ('{"clean": "thou", "corrupted": "ye", "right": " art", "wrong": " are", "currupted": "x"}', "unknown field"),
    ('{"clean": "thou", "corrupted": "ye", "right": " art"}', "exactly one of 'wrong'"),
    ('{"clean": "thou", "clean_ids": [0, 2], "corrupted": "ye", "right": " art", "wrong": " are"}',
     "exactly one of 'clean'"),
    ('{"clean": "", "corrupted": "ye", "right": " art", "wrong": " are"}', "clean must be a non-empty string"),
    ('{"clean_ids": [0, -2], "corrupted_ids": [0, 3], "right_id": 4, "wrong_id": 5}', "clean_ids must be"),
    ('{"clean_ids": [0, 2], "corrupted_ids": [0, 3], "right_id": 4.5, "wrong_id": 5}', "right_id must be"),
])
def test_a_malformed_line_is_named(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, line])
    with pytest.raises(CrossjaxError, match=message) as e:
        tasks.read_task(path)
    assert f"{path}:3:" in str(e.value)


@pytest.mark.parametrize("record, message", [
    ({**GOOD, "right": " art now"}, r"right answer ' art now' is 2 tokens .* must be one token"),
    ({**GOOD, "wrong": " are are are"}, r"wrong answer ' are are are' is 3 tokens"),
    ({**GOOD, "corrupted": "he said ye and"}, "clean prompt is 4 tokens and the corrupted one 5"),
    ({**GOOD, "wrong": " art"}, "the same token"),
    ({"clean_ids": [0, 2], "corrupted_ids": [0, 3], "right_id": 4, "wrong_id": 99}, "outside the tokenizer"),
])
def test_a_line_the_tokenizer_cannot_take_is_named_or_left_out(tmp_path, word_tokenizer, record, message):
    path = write_lines(tmp_path / "t.jsonl", [GOOD, record, GOOD])
    task = tasks.read_task(path)
    with pytest.raises(CrossjaxError, match=message) as e:
        tasks.tokenize(task, word_tokenizer)
    assert str(e.value).startswith(f"{path}:2:")
    kept = tasks.tokenize(task, word_tokenizer, skip_invalid=True)
    assert kept.where == (f"{path}:1", f"{path}:3") and len(kept.skipped) == 1 and f"{path}:2:" in kept.skipped[0]


def test_a_prompt_longer_than_the_model_and_an_empty_file_are_refused(tmp_path, word_tokenizer):
    path = write_lines(tmp_path / "t.jsonl", [GOOD])
    with pytest.raises(CrossjaxError, match=f"{path}:1: the prompt is 4 tokens, more than the model's 3"):
        tasks.tokenize(tasks.read_task(path), word_tokenizer, max_len=3)
    with pytest.raises(CrossjaxError, match="no pair is usable"):
        tasks.tokenize(tasks.read_task(path), word_tokenizer, max_len=3, skip_invalid=True)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CrossjaxError, match="holds no pair"):
        tasks.read_task(tmp_path / "empty.jsonl")
    with pytest.raises(CrossjaxError, match="not found"):
        tasks.load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(CrossjaxError, match="unknown task 'iou'.*ioi"):
        tasks.load_task("iou")


def test_induction_repeats_a_random_sequence_and_answers_with_the_next_token(word_tokenizer):
    t = tasks.induction_task(word_tokenizer, pairs=20, length=5, seed=3)
    assert t.pairs == tasks.induction_task(word_tokenizer, pairs=20, length=5, seed=3).pairs   # seeded
    for p in t.pairs:
        clean, corr = np.array(p.clean), np.array(p.corrupted)
        j = len(clean) - 1 - 5
        assert clean[0] == 0 and 1 <= j <= 4 and len(corr) == len(clean)
        np.testing.assert_array_equal(clean[6:], clean[1:1 + j])
        np.testing.assert_array_equal(corr[6:], corr[1:1 + j])
        assert p.right == clean[1 + j] and p.wrong == corr[1 + j]
        assert len(set(clean[1:6]) | set(corr[1:6])) == 10 and not set(clean[1:]) & {0, 1}   # distinct, no special
    tt = tasks.tokenize(t, word_tokenizer)
    assert tt.num_pairs == 20 and tt.valid[:, 0].sum() == 0


def test_every_bundled_task_loads_and_its_pairs_come_in_both_directions(word_tokenizer):
    for name in tasks.FILE_TASKS:
        task = tasks.load_task(name)
        assert task.name == name and len(task.pairs) >= 100
        pairs = {(p.clean, p.corrupted, p.right, p.wrong) for p in task.pairs}
        if name != "ioi":
            assert all((b, a, w, r) in pairs for a, b, r, w in pairs)
    with pytest.raises(CrossjaxError, match="pass its tokenizer"):
        tasks.load_task("induction")
    with pytest.raises(CrossjaxError, match="14 ordinary tokens; induction with length=12 needs 24"):
        tasks.load_task("induction", word_tokenizer)


def test_the_bundled_files_are_what_the_templates_write(tmp_path):
    from crossjax.attribution import templates
    counts = templates.write_bundled(str(tmp_path))
    for name, n in counts.items():
        assert (tmp_path / f"{name}.jsonl").read_text() == open(tasks.bundled_path(name)).read()
        assert n == len(tasks.read_task(tmp_path / f"{name}.jsonl").pairs)
    assert sorted(counts) == sorted(tasks.FILE_TASKS)
