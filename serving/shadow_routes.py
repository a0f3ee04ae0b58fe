"""Admin routes of shadow traffic: shadow a candidate rule set without a restart, stop it,
read the live report. Mounted by `serving.app` (behind `require_admin` where it exists).

    POST   /v1/admin/shadow/rules[?name=&share=]   body: a rule set (JSON)
    DELETE /v1/admin/shadow/rules
    GET    /v1/admin/shadow/report
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from railtower.errors import RuleSetError
from ranking.rule_set import load_rule_set
from serving.shadow import ShadowRunner


def shadow_router(runner: ShadowRunner) -> APIRouter:
    router = APIRouter(prefix="/v1/admin/shadow", tags=["shadow"])

    @router.post("/rules")
    async def start_rules(
        request: Request,
        name: str | None = Query(None, min_length=1, max_length=80),
        share: float | None = Query(None, ge=0.0, le=1.0),
    ) -> JSONResponse:
        text = (await request.body()).decode("utf-8-sig", errors="replace")
        # load_rule_set reads a path when the text is not JSON: never let a body name a file.
        if not text.lstrip().startswith(("{", "[")):
            return JSONResponse(
                {
                    "error": "the body must be a rule set as JSON (name, version, rails, rules)",
                    "problems": ["line 1, rule set: not a JSON object"],
                },
                status_code=422,
            )
        try:
            rule_set = load_rule_set(text)
        except RuleSetError as exc:
            return JSONResponse(
                {"error": "invalid rule set", "problems": exc.problems}, status_code=422
            )
        arm = runner.shadow_rules(rule_set, name, share)
        body: dict[str, Any] = {
            "arm": arm,
            "rule_set": rule_set.name,
            "version": rule_set.version,
            "share": runner.share,
        }
        if runner.share == 0:
            body["warning"] = "shadow share is 0: no request is shadowed; pass ?share=0.1"
        return JSONResponse(body)

    @router.delete("/rules")
    async def stop_rules() -> JSONResponse:
        arm = runner.stop_rules()
        if arm is None:
            return JSONResponse({"error": "no candidate rule set is being shadowed"}, 404)
        return JSONResponse({"stopped": arm})

    @router.get("/report")
    async def report() -> dict[str, Any]:
        return runner.report()

    return router
