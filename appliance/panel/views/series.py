"""The series list (search and paging) and one series' page: timeline, results, key image, slice scroller."""

from __future__ import annotations

import time
from datetime import date
from typing import Any

from flask import Blueprint, Response, abort, render_template, request, send_file

from appliance.panel import queries
from appliance.panel.slices import SliceNotFound, SliceUnreadable
from appliance.panel.views.auth import audit, ctx
from appliance.store.browse import SeriesFilter
from appliance.store.states import SeriesState

bp = Blueprint("series", __name__)
WINDOWS = ("liver", "abdomen", "bone", "lung")


def _day(value: str | None, end: bool = False) -> float | None:
    """``YYYY-MM-DD`` as local midnight (the day after, for the end of a range); None when absent or invalid."""
    if not value:
        return None
    try:
        d = date.fromisoformat(value[:10])
    except ValueError:
        return None
    t = time.mktime((d.year, d.month, d.day, 0, 0, 0, 0, 0, -1))
    return t + 86400 if end else t


def filter_from(args: Any) -> SeriesFilter:
    state = args.get("state", "")
    return SeriesFilter(
        text=(args.get("q") or "").strip()[:64],
        modality=(args.get("modality") or "").strip()[:16],
        state=state if state in queries.SERIES_STATES else "",
        received_from=_day(args.get("from")),
        received_to=_day(args.get("to"), end=True),
    )


def page_from(args: Any) -> int:
    try:
        return max(1, min(int(args.get("page", 1)), 1_000_000))
    except ValueError:
        return 1


@bp.route("/series")
def index() -> Any:
    c = ctx()
    flt = filter_from(request.args)
    result = queries.series_list(c.store, flt, page_from(request.args))
    return render_template(
        "series_list.html",
        r=result,
        args=request.args,
        states=[s.value for s in SeriesState],
        modalities=sorted(queries.Browse(c.store.index).modalities()),
    )


@bp.route("/live/series")
def live() -> Any:
    c = ctx()
    result = queries.series_list(c.store, filter_from(request.args), page_from(request.args))
    return render_template("_series_rows.html", r=result, args=request.args)


def _detail(uid: str) -> dict[str, Any]:
    if len(uid) > 64:
        abort(404)
    d = queries.series_detail(ctx().store, uid)
    if d is None:
        abort(404)
    return d


@bp.route("/series/<uid>")
def detail(uid: str) -> Any:
    d = _detail(uid)
    audit("view_series", target=uid)
    c = ctx()
    try:
        slices = c.slices.count(uid)
    except (SliceNotFound, SliceUnreadable):
        slices = 0
    return render_template("series.html", d=d, slices=slices, windows=WINDOWS)


@bp.route("/live/series/<uid>")
def detail_live(uid: str) -> Any:
    return render_template("_series_live.html", d=_detail(uid))


@bp.route("/series/<uid>/key/<int:job_id>.png")
def key_image(uid: str, job_id: int) -> Any:
    result_dir = queries.job_result_dir(ctx().store, uid, job_id)
    if result_dir is None or not (result_dir / queries.KEY_PNG).is_file():
        abort(404)
    resp = send_file(result_dir / queries.KEY_PNG, mimetype="image/png", max_age=0)
    resp.headers["Cache-Control"] = "private, max-age=300"
    return resp


@bp.route("/series/<uid>/slice/<int:index>.png")
def slice_png(uid: str, index: int) -> Any:
    c = ctx()
    window = request.args.get("window", "liver")
    if window not in WINDOWS:
        abort(400)
    job = request.args.get("job", type=int)
    result_dir = None
    if job is not None:
        rd = queries.job_result_dir(c.store, uid, job)
        if rd is not None:
            result_dir = str(rd.relative_to(c.store.data_dir))
    try:
        png = c.slices.render(uid, index, job_result_dir=result_dir, window=window)
    except SliceNotFound:
        abort(404)
    except SliceUnreadable as exc:
        return Response(str(exc), status=422, mimetype="text/plain")
    resp = Response(png, mimetype="image/png")
    resp.headers["Cache-Control"] = "private, max-age=300"
    return resp
