"""genfast serve under generated requests: schemathesis sends what the app's own OpenAPI
schema allows (positive) and what it forbids (negative), and every answer must be no 5xx
and be what the schema says; hypothesis sends any text as a prompt to a text model."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="genfast serve needs the [serve] extra")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from genfast.serve import ServeOptions, create_app, model_key  # noqa: E402

from test_serve import call  # noqa: E402

# Bounded and repeatable: the same examples on every run (no example database written).
BOUNDED = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)


@pytest.fixture(scope="module")
def models(tiny_gan, tiny_cgan, tiny_text_ar) -> list[str]:
    return [str(tiny_gan), str(tiny_cgan), str(tiny_text_ar)]


@pytest.fixture(scope="module")
def app(models):
    return create_app(models, ServeOptions(max_n=8))  # few images a request: many requests in the time


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_is_no_server_error_and_keeps_to_the_schema(app, models, mode):
    # schemathesis' pytest loader from a fixture (schemathesis.pytest.from_fixture) fails under
    # pytest 9 (it sets Function._nodeid, which pytest 9 no longer has): its strategy, under
    # hypothesis, instead.
    api = schemathesis.openapi.from_asgi("/openapi.json", app)

    @settings(BOUNDED, max_examples=150)
    @given(case=api.as_strategy(generation_mode=mode), model=st.sampled_from([model_key(m) for m in models]))
    def check(case, model):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            case.body["model"] = model  # a random name is only ever a 422; a served one makes images
        # All the built-in checks (no 5xx, documented status codes and content types, bodies
        # that match their schemas, negative data refused) but positive_data_acceptance: a
        # request the schema allows may still ask for a class its model lacks, a prompt of a
        # model without text, or more than --max-n images, facts of this server that the
        # schema cannot state; the 422 that names the field is the right answer to those.
        # The PNG and npz answers are checked for their declared content type only: bytes
        # have no JSON schema to conform to.
        case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

    check()


@pytest.mark.slow
@settings(BOUNDED, max_examples=40)
@given(prompt=st.text(max_size=4000) | st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Mn", "Zs"])))
def test_any_text_is_a_prompt(app, models, prompt):
    response, = call(app, ("POST", "/v1/generate", {"model": model_key(models[2]), "prompt": prompt}))
    assert response.status_code == 200, response.text
