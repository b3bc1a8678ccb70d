"""The labeling web app: a labeler page, its JSON API and an admin page over a `LabelStore`, served by uvicorn.

Pages (server-rendered by Jinja2 with autoescaping) and the API the page's script calls:

    GET  /label?token=T       checks the labeler's token, keeps it in an HttpOnly cookie, redirects to /label
    GET  /label               the labeler page: instructions, the query, the N responses, progress
    GET  /api/next            the labeler's current comparison (a lease), or a new one; null when none is left
    POST /api/answer          {"assignment_id": int, "position": int}: committed, then the next comparison
    POST /api/skip            {"assignment_id": int}: committed, then the next comparison
    POST /api/undo            {}: takes back the labeler's last answer or skip and shows it again
    GET  /admin?token=T       the same for the admin token (`launch.py label admin-token`), then /admin
    GET  /admin               per-labeler counts and time per item, position bias, agreement
    GET  /api/admin/stats     the same as JSON (LabelStore.admin_stats)
    GET  /static/...          the page's script and style sheet (the package's own static directory)

Model text is untrusted: the API sends it as JSON strings and the page's script puts it into the page with
textContent only; templates escape everything they render. Every route but /static needs a token: the API
takes it from the cookie or from an `Authorization: Bearer` header (scripts, the load benchmark). An answer is
committed to the store (on disk) before the response that carries the next comparison is sent. Request bodies
are limited to MAX_BODY_BYTES, ids must be integers in range, and no path from a request reaches the
filesystem except through Starlette's StaticFiles of the static directory.
"""
from __future__ import annotations

import ipaddress
import json
import math
import socket
import sys
from pathlib import Path
from typing import Optional

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lm_human_preferences.labeling.store import (LEASE_SECONDS, Assignment, LabelStore, StoreError,
                                                 UnknownAssignment)

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"
MAX_BODY_BYTES = 4096  # the API's bodies are a few ids; anything larger is refused with 413
MAX_ID = 2 ** 63 - 1  # SQLite's integer range
LABELER_COOKIE = "lmhp_labeler"
ADMIN_COOKIE = "lmhp_admin"
COOKIE_SECONDS = 30 * 24 * 3600
DEFAULT_INSTRUCTIONS = {
    "title": "Pick the best response",
    "paragraphs": [
        "Each comparison shows a query (the start of a text) and several responses that continue it.",
        "Read all the responses, then choose the one that is best for this task. If none is clearly better, "
        "choose the one you would rather keep; skip a comparison only if you cannot judge it at all.",
    ],
}
# Scripts and styles only from this server (the page has no inline script), no framing, no plugins.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every response, and no-store to every non-static one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _static_files():
    """Starlette's StaticFiles over the package's static directory (it refuses paths that leave it), behind a
    404 for a NUL byte in the path (which older Starlette turns into a 500)."""
    files = StaticFiles(directory=STATIC_DIR)

    async def app(scope, receive, send):
        if "\x00" in scope["path"]:
            await Response("Not Found", status_code=404, media_type="text/plain")(scope, receive, send)
        else:
            await files(scope, receive, send)
    return app


def _instructions(meta: dict) -> dict:
    """The page's instructions from the store's meta (written at collect time), else the generic text."""
    given = meta.get("instructions")
    if isinstance(given, dict) and isinstance(given.get("title"), str) and isinstance(given.get("paragraphs"), list):
        return {"title": given["title"], "paragraphs": [str(p) for p in given["paragraphs"]]}
    return DEFAULT_INSTRUCTIONS


def _assignment_json(a: Optional[Assignment]) -> Optional[dict]:
    """What the page gets of an assignment: the texts in display order, never the sample indices."""
    if a is None:
        return None
    return {"id": a.id, "uid": a.comparison_uid, "query": a.query_text, "responses": list(a.responses),
            "expires_at": a.expires_at}


def _progress_json(p: dict) -> dict:
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in p.items()}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_json(request: Request) -> dict:
    """The request's JSON object body; 415/413/400 for another type, a body over MAX_BODY_BYTES, or bad JSON."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send the body as application/json")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise HTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():  # a chunked body has no Content-Length: count it as it comes
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return data


def _int_field(data: dict, key: str, low: int, high: int) -> int:
    """data[key] as an int in [low, high]; 400 for a missing key, another type (bools and floats too) or range."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPException(400, f"{key} must be an integer, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise HTTPException(400, f"{key} {value} is out of range {low}..{high}")
    return value


def _only_fields(data: dict, allowed: tuple) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise HTTPException(400, f"unknown fields {unknown[:5]}: send only {list(allowed)}")


def _bearer(request: Request) -> Optional[str]:
    value = request.headers.get("authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else None


def make_app(store: LabelStore, *, lease_seconds: float = LEASE_SECONDS) -> Starlette:
    """The Starlette app over `store`; comparisons are leased for `lease_seconds`."""
    templates = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True,
                                   undefined=jinja2.StrictUndefined)
    meta = store.meta()
    num_responses = int(meta.get("num_responses") or 0)

    def render(name: str, status: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(**context), status_code=status)

    def unauthorized(page: str, why: str, status: int = 401) -> HTMLResponse:
        return render("unauthorized.html", status=status, page=page, why=why)

    async def labeler_from(request: Request, token: Optional[str] = None):
        token = token or _bearer(request) or request.cookies.get(LABELER_COOKIE)
        return await run_in_threadpool(store.labeler_for_token, token) if token else None

    async def is_admin(request: Request, token: Optional[str] = None) -> bool:
        token = token or _bearer(request) or request.cookies.get(ADMIN_COOKIE)
        return bool(token) and await run_in_threadpool(store.is_admin_token, token)

    def with_cookie(request: Request, path: str, name: str, token: str) -> RedirectResponse:
        """Keeps the token in a cookie and redirects to the page without it in the address bar."""
        response = RedirectResponse(path, status_code=303)
        response.set_cookie(name, token, max_age=COOKIE_SECONDS, path="/", httponly=True, samesite="lax",
                            secure=request.url.scheme == "https")
        return response

    async def index(request: Request) -> Response:
        return RedirectResponse("/label", status_code=303)

    async def label_page(request: Request) -> Response:
        token = request.query_params.get("token")
        labeler = await labeler_from(request, token)
        if labeler is None:
            return unauthorized("labeler", "This link's token is not valid." if token else
                                "Open the link with your token that the organizer gave you.")
        if token:
            return with_cookie(request, "/label", LABELER_COOKIE, token)
        n = num_responses or 9
        return render("label.html", labeler=labeler.name, instructions=_instructions(meta), num_responses=n,
                      experiment=str(meta.get("experiment") or ""))

    async def api_labeler(request: Request):
        labeler = await labeler_from(request)
        if labeler is None:
            if await is_admin(request):
                raise HTTPException(403, "the admin token cannot label: use a labeler's token")
            raise HTTPException(401, "a labeler token is required (the link from `launch.py label add-labeler`)")
        return labeler

    async def next_response(labeler, **extra) -> JSONResponse:
        assignment = await run_in_threadpool(store.next_assignment, labeler, lease_seconds=lease_seconds)
        progress = await run_in_threadpool(store.progress, labeler)
        return JSONResponse({**extra, "assignment": _assignment_json(assignment),
                             "progress": _progress_json(progress)})

    async def api_next(request: Request) -> Response:
        return await next_response(await api_labeler(request))

    def store_call(function, *args, **kwargs):
        """Runs a store change in the thread pool; its refusals become 404 (unknown id) or 409 (not open)."""
        async def call():
            try:
                return await run_in_threadpool(function, *args, **kwargs)
            except UnknownAssignment as e:
                raise HTTPException(404, str(e)) from None
            except StoreError as e:
                raise HTTPException(409, str(e)) from None
        return call()

    async def api_answer(request: Request) -> Response:
        labeler = await api_labeler(request)
        data = await _read_json(request)
        _only_fields(data, ("assignment_id", "position"))
        assignment_id = _int_field(data, "assignment_id", 1, MAX_ID)
        position = _int_field(data, "position", 0, (num_responses or 64) - 1)
        sample = await store_call(store.answer, labeler, assignment_id, position)
        return await next_response(labeler, recorded={"assignment_id": assignment_id, "position": position,
                                                       "sample": sample})

    async def api_skip(request: Request) -> Response:
        labeler = await api_labeler(request)
        data = await _read_json(request)
        _only_fields(data, ("assignment_id",))
        assignment_id = _int_field(data, "assignment_id", 1, MAX_ID)
        await store_call(store.skip, labeler, assignment_id)
        return await next_response(labeler, skipped={"assignment_id": assignment_id})

    async def api_undo(request: Request) -> Response:
        labeler = await api_labeler(request)
        data = await _read_json(request)
        _only_fields(data, ())
        undone = await run_in_threadpool(store.undo, labeler, lease_seconds=lease_seconds)
        if undone is None:
            return await next_response(labeler, undone=False)
        progress = await run_in_threadpool(store.progress, labeler)
        return JSONResponse({"undone": True, "assignment": _assignment_json(undone),
                             "progress": _progress_json(progress)})

    async def admin_page(request: Request) -> Response:
        token = request.query_params.get("token")
        if not await is_admin(request, token):
            if token is None and await labeler_from(request) is not None:
                return unauthorized("admin", "A labeler's token does not open the admin page.", status=403)
            return unauthorized("admin", "This link's token is not valid." if token else
                                "Open the admin link printed by `launch.py label admin-token`.")
        if token:
            return with_cookie(request, "/admin", ADMIN_COOKIE, token)
        stats = await run_in_threadpool(store.admin_stats)
        names = [labeler.name for labeler in await run_in_threadpool(store.labelers)]
        rows = [(name, stats["labelers"].get(name, {"answers": 0, "median_seconds": None})) for name in names]
        return render("admin.html", stats=stats, rows=rows, instructions=_instructions(meta),
                      experiment=str(meta.get("experiment") or ""), lease_seconds=lease_seconds)

    async def api_admin_stats(request: Request) -> Response:
        if not await is_admin(request):
            status = 403 if await labeler_from(request) is not None else 401
            raise HTTPException(status, "the admin token is required (`launch.py label admin-token`)")
        return JSONResponse(await run_in_threadpool(store.admin_stats))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/"):
            return _error(exc.status_code, str(exc.detail))
        return Response(str(exc.detail), status_code=exc.status_code, media_type="text/plain")

    routes = [
        Route("/", index),
        Route("/label", label_page),
        Route("/admin", admin_page),
        Route("/api/next", api_next),
        Route("/api/answer", api_answer, methods=["POST"]),
        Route("/api/skip", api_skip, methods=["POST"]),
        Route("/api/undo", api_undo, methods=["POST"]),
        Route("/api/admin/stats", api_admin_stats),
        Mount("/static", app=_static_files(), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.add_middleware(SecurityHeaders)
    return app


def _is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_host(store: LabelStore, host: str) -> Optional[str]:
    """None for a loopback `host`; for another one, the warning to print if the store has labelers (whose
    tokens every page needs); StoreError if it has none."""
    if _is_loopback(host):
        return None
    if not store.labelers():
        raise StoreError(f"--host {host} would make the app reachable from other machines, and the store has no "
                         f"labeler yet: add labelers (`launch.py label add-labeler`) first, or serve on 127.0.0.1")
    return (f"warning: serving on {host}, reachable from other machines: every page needs a labeler's or the "
            f"admin's token; put a reverse proxy with TLS in front for labelers outside this network")


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); StoreError naming the fix if it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (socket.gaierror, OSError) as e:
        raise StoreError(f"cannot listen on {host}:{port} ({e}): pass a valid --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise StoreError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port, "
                         f"or stop what uses it") from None
    return sock


def serve(store_path, *, host: str = "127.0.0.1", port: int = 8000, lease_seconds: float = LEASE_SECONDS) -> None:
    """Serves the labeling app over the store at `store_path` until interrupted (Ctrl-C). Prints the address;
    refuses (StoreError, before listening) a missing store, a non-loopback host on a store without labelers, and
    an address that cannot be had."""
    import uvicorn  # the `label` extra; imported here so that the rest of the package does not need it

    if not lease_seconds > 0:
        raise StoreError(f"--lease {lease_seconds} must be a positive number of seconds")
    store = LabelStore(store_path)
    warning = check_host(store, host)
    sock = _listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if warning:
        print(warning, file=sys.stderr, flush=True)
    progress, labelers = store.progress(), len(store.labelers())
    print(f"labeling {store_path}: {progress['answered']}/{progress['needed']} answers, {labelers} labeler(s); "
          f"serving on http://{shown}:{bound_port}/ (labelers open /label?token=..., the admin /admin?token=...; "
          f"Ctrl-C stops)", flush=True)
    if not labelers:
        print("no labeler yet: add one with `launch.py label add-labeler --store FILE NAME` (it prints the link)",
              flush=True)
    # No access log: the first request of a labeler carries its token in the query string.
    config = uvicorn.Config(make_app(store, lease_seconds=lease_seconds), log_level="warning", access_log=False,
                            server_header=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for: stopping is the normal end
        pass
    finally:
        sock.close()
    progress = store.progress()
    print(f"stopped: {progress['answered']}/{progress['needed']} answers in {store_path}", flush=True)
