"""The benchmark's ceiling: a bare aiohttp app with imagegen's two hot routes and none of its work.

    python bench/baseline_app.py --port P --job-body FILE

POST /generations parses and validates the body with imagegen's own CreateJob and answers 202
with a fresh id; GET /generations/{jobId} answers 200 with the bytes of FILE (a real completed
job body, so the response is the same size and shape). No database, no queue, no workers.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

# The service's own request model, so the ceiling validates exactly what the service validates,
# even as the model gains fields. imagegen.models imports only pydantic: no app, no I/O.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imagegen.models import CreateJob  # noqa: E402

JSON = "application/json"
JOB_BODY = web.AppKey("job_body", bytes)


async def create_generation(request: web.Request) -> web.Response:
    """POST /generations: validate, then answer as if a job had been committed."""
    if request.content_type != JSON:
        return web.json_response({"detail": "body must be application/json"}, status=415)
    body = await request.read()
    try:
        CreateJob.model_validate_json(body)
    except ValidationError as exc:
        return web.json_response({"detail": str(exc)}, status=422)
    job_id = str(uuid.uuid4())
    return web.json_response(
        {"jobId": job_id, "status": "pending"},
        status=202,
        headers={"Location": f"{request.scheme}://{request.host}/generations/{job_id}"},
    )


async def get_generation(request: web.Request) -> web.Response:
    """GET /generations/{jobId}: the same completed-job body for every id."""
    return web.Response(body=request.app[JOB_BODY], content_type=JSON)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--job-body", type=Path, required=True, help="JSON file served by GET")
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024)
    app[JOB_BODY] = args.job_body.read_bytes()
    app.router.add_post("/generations", create_generation)
    app.router.add_get("/generations/{jobId}", get_generation, allow_head=False)
    # Same server options as server.py: no access log, which would otherwise dominate the ceiling.
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
