"""Fixtures of the complexity tests: the fake API of _fake_api.py in each dialect, a made-up key, and a guard that
fails any test whose code tries to reach a host other than loopback."""
from __future__ import annotations

import urllib.parse
import urllib.request

import pytest

from _fake_api import FakeApi


@pytest.fixture(params=["openai", "anthropic"])
def fake_api(request):
    api = FakeApi(request.param)
    yield api
    api.close()


@pytest.fixture
def fake_key(monkeypatch, fake_api):
    """A made-up key in the API's default variable (a real key in the environment is never used)."""
    env = "OPENAI_API_KEY" if fake_api.dialect == "openai" else "ANTHROPIC_API_KEY"
    monkeypatch.setenv(env, "test-key")
    return env


@pytest.fixture(autouse=True)
def only_loopback(monkeypatch):
    """No test may reach a real API: any request to a host other than 127.0.0.1 fails the test."""
    real = urllib.request.urlopen

    def guarded(request, *args, **kwargs):
        url = request.full_url if isinstance(request, urllib.request.Request) else str(request)
        host = urllib.parse.urlsplit(url).hostname
        assert host == "127.0.0.1", f"a test tried to reach {host}"
        return real(request, *args, **kwargs)
    monkeypatch.setattr(urllib.request, "urlopen", guarded)


