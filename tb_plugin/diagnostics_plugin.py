"""The TensorBoard Diagnostics plugin: the "tbdiag" tab.

See ``http_api.md`` in this directory for the routes.  The plugin reads only
through TensorBoard's data provider (`run_source.RunSource`), evaluates the
same rules as ``tbdiag report`` (`tbdiag.rules`), and serves the tab: plain ES
modules (``static/index.js`` and the modules it imports) that TensorBoard loads
into an iframe -- no build step, nothing from a CDN (TensorBoard's CSP would
block it anyway).
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from tensorboard import errors as tb_errors
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from tbdiag import rules
from tbdiag.contract import schema

from . import payloads, query
from .evaluation_payload import evaluation_payload
from .loss_payload import loss_payload
from .run_source import RunSource, UnknownRunError, thresholds_key
from .throughput_payload import throughput_payload
from .transformer_payload import transformer_payload

logger = logging.getLogger(__name__)

_STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
_MIMETYPES = {".js": "text/javascript", ".css": "text/css"}


def static_files() -> dict[str, tuple[str, str]]:
    """``{route: (file name, mimetype)}`` for every file of the tab's frontend.

    The tab is a few ES modules importing each other by relative URL, so each
    module is a route of its own next to ``index.js``; listing the directory
    means a new module is served without touching this file.
    """
    out = {}
    for name in sorted(os.listdir(_STATIC_DIR)):
        mimetype = _MIMETYPES.get(os.path.splitext(name)[1])
        if mimetype is not None:
            out[f"/{name}"] = (name, mimetype)
    return out


_STATIC_FILES = static_files()

#: Compressed heatmap responses kept per run version (each is a few MB for big runs).
_MAX_HEATMAPS_PER_RUN = 6

Handler = Callable[["DiagnosticsPlugin", Any, str, Any], Any]


def _json_route(handler: Handler) -> Callable:
    """Wrap a route body ``(self, ctx, experiment, args) -> dict`` into a WSGI app.

    Bad parameters (including unknown runs and layers) answer 400 with
    ``{"error": reason}``; TensorBoard's own public errors keep their status;
    anything else is logged and answered 500 with a JSON body, never a bare
    traceback.
    """

    @functools.wraps(handler)
    @wrappers.Request.application
    def app(self: DiagnosticsPlugin, request: wrappers.Request) -> wrappers.Response:
        ctx = plugin_util.context(request.environ)
        experiment = plugin_util.experiment_id(request.environ)
        try:
            body = handler(self, ctx, experiment, request.args)
        except query.BadRequest as e:
            return _error(request, str(e), 400)
        except UnknownRunError as e:
            return _error(request, f"no tbdiag data for run {e.args[0]!r}", 400)
        except tb_errors.PublicError as e:
            return _error(request, str(e), e.http_code)
        except Exception:  # a bug, not a bad request: log it, still answer JSON
            logger.exception("tbdiag plugin: %s failed", request.path)
            return _error(request, "internal error in the tbdiag plugin (see the TensorBoard log)", 500)
        if isinstance(body, GzippedJSON):
            return http_util.Respond(request, bytes(body), "application/json", content_encoding="gzip")
        return http_util.Respond(request, _dumps(body), "application/json")

    return app


class GzippedJSON(bytes):
    """A JSON body already gzip-compressed (memoised large responses skip compressing again)."""

    @classmethod
    def encode(cls, body: Any) -> GzippedJSON:
        return cls(gzip.compress(_dumps(body).encode("utf-8"), compresslevel=3, mtime=0))


def _dumps(body: Any) -> str:
    # Payloads already encode non-finite floats as strings; allow_nan=False
    # turns any slip into an error here instead of invalid JSON in the browser.
    text = json.dumps(body, allow_nan=False, separators=(",", ":"))
    # <, > and & only occur inside JSON strings: as \u escapes they decode the same and can never be read as
    # markup (names from the user's model and logdir, and request values echoed in an error)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _error(request: wrappers.Request, message: str, code: int) -> wrappers.Response:
    return http_util.Respond(request, _dumps({"error": message}), "application/json", code=code)


class DiagnosticsPlugin(base_plugin.TBPlugin):
    """Per-layer training health for runs written by `tbdiag.DiagnosticWriter`."""

    plugin_name = schema.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._source = RunSource(context.data_provider)

    def get_plugin_apps(self) -> dict[str, Callable]:
        return {
            **{route: self._serve_static for route in _STATIC_FILES},
            "/runs": self.runs_route,
            "/rules": self.rules_route,
            "/findings": self.findings_route,
            "/layers": self.layers_route,
            "/series": self.series_route,
            "/heatmap": self.heatmap_route,
            "/throughput": self.throughput_route,
            "/evaluation": self.evaluation_route,
            "/losses": self.losses_route,
            "/transformer": self.transformer_route,
        }

    def is_active(self) -> bool:
        # TensorBoard core already activates the tab when the data provider
        # lists "tbdiag" data; anything slower here would stall every page load.
        return False

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Diagnostics")

    # ---------------------------------------------------------------- static

    @wrappers.Request.application
    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        name, mimetype = _STATIC_FILES[request.path[request.path.rindex("/"):]]
        with open(os.path.join(_STATIC_DIR, name), "rb") as f:
            return http_util.Respond(request, f.read(), mimetype)

    # ---------------------------------------------------------------- routes

    @_json_route
    def runs_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        return payloads.runs_payload(self._source.list_runs(ctx, experiment))

    @_json_route
    def rules_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        return payloads.rules_payload(rules.rules_json(query.thresholds(args)))

    @_json_route
    def findings_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        run = query.required(args, "run")
        view = self._source.view(ctx, experiment, run, query.thresholds(args))
        return payloads.findings_payload(view)

    @_json_route
    def layers_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        run = query.required(args, "run")
        step = query.optional_int(args, "step")
        view = self._source.view(ctx, experiment, run, query.thresholds(args))
        return payloads.layers_payload(view, step)

    @_json_route
    def series_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        run = query.required(args, "run")
        layer = query.required(args, "layer")
        stats = [query.statistic({"stat": s}) for s in args.getlist("stat")]
        thresholds = query.thresholds(args)
        view = self._source.view(ctx, experiment, run, thresholds)
        return payloads.series_payload(view, layer, rules.resolve(thresholds), stats or None)

    @_json_route
    def heatmap_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        run = query.required(args, "run")
        stat = query.statistic(args)
        thresholds = query.thresholds(args)
        view = self._source.view(ctx, experiment, run, thresholds)
        # ~5 MB for 500 layers x 2,000 steps: compress once per run version, statistic and thresholds
        key = ("heatmap-response", stat, thresholds_key(thresholds))
        if key not in view.memo:
            cached = [k for k in list(view.memo) if isinstance(k, tuple) and k[0] == "heatmap-response"]
            for old in cached[: max(0, len(cached) - _MAX_HEATMAPS_PER_RUN + 1)]:
                view.memo.pop(old, None)  # bound memory: a few MB per cached response
            view.memo[key] = GzippedJSON.encode(payloads.heatmap_payload(view, stat))
        return view.memo[key]

    @_json_route
    def evaluation_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        return self._run_payload(ctx, experiment, args, evaluation_payload)

    @_json_route
    def throughput_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        return self._run_payload(ctx, experiment, args, throughput_payload)

    @_json_route
    def losses_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        run = query.required(args, "run")
        return loss_payload(self._source.view(ctx, experiment, run, query.thresholds(args)))

    @_json_route
    def transformer_route(self, ctx: Any, experiment: str, args: Any) -> dict[str, Any]:
        return self._run_payload(ctx, experiment, args, transformer_payload)

    def _run_payload(self, ctx: Any, experiment: str, args: Any, payload) -> dict[str, Any]:
        """A section's payload for ``?run=R[&threshold=...]``: the run's view and the resolved rules."""
        run = query.required(args, "run")
        thresholds = query.thresholds(args)
        view = self._source.view(ctx, experiment, run, thresholds)
        return payload(view, rules.resolve(thresholds))
