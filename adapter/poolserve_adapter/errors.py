"""Every failure becomes an HTTP response here, in the error body of the API flavour called.

vLLM (``vllm/entrypoints/serve/exception_handling``): ``{"error": {"message", "type", "param",
"code"}}`` with ``code`` equal to the HTTP status. Request validation failures (pydantic, malformed
JSON, a non-JSON content type) are 400 with ``type: "Bad Request"`` and the dotted location of the
first error as ``param``; errors raised by the serving code use exception-class names as ``type``.
A route a model does not offer answers a 400 saying why when the request names that model or it is
the only one served (vLLM does not register the route: FastAPI's plain 404 ``{"detail": "Not Found"}``,
which a mistyped URL still gets, as does a route no served model offers).

SGLang's OpenAI-style routes (``/v1/classify``, its ``/v1/rerank``, ``/v1/tokenize``, ...) answer
the flat ``{"object": "error", "message", "type", "param", "code"}`` (validation errors too, as 400
``Bad Request``); its native ``/classify`` answers ``{"error": {"message"}}``. Which flavour a
request gets: ``request.state.flavour`` when its serving set it (SGLang's native body on
``/classify``), else the path (``app.state.sglang_paths``, :data:`TEI_PATHS`), else vLLM.

TEI's routes (``/embed``, ``/embed_all``, ``/embed_sparse``, ``/predict``, ``/info``, ``POST /``, and ``/rerank``
with TEI's body) answer ``{"error": message, "error_type": kind}``, ``kind`` one of TEI's
``ErrorType`` names (PascalCase: ``Empty`` 400, ``Validation`` 422, ``Backend`` 424, ``Overloaded`` 429,
``Unhealthy`` 503); an error the shared pipeline raises is given TEI's kind and status by its own status
(:func:`tei_status_and_kind`).
"""

from __future__ import annotations

import logging
import re
from enum import Enum
from http import HTTPStatus

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from tritonclient.utils import InferenceServerException

from poolserve_adapter.metrics import count_error

logger = logging.getLogger(__name__)

MAX_REPORTED_VALIDATION_ERRORS = 10
MAX_ECHOED_INPUT_CHARS = 200


class Flavour(str, Enum):
    VLLM = "vllm"
    SGLANG = "sglang"  # SGLang's OpenAI-style routes: flat error objects
    SGLANG_NATIVE = "sglang_native"  # SGLang's native /classify: {"error": {"message"}}
    TEI = "tei"  # text-embeddings-inference's routes: {"error": message, "error_type": kind}


# The routes that speak TEI (their request bodies are refused in TEI's shape before any serving code runs).
TEI_PATHS = frozenset({"/embed", "/embed_all", "/embed_sparse", "/predict", "/info", "/"})
# TEI's ErrorType names (router/src/http/types.rs; serde writes the variants as they are spelled).
TEI_ERROR_KINDS = ("Unhealthy", "Backend", "Overloaded", "Validation", "Tokenizer", "Empty")


# The tag of SGLang's native body in /classify's discriminated union (see poolserve_adapter.shared_paths.classify).
SGLANG_NATIVE_TAG = "sglang-native"
# The tags of vLLM's and TEI's bodies in /rerank's discriminated union (see poolserve_adapter.rerank.api_router):
# a TEI body's validation errors take TEI's shape.
VLLM_RERANK_TAG, TEI_RERANK_TAG = "vllm-rerank", "tei-rerank"


def flavour_of(request: Request) -> Flavour:
    explicit = getattr(request.state, "flavour", None)
    if explicit is not None:
        return explicit
    if request.url.path in TEI_PATHS:
        return Flavour.TEI
    sglang_paths = getattr(request.app.state, "sglang_paths", ())
    return Flavour.SGLANG if request.url.path in sglang_paths else Flavour.VLLM


class AdapterError(Exception):
    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type: str = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequestError(AdapterError):
    status, error_type = HTTPStatus.BAD_REQUEST, "BadRequestError"


class NotFoundError(AdapterError):
    status, error_type = HTTPStatus.NOT_FOUND, "NotFoundError"


class PayloadTooLargeError(AdapterError):
    status, error_type = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "PayloadTooLargeError"


class TooManyRequestsError(AdapterError):
    """Overload: refused at admission (adapter/poolserve_adapter/admission.py); clients retry after ``Retry-After``."""

    status, error_type = HTTPStatus.TOO_MANY_REQUESTS, "TooManyRequestsError"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailableError(AdapterError):
    status, error_type = HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError"


class GatewayTimeoutError(AdapterError):
    status, error_type = HTTPStatus.GATEWAY_TIMEOUT, "GatewayTimeoutError"


class InternalServerError(AdapterError):
    pass


class InvalidFieldError(BadRequestError):
    """A field the model's own request schema refuses, known only once the model is (vLLM parses a token_embed
    model's /v1/embeddings body with a narrower schema): answered as that schema's validation error would be."""

    error_type = HTTPStatus.BAD_REQUEST.phrase

    def __init__(self, field: str, kind: str, message: str, value: object):
        super().__init__(validation_message([{"type": kind, "loc": ("body", field), "msg": message, "input": value}]),
                         param=f"body.{field}")


class TeiError(AdapterError):
    """An error of a TEI route in TEI's own words: its status and ``error_type`` kind (a :data:`TEI_ERROR_KINDS`
    entry)."""

    def __init__(self, message: str, *, status: HTTPStatus, kind: str):
        super().__init__(message)
        self.status, self.error_type = status, kind


def tei_status_and_kind(status: HTTPStatus, error_type: str) -> tuple[HTTPStatus, str]:
    """The status and TEI kind of an error on a TEI route: a :class:`TeiError`'s own; otherwise by status, as TEI's
    router maps its kinds (a refused request is 422 Validation, a full queue 429 Overloaded, a server not ready
    503 Unhealthy, anything else the kind of a backend failure under the error's own status)."""
    if error_type in TEI_ERROR_KINDS:
        return status, error_type
    if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, HTTPStatus.UNPROCESSABLE_ENTITY):
        return HTTPStatus.UNPROCESSABLE_ENTITY, "Validation"
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        return status, "Overloaded"
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        return status, "Unhealthy"
    return status, "Backend"


class RouteNotOffered(Exception):
    """The model cannot do this task: vLLM would not have registered the route at all. With a ``reason``
    (the model was named, or is the only one served) a 400 saying it; without, FastAPI's bare 404."""

    def __init__(self, reason: str | None = None):
        super().__init__(reason)
        self.reason = reason


# Triton gRPC status → the adapter error it becomes. One table, used for every Triton call.
TRITON_STATUS_TO_ERROR: dict[str, type[AdapterError]] = {
    "StatusCode.INVALID_ARGUMENT": BadRequestError,
    "StatusCode.UNAVAILABLE": ServiceUnavailableError,  # queue full, queue timeout, server down
    "StatusCode.NOT_FOUND": ServiceUnavailableError,  # the model was unloaded under us
    "StatusCode.DEADLINE_EXCEEDED": GatewayTimeoutError,
    "StatusCode.RESOURCE_EXHAUSTED": ServiceUnavailableError,
    "StatusCode.UNIMPLEMENTED": BadRequestError,
    "StatusCode.CANCELLED": ServiceUnavailableError,
    "StatusCode.INTERNAL": InternalServerError,
}


def from_triton(error: InferenceServerException) -> AdapterError:
    error_class = TRITON_STATUS_TO_ERROR.get(str(error.status()), InternalServerError)
    if "is not healthy" in (error.message() or ""):
        error_class = ServiceUnavailableError  # a dead stub, which the stack is reloading: retry shortly
    return error_class(sanitize_message(error.message() or str(error)))


_PATH_RE = re.compile(r"(/[\w.\-]+){2,}")
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]+")


def sanitize_message(message: str) -> str:
    """No file paths or memory addresses in bodies sent to clients."""
    return _ADDRESS_RE.sub("0x…", _PATH_RE.sub("<path>", message))


def error_body(status: HTTPStatus, error_type: str, message: str, param: str | None,
               flavour: Flavour = Flavour.VLLM) -> Response:
    if flavour is Flavour.TEI:
        status, kind = tei_status_and_kind(status, error_type)
        content = {"error": message, "error_type": kind}
    elif flavour is Flavour.SGLANG:
        content = {"object": "error", "message": message, "type": error_type, "param": param, "code": int(status)}
    elif flavour is Flavour.SGLANG_NATIVE:
        content = {"error": {"message": message}}
    else:
        content = {"error": {"message": message, "type": error_type, "param": param, "code": int(status)}}
    return Response(orjson.dumps(content), status_code=int(status), media_type="application/json")


def _echo(value: object) -> object:
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHOED_INPUT_CHARS else value[:MAX_ECHOED_INPUT_CHARS] + "...[truncated]"
    if isinstance(value, (list, tuple, dict, set, bytes)):
        return f"<{type(value).__name__} of {len(value)} items>"
    return value


_INTERNAL_LOC = re.compile(
    r"[\[\]{}()]|^(function-\w+|union|tagged-union|nullable|chain|str|int|list|dict|bool|float"
    r"|completion|chat|sglang-native|vllm-rerank|tei-rerank)$"  # the last five: /classify's and /rerank's union tags
)


def clean_loc(loc: tuple) -> str:
    """('body', 'function-after[...]', 'input') → 'body.input'."""
    parts = [str(part) for part in loc if not _INTERNAL_LOC.search(str(part))]
    return ".".join(parts or [str(part) for part in loc])


def validation_message(errors: list[dict]) -> str:
    count = len(errors)
    label = "error" if count == 1 else "errors"
    lines = []
    for error in errors[:MAX_REPORTED_VALIDATION_ERRORS]:
        if not isinstance(error, dict):
            lines.append(f"  {error}")
            continue
        error = {key: value for key, value in error.items() if key not in ("url", "ctx")}
        if "input" in error:
            error["input"] = _echo(error["input"])
        if "loc" in error:
            error["loc"] = clean_loc(tuple(error["loc"]))
        lines.append(f"  {error}")
    message = f"{count} validation {label}:\n" + "\n".join(lines)
    if count > MAX_REPORTED_VALIDATION_ERRORS:
        message += f"\n  ...and {count - MAX_REPORTED_VALIDATION_ERRORS} more {label}"
    return sanitize_message(message)


def install_exception_handlers(app: FastAPI) -> None:
    """Framework errors, then the adapter's own, then anything else, in that order (each counted by
    type for /metrics). There is no catch-all for ValueError and the like: a value the client sent
    wrong is refused as a :class:`BadRequestError` where it is checked, so an error of our own is a
    500 with its traceback logged instead of a 400 blamed on the client."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = list(exc.errors())
        first = errors[0] if errors else None
        param = clean_loc(tuple(first["loc"])) if isinstance(first, dict) and first.get("loc") else None
        message = validation_message(errors) if errors else "Validation error"
        flavour = flavour_of(request)
        if flavour is Flavour.SGLANG_NATIVE or any(
            isinstance(e, dict) and SGLANG_NATIVE_TAG in map(str, e.get("loc", ())) for e in errors
        ):
            flavour = Flavour.SGLANG  # SGLang's validation errors are flat on its native routes too
        if any(isinstance(e, dict) and TEI_RERANK_TAG in map(str, e.get("loc", ())) for e in errors):
            flavour = Flavour.TEI
        if flavour is Flavour.SGLANG:
            param = None  # SGLang does not report the location
        count_error(request, HTTPStatus.BAD_REQUEST.phrase)
        return error_body(HTTPStatus.BAD_REQUEST, HTTPStatus.BAD_REQUEST.phrase, message, param, flavour)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == HTTPStatus.NOT_FOUND and exc.detail == "Not Found":
            return Response(orjson.dumps({"detail": "Not Found"}), status_code=404, media_type="application/json")
        status = HTTPStatus(exc.status_code)
        count_error(request, status.phrase)
        return error_body(status, status.phrase, str(exc.detail), None, flavour_of(request))

    @app.exception_handler(RouteNotOffered)
    async def on_route_not_offered(request: Request, exc: RouteNotOffered) -> Response:
        if exc.reason is None:
            return Response(orjson.dumps({"detail": "Not Found"}), status_code=404, media_type="application/json")
        count_error(request, BadRequestError.error_type)
        return error_body(HTTPStatus.BAD_REQUEST, BadRequestError.error_type, exc.reason, None, flavour_of(request))

    @app.exception_handler(AdapterError)
    async def on_adapter_error(request: Request, exc: AdapterError) -> Response:
        if exc.status >= 500:
            logger.warning("%s: %s", exc.error_type, exc.message)
        count_error(request, exc.error_type)
        response = error_body(exc.status, exc.error_type, exc.message, exc.param, flavour_of(request))
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        """A bug, not the client's fault: the traceback goes to the log, the body says nothing of it.
        Input the client got wrong raises a :class:`BadRequestError` where it is checked."""
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        count_error(request, "InternalServerError")
        return error_body(HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError", "Internal server error", None,
                          flavour_of(request))
