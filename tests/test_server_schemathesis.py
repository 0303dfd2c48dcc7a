"""Property-based fuzzing of the server from its own OpenAPI schema (schemathesis): no request it generates, valid
or not, may produce a 5xx, and the server keeps serving afterwards.

The cases come from schemathesis' Hypothesis strategies (`APIOperation.as_strategy`) inside one plain test, not
from its pytest plugin (`schemathesis.pytest.from_fixture`), which reaches into pytest's private node attributes
and broke on pytest 9.2 (`'Function' object has no attribute '_nodeid'`)."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from test_server import LiveServer, tiny_llm, tiny_model_dir  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def live(tiny_llm):  # noqa: F811
    from unigemma.server import ServerSettings

    s = ServerSettings(model_name="tiny", max_model_len=128, max_concurrency=4)
    with LiveServer(tiny_llm, s) as srv:
        yield srv


def _check(case, url: str) -> None:
    response = case.call(base_url=url, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body


def test_no_server_errors(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= paths, paths
    for op in operations:
        cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            _check(case, live.url)

        try:
            fuzz()
        except Exception as e:  # say which operation failed; Hypothesis has printed the falsifying case
            raise AssertionError(f"{op.method.upper()} {op.path}: {e}") from e


def test_still_serving_after_fuzz(live):
    r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
