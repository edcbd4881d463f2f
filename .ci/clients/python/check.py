"""Ordinary code against the client openapi-python-client generated from a live registry's
/openapi.json (.ci/clients-check.sh). It must run: the rollback without a body is what
crashed when the optional body was described as `oneOf [RollbackRequest, null]`.

    LOCKSTEP_URL=http://127.0.0.1:7070 LOCKSTEP_TOKEN=... python check.py
"""

import os
import time

from lockstep_registry_client import AuthenticatedClient
from lockstep_registry_client.api.events import events
from lockstep_registry_client.api.instances import heartbeat
from lockstep_registry_client.api.releases import history, put_release, rollback
from lockstep_registry_client.api.status import status
from lockstep_registry_client.models import (
    Heartbeat,
    PutRelease,
    ReleaseMetadata,
    RollbackRequest,
    StoredRelease,
)


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"check failed: {what}")
    print(f"ok: {what}")


client = AuthenticatedClient(base_url=os.environ["LOCKSTEP_URL"], token=os.environ["LOCKSTEP_TOKEN"])
env = "ci"
svc = f"py-{time.time_ns()}"


def register(version_id: str) -> StoredRelease:
    metadata = ReleaseMetadata()
    metadata["team"] = "edge"
    metadata["attempt"] = 1
    out = put_release.sync(env, svc, client=client, body=PutRelease(version_id=version_id, metadata=metadata))
    assert isinstance(out, StoredRelease), out
    return out


first = register("py-v1")
second = register("py-v2")
check(second.metadata["team"] == "edge", "register; metadata is a free map")
# Left out of the answer when true; the described default says what that means.
safe = second.rollback_safe if isinstance(second.rollback_safe, bool) else True
check(safe is True, "rollback_safe reads as true when left out")
check(second.revision > first.revision, "revisions grow")

answer = heartbeat.sync(client=client, body=Heartbeat(instance_id=f"{svc}-1", service=svc, version_id="py-v2"))
check(answer is not None and str(answer.status.value) in {"current", "stale", "unknown"}, "heartbeat without env")

report = status.sync(client=client, env=env, service=svc)
services = [s for e in report.environments for s in e.services if s.name == svc]
check(len(services) == 1 and services[0].expected.version_id == "py-v2", "status lists the service")

page = history.sync(env, svc, client=client, limit=10)
check([r.version_id for r in page.releases] == ["py-v2", "py-v1"], "history")

back = rollback.sync(env, svc, client=client)
check(isinstance(back, StoredRelease) and back.version_id == "py-v1", "rollback without a body")
forward = rollback.sync(env, svc, client=client, body=RollbackRequest(version_id="py-v2", reason="from python"))
check(isinstance(forward, StoredRelease) and forward.version_id == "py-v2", "rollback with a body")

log = events.sync(client=client, limit=1000)
mine = [e for e in log.events if e.service == svc]
check(len(mine) >= 4 and all(e.data is not None for e in mine), f"events ({len(mine)} for {svc})")
print("python client: all calls ok")
