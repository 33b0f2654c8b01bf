"""schemathesis (property-based API fuzzing) over the server's own OpenAPI schema against a tiny model: no
request it generates — valid (positive mode) or not (negative mode) — may get a 5xx, and every response must
conform to the schema (statuses, content types, bodies). Bounded by examples per operation and mode so it
stays well under a minute."""

from __future__ import annotations

import itertools

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serve_helpers import MODEL, tiny_engine  # noqa: E402

from chatforge.infer.scheduler import Scheduler  # noqa: E402
from chatforge.serve.api import ServeOptions, create_app  # noqa: E402
from chatforge.serve.feedback import FeedbackStore  # noqa: E402
from chatforge.serve.server import BackgroundServer  # noqa: E402

EXAMPLES = 8  # per operation and generation mode


@pytest.mark.slow
def test_fuzzed_requests_get_no_5xx_and_conform_to_the_schema(tmp_path):
    engine = tiny_engine(block_size=64, max_batch_size=4)
    store = FeedbackStore(tmp_path / "feedback.db")
    sent, statuses = 0, {}
    options = ServeOptions(model_name=MODEL, max_tokens=8, feedback_writes_per_minute=0)
    with Scheduler(engine) as scheduler, BackgroundServer(create_app(scheduler, options, store=store)) as server:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        for operation, mode in itertools.product(operations, schemathesis.GenerationMode):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate], derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                nonlocal sent
                response = case.call(base_url=server.url, timeout=30)
                sent += 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                         content_type_conformance, response_schema_conformance])

            try:
                fuzz()
            except Unsatisfiable:  # an operation without parameters or body has no invalid request to make
                assert mode is schemathesis.GenerationMode.NEGATIVE
    store.close()
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    print(f"\nfuzz: {sent} requests, statuses {dict(sorted(statuses.items()))}, 5xx: {server_errors}")
    assert sent >= EXAMPLES * len(operations) and server_errors == 0
