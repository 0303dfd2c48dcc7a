"""Property-based fuzzing of the server from its own OpenAPI schema (schemathesis): no request it generates, valid
or not, may produce a 5xx, and the server keeps serving afterwards."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from test_server import LiveServer, tiny_llm, tiny_model_dir  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def live(tiny_llm):  # noqa: F811
    from unigemma.server import ServerSettings

    s = ServerSettings(model_name="tiny", max_model_len=128, max_concurrency=4)
    with LiveServer(tiny_llm, s) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, live):
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) >= {"message", "type", "param", "code"}


def test_still_serving_after_fuzz(live):
    r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
