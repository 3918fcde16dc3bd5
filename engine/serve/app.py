"""The HTTP API (FastAPI): OpenAI-style video jobs over the job store and the engine workers.

    POST   /v1/videos                 create a job (JSON body, or a form with an ``image`` upload)
    GET    /v1/videos                 list jobs (``limit``, ``after``, ``order``)
    GET    /v1/videos/{id}            a job: status, progress, timings, error
    GET    /v1/videos/{id}/content    its mp4 (once completed)
    POST   /v1/videos/{id}/cancel     cancel a queued or running job
    DELETE /v1/videos/{id}            delete a job and its files
    GET    /healthz, /readyz, /metrics, /   liveness, readiness (model loaded and warm), Prometheus, the page

Every create request is checked (:func:`engine.serve.params.check_fields`: the engine's request check, the
text encoder's length, the limits) before it is queued; bad input is a 4xx whose ``error.message`` is one line.
Errors have OpenAI's shape: ``{"error": {"message", "type", "code", "param"}}``.
"""

import asyncio
import copy
import hmac
import io
import json
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.serve.metrics import ServeMetrics
from engine.serve.params import Limits, PARAM_SCHEMA, batch_key, check_fields, request_hash
from engine.serve.store import IdempotencyConflict, Job, JobStore, QueueFull, StoreLock, is_job_id

log = logging.getLogger("engine.serve")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
IMAGE_FIELDS = ("image", "input_reference")  # ours, and OpenAI's name for the same upload


class ApiError(Exception):
    """An error answer: HTTP ``status``, a one-line ``message``, an error ``code`` and extra headers."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def _error_body(message: str, code: str, param: Optional[str] = None, status: int = 400) -> Dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


@dataclass
class ServeSettings:
    """What a server runs: the model spec, backend, devices (one worker each) and dtype; the ``store`` folder;
    batching (``max_batch`` jobs per call, ``max_wait_ms`` waiting for companions); the queue bound
    (``max_queue`` unfinished jobs); ``ttl_s``: seconds a finished job's video is kept; ``api_key``: required as
    ``Authorization: Bearer`` on the API when set; ``limits``: request limits; ``shutdown_grace_s``: how long a
    running batch may finish at shutdown before its jobs are re-queued."""

    store: str
    model: str = "default"
    backend: str = "eager"
    devices: Sequence[str] = ("cpu",)
    dtype: str = "float32"
    max_batch: int = 8
    max_wait_ms: float = 50.0
    max_queue: int = 256
    ttl_s: float = 24 * 3600.0
    api_key: Optional[str] = None
    limits: Limits = field(default_factory=Limits)
    shutdown_grace_s: float = 30.0


class Server:
    """The state behind one app: the store (locked for this process), the model's config, the metrics and one
    :class:`~engine.serve.worker.EngineWorker` per device. Everything is checked here, before the app starts:
    a bad setting is a one-line ValueError. :meth:`start` starts the workers (they load the model on their
    own threads); :meth:`stop` stops them (re-queuing unfinished work) and releases the store."""

    def __init__(self, settings: ServeSettings):
        from engine.backends import check_backend_ready
        from engine.default_model import resolve_model
        from engine.request import parse_device, parse_dtype
        from engine.serve.worker import EngineWorker

        self.settings = s = settings
        if not s.devices:
            raise ValueError("no device given (--device cpu, cuda or cuda:N, comma-separated)")
        devices = [parse_device(d) for d in s.devices]
        dtype = parse_dtype(s.dtype)
        if len(set(map(str, devices))) != len(devices):
            raise ValueError(f"devices repeat: {', '.join(map(str, s.devices))}")
        self.backend = check_backend_ready(s.backend, devices[0], dtype)
        self.spec = resolve_model(s.model)
        self.config = self.spec.load_config()
        self.model_name = s.model
        self._lock = StoreLock(s.store)
        try:
            self.store = JobStore(s.store, s.max_queue)
        except BaseException:
            self._lock.release()
            raise
        self.recovered = self.store.recover()
        self.metrics = ServeMetrics(self.store)

        def loader(device):
            def load():
                from engine.pipeline import CMDPipeline

                return CMDPipeline.from_pretrained(self.spec, device=device, dtype=dtype, backend=s.backend)
            return load

        self.workers = [EngineWorker(self.store, loader(d), s.max_batch, s.max_wait_ms, self.backend, self.metrics,
                                     name=f"worker-{i} ({d})") for i, d in enumerate(devices)]
        self._token_counter = None

    @property
    def ready(self) -> bool:
        return all(w.ready.is_set() for w in self.workers)

    def start(self) -> None:
        if self.recovered:
            log.info("re-queued %d job(s) a previous server left running", self.recovered)
        for w in self.workers:
            w.start()

    def stop(self) -> None:
        for w in self.workers:
            w.stop(self.settings.shutdown_grace_s)
        self.store.close()
        self._lock.release()

    def token_counter(self):
        """A text encoder to count prompt tokens with, on its own tokenizer copy (a Rust tokenizer must not be
        used from two threads at once; the worker encodes with its own). None until a worker is ready."""
        if self._token_counter is None:
            pipe = next((w.pipe for w in self.workers if w.ready.is_set()), None)
            if pipe is None:
                return None
            counter = copy.copy(pipe.text_encoder)
            counter.tokenizer = copy.deepcopy(pipe.text_encoder.tokenizer)
            self._token_counter = counter
        return self._token_counter

    def retry_after(self) -> int:
        """Seconds a client turned away should wait: about one batch's time at the recent rate."""
        rate = self.metrics._rate()
        return 10 if rate <= 0 else max(1, min(60, math.ceil(self.settings.max_batch / rate)))

    def job_object(self, job: Job) -> Dict[str, Any]:
        """A job as the API shows it (OpenAI's video object, plus this engine's fields)."""
        p = job.params
        error = {"code": job.error_code, "message": job.error_message} if job.status == "failed" else None
        expires = job.completed_at + self.settings.ttl_s if job.completed_at is not None else None
        return {
            "id": job.id, "object": "video", "model": self.model_name, "status": job.status,
            "progress": int(round(100 * job.progress)), "created_at": int(job.created_at),
            "completed_at": int(job.completed_at) if job.completed_at is not None else None,
            "expires_at": int(expires) if expires is not None else None, "expired": job.expired_at is not None,
            "prompt": p["prompt"], "size": f"{p['width']}x{p['height']}", "frames": p["num_frames"],
            "seconds": f"{p['num_frames'] / p['fps']:g}", "seed": p["seed"], "parameters": p,
            "timings": job.timings, "error": error,
        }


# ------------------------------------------------------------------------------------------------ the app
def create_app(server: Server) -> FastAPI:
    """The FastAPI app over ``server``; its lifespan starts and stops the workers."""

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        janitor = asyncio.create_task(_expire_loop(server))
        try:
            yield
        finally:
            janitor.cancel()
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    app = FastAPI(title="CMD engine video API", version="1", lifespan=lifespan,
                  description="OpenAI-style video generation jobs on a CMD model.")
    app.state.server = server
    _install_errors(app, server)
    _install_limits(app, server)
    auth = _auth(server)
    _routes(app, server, auth)
    return app


async def _expire_loop(server: Server) -> None:
    period = max(1.0, min(60.0, server.settings.ttl_s / 2))
    while True:
        server.store.expire(server.settings.ttl_s)
        await asyncio.sleep(period)


def _install_errors(app: FastAPI, server: Server) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        if e.status < 500 and e.code in ("invalid_request", "queue_full", "unauthorized", "too_large"):
            server.metrics.failed(e.code)
        return JSONResponse(_error_body(e.message, e.code, e.param, e.status), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        # FastAPI's own checks of query and header parameters: one line, as every other bad input.
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "header", "path", "body"))
        server.metrics.failed("invalid_request")
        return JSONResponse(_error_body(f"{where}: {first.get('msg', 'invalid')}", "invalid_request", where), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(_error_body(str(e.detail), "http_error", None, e.status_code), e.status_code,
                            headers=getattr(e, "headers", None))


def _install_limits(app: FastAPI, server: Server) -> None:
    """Bodies over the limit are refused from their Content-Length (413), before they are read; a body without
    one is refused (411); the time of each request is measured per route."""
    limit = server.settings.limits.body_bytes

    @app.middleware("http")
    async def limits_and_timing(request: Request, call_next):
        started = time.perf_counter()
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None and request.headers.get("transfer-encoding"):
                return JSONResponse(_error_body("a body needs a Content-Length header", "length_required"), 411)
            if length is not None and (not length.isdigit() or int(length) > limit):
                server.metrics.failed("too_large")
                return JSONResponse(_error_body(f"request body of {length} bytes is over the limit of {limit} bytes",
                                                "too_large"), 413)
        response = await call_next(request)
        route = request.scope.get("route")
        server.metrics.http.labels(getattr(route, "path", "unmatched")).observe(time.perf_counter() - started)
        return response


def _auth(server: Server):
    key = server.settings.api_key
    bearer = HTTPBearer(auto_error=False, description="the server's API key (--api-key)")

    def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), key.encode()):  # constant time
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "unauthorized",
                           headers={"WWW-Authenticate": "Bearer"})

    return authorize


def served_sizes(config) -> List[str]:
    """The sizes a model serves (``config.served_sizes``), as the API's ``size`` (``WIDTHxHEIGHT``)."""
    sizes = []
    for size in config.served_sizes:
        if f"{size.width}x{size.height}" not in sizes:
            sizes.append(f"{size.width}x{size.height}")
    return sizes


def _find(server: Server, video_id: str) -> Job:
    job = server.store.get(video_id) if is_job_id(video_id) else None
    if job is None:
        raise ApiError(404, f"no video {video_id!r}", "not_found", "video_id")
    return job


async def _read_create(request: Request, limits: Limits) -> Tuple[Dict[str, Any], Optional[bytes]]:
    """The create request's fields and uploaded image bytes, from a JSON body or a form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=len(PARAM_SCHEMA["properties"]) + 2,
                                  max_part_size=limits.image_bytes)
        fields, image = {}, None
        for name, value in form.multi_items():
            if name in IMAGE_FIELDS and not isinstance(value, UploadFile):
                raise ApiError(400, f"{name} must be uploaded as a file (multipart/form-data)", param=name)
            if isinstance(value, UploadFile):
                if name not in IMAGE_FIELDS:
                    raise ApiError(400, f"unexpected file field {name!r}; upload the image as 'image'", param=name)
                image = await value.read(limits.image_bytes + 1)
                if len(image) > limits.image_bytes:
                    raise ApiError(413, f"image is over the limit of {limits.image_bytes} bytes", "too_large", "image")
            elif name in fields:
                raise ApiError(400, f"field {name!r} is given twice", param=name)
            else:
                fields[name] = value
        return fields, image
    if kind != "application/json":
        raise ApiError(415, f"send application/json or multipart/form-data, got {kind or 'no content type'!r}",
                       "unsupported_media_type")
    try:
        fields = await request.json()
    except ValueError as e:
        raise ApiError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(fields).__name__}")
    for name in IMAGE_FIELDS:
        if name in fields:
            raise ApiError(400, f"{name} must be uploaded as a file in a multipart form, not in JSON", param=name)
    return fields, None


def check_image(data: bytes, limits: Limits):
    """Uploaded image bytes -> the decoded pixels (engine.images' rules); a one-line ValueError for an empty,
    unreadable or too large one (its size is read from the header before it is decoded)."""
    import imageio.v3 as iio
    from PIL import Image

    from engine.images import to_pixels

    if not data:
        raise ValueError("image is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as e:  # noqa: BLE001 -- PIL raises many kinds for unreadable files
        raise ValueError(f"image cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if width * height > limits.image_pixels:
        raise ValueError(f"image is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{limits.image_pixels}")
    try:
        array = iio.imread(data)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"image cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if array.ndim == 2:
        array = array[..., None].repeat(3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image must be one grey, RGB or RGBA picture, got an array of shape {array.shape}")
    return to_pixels(array[..., :3])


def _check_create(server: Server, fields: Dict[str, Any], image: Optional[bytes]):
    """The whole check of a create request: (params, batch key); ApiError (4xx, one line) otherwise."""
    from engine.request import check_prompt_lengths

    limits = server.settings.limits
    try:
        params, _ = check_fields(fields, server.config, server.model_name, limits, image is not None, server.backend)
        if image is not None:
            check_image(image, limits)
    except (ValueError, TypeError) as e:
        from engine.cli import one_line

        raise ApiError(400, one_line(e)) from None
    counter = server.token_counter()
    if counter is None:
        raise ApiError(503, "the model is loading; retry shortly", "loading", headers={"Retry-After": "5"})
    texts = [("prompt", params["prompt"])]
    if params["negative_prompt"]:
        texts.append(("negative_prompt", params["negative_prompt"]))
    try:
        check_prompt_lengths(counter, texts)
    except ValueError as e:
        raise ApiError(400, str(e), param=texts[-1][0] if "negative" in str(e) else "prompt") from None
    return params, batch_key(params)


def _routes(app: FastAPI, server: Server, authorize) -> None:
    store, limits = server.store, server.settings.limits
    guarded = [Depends(authorize)]

    @app.post("/v1/videos", dependencies=guarded, summary="Create a video job",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": PARAM_SCHEMA},
                  "multipart/form-data": {"schema": {**PARAM_SCHEMA, "properties": {
                      **PARAM_SCHEMA["properties"], "image": {"type": "string", "format": "binary"}}}}}}})
    async def create_video(request: Request, idempotency_key: Optional[str] = Header(None, max_length=255)):
        fields, image = await _read_create(request, limits)
        params, key = _check_create(server, fields, image)
        try:
            job, _ = store.submit(params, key, image, idempotency_key, request_hash(fields, image),
                                  retry_after=server.retry_after())
        except QueueFull as e:
            raise ApiError(429, str(e), "queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        except IdempotencyConflict as e:
            raise ApiError(409, str(e), "idempotency_conflict") from None
        return server.job_object(job)

    @app.get("/v1/videos", dependencies=guarded, summary="List video jobs")
    async def list_videos(limit: int = Query(20, ge=1, le=100), after: Optional[str] = None,
                          order: str = Query("desc", pattern="^(asc|desc)$")):
        if after is not None:
            _find(server, after)
        jobs = store.list(limit + 1, after, order)
        data = [server.job_object(j) for j in jobs[:limit]]
        return {"object": "list", "data": data, "has_more": len(jobs) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/videos/{video_id}", dependencies=guarded, summary="A video job")
    async def get_video(video_id: str):
        return server.job_object(_find(server, video_id))

    @app.get("/v1/videos/{video_id}/content", dependencies=guarded, summary="A finished video (mp4)",
             response_class=FileResponse)
    async def video_content(video_id: str):
        job = _find(server, video_id)
        if job.status != "completed":
            raise ApiError(409, f"video {video_id} is {job.status}; its content exists once it is completed",
                           "not_completed")
        path = store.video_path(job.id)
        if job.expired_at is not None or not os.path.isfile(path):
            raise ApiError(410, f"video {video_id} has expired", "expired")
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")

    @app.post("/v1/videos/{video_id}/cancel", dependencies=guarded, summary="Cancel a queued or running job")
    async def cancel_video(video_id: str):
        _find(server, video_id)
        return server.job_object(store.cancel(video_id))

    @app.delete("/v1/videos/{video_id}", dependencies=guarded, summary="Delete a job and its video")
    async def delete_video(video_id: str):
        _find(server, video_id)
        store.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/healthz", summary="The process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warm")
    async def readyz():
        errors = [f"{w.name}: {w.error}" for w in server.workers if w.error]
        if errors or not server.ready:
            body = {"status": "failed" if errors else "loading", "errors": errors}
            return JSONResponse(body, 503)
        return {"status": "ready", "workers": len(server.workers), "model": server.model_name}

    @app.get("/metrics", dependencies=guarded, summary="Prometheus metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read().replace("__SIZES__", json.dumps(served_sizes(server.config)))
