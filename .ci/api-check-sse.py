"""Schemathesis for the Server-Sent Event streams (`/v1/watch`, `/v1/events/stream`,
`/v1/instances/watch`).

The schemathesis CLI reads every body to its end, and these answer 200 and then never end,
so the CLI run in api-check.sh leaves them out and this drives them instead: the same
generated cases (positive and negative), sent to the live registry with a streamed read;
an answer that is an event stream is cut after its headers and then judged by every
schemathesis check like any other answer (status documented, content type documented,
invalid input rejected, valid input accepted, ...). Run by .ci/api-check.sh:

    python api-check-sse.py SPEC BASE_URL TOKEN EXAMPLES SEED
"""

import sys
from urllib.parse import urlsplit

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

SSE_PATHS = ("/v1/watch", "/v1/events/stream", "/v1/instances/watch")


def main() -> int:
    spec, base, token, examples, run_seed = sys.argv[1:6]
    if urlsplit(base).hostname != "127.0.0.1":
        print(f"refusing to test {base}: not on 127.0.0.1", file=sys.stderr)
        return 2
    schema = schemathesis.openapi.from_path(spec)
    # As `-H` does for the CLI run: the credentials are fixed, never generated.
    schema.config.generation.update(with_security_parameters=False)
    auth = {"Authorization": f"Bearer {token}"}
    session = requests.Session()
    session.trust_env = False  # no proxy, whatever the environment says
    failures: list[str] = []
    totals = {"cases": 0, "streams": 0, "negative": 0}

    for path in SSE_PATHS:
        operation = schema[path]["GET"]
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )
        seen: set[str] = set()

        @seed(int(run_seed))
        @settings(
            max_examples=int(examples),
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases)
        def run(case) -> None:
            kwargs = case.as_transport_kwargs(base_url=base, headers=auth)
            kwargs.pop("method", None)
            url = kwargs.pop("url")
            response = session.request(
                case.method, url, stream=True, timeout=(5, 10), allow_redirects=False, **kwargs
            )
            totals["cases"] += 1
            if case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE:
                totals["negative"] += 1
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                # A stream never ends: keep its headers, drop the connection, judge it empty.
                totals["streams"] += 1
                response.close()
                response._content = b""
                response._content_consumed = True
            else:
                _ = response.content
            try:
                # `headers` tells the checks which credentials were sent, so `ignored_auth`
                # probes the operation without them.
                case.validate_response(response, headers=auth)
            except (Exception, BaseExceptionGroup) as error:  # a group of check failures
                message = f"{case.method} {path}: {case.as_curl_command()}\n{error}"
                key = f"{response.status_code} {type(error).__name__}"
                if key not in seen:
                    seen.add(key)
                    failures.append(message)

        run()

    print(
        f"SSE operations: {len(SSE_PATHS)}; {totals['cases']} cases "
        f"({totals['negative']} negative), {totals['streams']} answered as event streams; "
        f"{len(failures)} failure(s)"
    )
    for failure in failures:
        print("\n" + failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
