"""The LLM scorer against a fake API on loopback, in both dialects: request format, retries on 5xx and timeouts,
429 with Retry-After, malformed and out-of-range answers, the answer cache, and that nothing is sent without
allow_network."""
import json

import pytest

from _fake_api import GOOD, error, feature, reply, slow
from _procs import free_port
from crossjax.complexity import prompts
from crossjax.complexity.llm import LLMScorer
from crossjax.complexity.transport import RetryPolicy, retry_after_seconds
from crossjax.errors import CrossjaxError

FAST = RetryPolicy(timeout_s=5.0, max_retries=3, backoff_s=0.001, max_backoff_s=0.01)
CAT = feature(7, ["the black cat", "a fat cat", "my cat"])
DOG = feature(8, ["a big dog barks", "the dog"], firing=-1)


def scorer(api, tmp_path, **kw):
    kw = {"allow_network": True, "cache_dir": tmp_path / "cache", "retry": FAST, "show_progress": False, **kw}
    return LLMScorer(api.dialect, "fake-model", base_url=api.base_url, **kw)


def messages_of(request):
    return request["body"]["messages"]


def test_request_and_answer_in_each_api_format(fake_api, fake_key, tmp_path):
    [s] = scorer(fake_api, tmp_path).score([CAT])
    assert (s.feature, s.complexity, s.explanation, s.source, s.cached, s.error) == \
        (7, 3, "the token 'cat'", f"{fake_api.dialect}:fake-model", False, None)
    [req] = fake_api.requests
    body, headers = req["body"], {k.lower(): v for k, v in req["headers"].items()}
    assert body["model"] == "fake-model"
    if fake_api.dialect == "openai":
        assert req["path"] == "/v1/chat/completions"
        assert headers["authorization"] == "Bearer test-key"
        system, user = body["messages"]
        assert system == {"role": "system", "content": prompts.SYSTEM}
    else:
        assert req["path"] == "/v1/messages"
        assert headers["x-api-key"] == "test-key" and headers["anthropic-version"] == "2023-06-01"
        assert "authorization" not in headers
        assert body["system"] == prompts.SYSTEM
        [user] = body["messages"]
    assert user["role"] == "user"
    assert "1. (activation 2) the black[[ cat]]\n" in user["content"]
    assert "3. (activation 2) my[[ cat]]" in user["content"]
    assert "1 - a single specific token" in prompts.SYSTEM and "5 - a rich, abstract concept" in prompts.SYSTEM


def test_server_error_then_success_is_retried(fake_api, fake_key, tmp_path):
    fake_api.script = [error(500), error(503), reply()]
    [s] = scorer(fake_api, tmp_path).score([CAT])
    assert s.complexity == 3 and len(fake_api.requests) == 3


def test_server_errors_past_the_retries_are_a_recorded_failure(fake_api, fake_key, tmp_path):
    fake_api.script = [error(500)] * 4  # first try + 3 retries, then the next feature is served normally
    a, b = scorer(fake_api, tmp_path).score([CAT, DOG])
    assert not a.ok and "HTTP 500" in a.error and "gave up after 4 attempts" in a.error
    assert b.ok and len(fake_api.requests) == 5


def test_failures_apart_do_not_stop_the_run(fake_api, fake_key, tmp_path):
    fake_api.script = [error(502), error(502), reply(), error(502), error(502)]  # CAT fails, DOG ok, BIRD fails
    bird = feature(9, ["a bird"])
    out = scorer(fake_api, tmp_path, retry=RetryPolicy(max_retries=1, backoff_s=0.001),
                 max_consecutive_failures=2).score([CAT, DOG, bird])
    assert [s.ok for s in out] == [False, True, False] and len(fake_api.requests) == 5


def test_429_waits_for_retry_after(fake_api, fake_key, tmp_path):
    fake_api.script = [error(429, {"Retry-After": "0.4"}), reply()]
    [s] = scorer(fake_api, tmp_path).score([CAT])  # backoff alone would wait 0.001 s
    first, second = fake_api.requests
    assert s.ok and second["time"] - first["time"] >= 0.4


def test_429_asking_too_long_a_wait_gives_up_at_once(fake_api, fake_key, tmp_path):
    fake_api.script = [error(429, {"Retry-After": "3600"})]
    [s] = scorer(fake_api, tmp_path).score([CAT])
    assert not s.ok and "asks to wait 3600 s" in s.error and len(fake_api.requests) == 1


def test_timeout_is_retried(fake_api, fake_key, tmp_path):
    fake_api.script = [slow(1.5), reply()]
    quick = RetryPolicy(timeout_s=0.3, max_retries=2, backoff_s=0.001)
    [s] = scorer(fake_api, tmp_path, retry=quick).score([CAT])
    assert s.ok and len(fake_api.requests) == 2


def test_malformed_answer_gets_one_firmer_retry(fake_api, fake_key, tmp_path):
    fake_api.script = [reply("I think it is about cats, maybe a 3?"), reply("```json\n" + GOOD + "\n```")]
    [s] = scorer(fake_api, tmp_path).score([CAT])
    assert s.ok and s.complexity == 3
    retry = messages_of(fake_api.requests[1])[-3:]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == "I think it is about cats, maybe a 3?"
    assert "ONLY one JSON object" in retry[2]["content"] and "no JSON object" in retry[2]["content"]


def test_out_of_range_twice_is_a_recorded_failure_not_a_crash(fake_api, fake_key, tmp_path):
    fake_api.script = [reply('{"explanation": "cats", "complexity": 7}'),
                       reply('{"explanation": "cats", "complexity": 0}')]
    a, b = scorer(fake_api, tmp_path).score([CAT, DOG])
    assert a.complexity is None and "complexity=7 is outside the scale 1..5" in a.error and "complexity=0" in a.error
    assert b.ok and len(fake_api.requests) == 3


@pytest.mark.parametrize("answer", ['{"explanation": "x", "complexity": "high"}', '{"complexity": 2}',
                                    '{"explanation": "x", "complexity": true}', "", "[1, 2]"])
def test_unusable_answers_are_rejected_by_the_parser(answer):
    with pytest.raises(prompts.AnswerError):
        prompts.parse_answer(answer)


def test_second_run_is_answered_from_the_cache(fake_api, fake_key, tmp_path):
    fake_api.script = [reply("not json"), reply(GOOD)]  # CAT needs the firmer follow-up: both exchanges cached
    first = scorer(fake_api, tmp_path).score([CAT, DOG])
    sent = len(fake_api.requests)
    assert sent == 3
    again = scorer(fake_api, tmp_path).score([CAT, DOG])
    assert len(fake_api.requests) == sent  # nothing sent
    assert [s.complexity for s in again] == [s.complexity for s in first] and all(s.cached for s in again)
    offline = scorer(fake_api, tmp_path, allow_network=False).score([CAT, DOG])  # the cache needs no flag
    assert [s.complexity for s in offline] == [3, 3] and len(fake_api.requests) == sent


def test_other_model_or_api_is_not_served_from_the_cache(fake_api, fake_key, tmp_path):
    scorer(fake_api, tmp_path).score([CAT])
    LLMScorer(fake_api.dialect, "other-model", base_url=fake_api.base_url, allow_network=True,
              cache_dir=tmp_path / "cache", retry=FAST, show_progress=False).score([CAT])
    assert len(fake_api.requests) == 2


def test_nothing_is_sent_without_allow_network(fake_api, fake_key, tmp_path, capsys):
    with pytest.raises(CrossjaxError, match=r"2 features are not in the answer cache.*allow_network=True"):
        scorer(fake_api, tmp_path, allow_network=False).score([CAT, DOG])
    assert fake_api.requests == []
    said = capsys.readouterr().err
    assert f"2 prompts to send to 127.0.0.1:{fake_api.port} ({fake_api.dialect} API, model fake-model)" in said
    assert "0 of 2 features answered from the cache" in said


def test_the_default_is_not_to_send(fake_api, fake_key, tmp_path):
    s = LLMScorer(fake_api.dialect, "fake-model", base_url=fake_api.base_url, cache_dir=tmp_path)
    with pytest.raises(CrossjaxError, match="allow_network"):
        s.score([CAT])
    assert fake_api.requests == []


def test_default_host_gets_nothing_without_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")  # even with a key set (only_loopback fails any request)
    with pytest.raises(CrossjaxError, match="to send their prompts to api.anthropic.com"):
        LLMScorer("anthropic", "m", cache_dir=tmp_path).score([CAT])


def test_missing_key_names_the_variable(fake_api, fake_key, tmp_path, monkeypatch):
    monkeypatch.delenv(fake_key)
    with pytest.raises(CrossjaxError, match=f"environment variable {fake_key}, which is not set"):
        scorer(fake_api, tmp_path).score([CAT])
    monkeypatch.setenv("MY_KEY", "k2")
    scorer(fake_api, tmp_path, key_env="MY_KEY").score([CAT])
    assert len(fake_api.requests) == 1


def test_refused_key_stops_at_once_with_the_fix(fake_api, fake_key, tmp_path):
    fake_api.script = [error(401, body={"error": {"message": "invalid x-api-key"}})]
    with pytest.raises(CrossjaxError, match=rf"refused the key in \${fake_key} \(HTTP 401: invalid x-api-key\)"):
        scorer(fake_api, tmp_path).score([CAT, DOG])
    assert len(fake_api.requests) == 1  # not retried, and DOG not tried


def test_unknown_model_names_model_and_url(fake_api, fake_key, tmp_path):
    fake_api.script = [error(404, body={"error": {"message": "model not found"}})]
    with pytest.raises(CrossjaxError, match=r"model not found.*model='fake-model'"):
        scorer(fake_api, tmp_path).score([CAT])


def test_unreachable_host_stops_after_failures_in_a_row_and_keeps_answers(fake_api, fake_key, tmp_path):
    scorer(fake_api, tmp_path).score([CAT])  # cached
    dead = free_port()  # nothing listens here once closed
    url = f"http://127.0.0.1:{dead}" + ("/v1" if fake_api.dialect == "openai" else "")
    dogs = [feature(10 + i, [f"dog number {i}"]) for i in range(3)]
    with pytest.raises(CrossjaxError, match=r"2 features in a row got no answer from 127.0.0.1.*cannot reach"):
        LLMScorer(fake_api.dialect, "fake-model", base_url=url, allow_network=True, cache_dir=tmp_path / "cache",
                  retry=RetryPolicy(max_retries=1, backoff_s=0.001), max_consecutive_failures=2,
                  show_progress=False).score([CAT, *dogs])
    [s] = scorer(fake_api, tmp_path).score([CAT])
    assert s.cached and len(fake_api.requests) == 1


def test_damaged_cache_entry_is_asked_again_and_replaced(fake_api, fake_key, tmp_path):
    scorer(fake_api, tmp_path).score([CAT])
    [entry] = (tmp_path / "cache").glob("??/*.json")
    entry.write_text('{"answer": ')  # truncated
    [s] = scorer(fake_api, tmp_path).score([CAT])
    assert s.ok and not s.cached and len(fake_api.requests) == 2
    assert json.loads(entry.read_text())["answer"] == GOOD


def test_feature_without_contexts_fails_without_sending(fake_api, fake_key, tmp_path):
    [s] = scorer(fake_api, tmp_path).score([feature(3, [])])
    assert not s.ok and "no contexts" in s.error and fake_api.requests == []


def test_bad_settings_are_errors(tmp_path):
    with pytest.raises(CrossjaxError, match="api='gemini'"):
        LLMScorer("gemini", "m")
    with pytest.raises(CrossjaxError, match="name the openai model"):
        LLMScorer("openai", "")
    with pytest.raises(CrossjaxError, match="not an http"):
        LLMScorer("openai", "m", base_url="ftp://x")
    with pytest.raises(CrossjaxError, match="allow_network='yes'"):
        LLMScorer("openai", "m", allow_network="yes")
    with pytest.raises(CrossjaxError, match=r"RetryPolicy\(timeout_s=0, max_retries=-1\)"):
        RetryPolicy(timeout_s=0, max_retries=-1)


def test_retry_after_forms():
    from datetime import datetime, timezone
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=timezone.utc)
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 60.0
    assert retry_after_seconds("2.5") == 2.5 and retry_after_seconds("-3") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_make_scorer_by_name(fake_api, fake_key, tmp_path):
    from crossjax.complexity import make_scorer
    from crossjax.complexity.offline import OfflineScorer
    assert isinstance(make_scorer("offline"), OfflineScorer)
    s = make_scorer(fake_api.dialect, model="fake-model", base_url=fake_api.base_url, cache_dir=tmp_path,
                    allow_network=True, show_progress=False)
    assert s.score([CAT])[0].complexity == 3 and s.key_env == fake_key
    with pytest.raises(CrossjaxError, match="not one of"):
        make_scorer("gpt")
