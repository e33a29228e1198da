"""The HNSW index: present and valid, and usable (and at size used) by the planner."""

from typing import Any

import dagster as dg

from embedding_pipeline.checks.base import (
    ERROR,
    WARN,
    CheckScope,
    CheckTarget,
    EmbeddingCheck,
    declare_check,
)
from embedding_pipeline.lib import quality

INDEX_PRESENT = "hnsw_index_present"
INDEX_USED = "hnsw_index_used"


def _size(size_bytes: int) -> str:
    value = float(size_bytes)
    for unit in ("B", "kB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def index_present_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    expected_index = t.expected_index
    where = t.where
    settings = t.settings

    @declare_check(
        t,
        INDEX_PRESENT,
        blocking=True,
        description=f"A valid HNSW index with `{quality.EXPECTED_OPCLASS}` (on a halfvec "
        f"column `halfvec_cosine_ops`) exists on {where}. "
        "ERROR: without it every search is a sequential scan.",
    )
    def index_present(s: CheckScope) -> dg.AssetCheckResult:
        report = quality.find_hnsw_indexes(s.conn, spec, expected_index)
        found = [f"{i.name} ({i.opclass}{'' if i.valid else ', invalid'})" for i in report.indexes]
        metadata: dict[str, Any] = {
            "expected_opclass": report.expected_opclass,
            "hnsw_indexes": dg.MetadataValue.json(
                [
                    {
                        "name": i.name,
                        "opclass": i.opclass,
                        "m": i.m,
                        "ef_construction": i.ef_construction,
                        "size_bytes": i.size_bytes,
                        "valid": i.valid,
                        "definition": i.definition,
                    }
                    for i in report.indexes
                ]
            ),
            "configured_m": settings.hnsw.m,
            "configured_ef_construction": settings.hnsw.ef_construction,
        }
        usable = report.usable
        if usable is None:
            description = (
                f"no valid HNSW index with {report.expected_opclass} on {where} "
                "(search orders by <=>)"
            )
            description += f"; found {', '.join(found)}" if found else "; no HNSW index at all"
            builds = quality.index_builds(s.conn, spec)
            metadata["built_by"] = dg.MetadataValue.json(builds)
            if builds:
                # another run builds it now: search uses an exact scan until it is done
                description += f"; {'; '.join(builds)}: search scans exactly meanwhile"
            return dg.AssetCheckResult(
                passed=False,
                severity=WARN if builds else ERROR,
                description=description,
                metadata=metadata,
            )
        metadata.update(
            {
                "index_name": usable.name,
                "opclass": usable.opclass,
                "m": usable.m,
                "ef_construction": usable.ef_construction,
                "size_bytes": usable.size_bytes,
                "size": _size(usable.size_bytes),
                "definition": usable.definition,
            }
        )
        return dg.AssetCheckResult(
            passed=True,
            severity=ERROR,
            metadata=metadata,
            description=f"{usable.name}: {usable.opclass}, m={usable.m}, "
            f"ef_construction={usable.ef_construction}, {_size(usable.size_bytes)}",
        )

    return index_present


def index_used_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    ef_search = t.ef_search

    @declare_check(
        t,
        INDEX_USED,
        blocking=True,
        description="EXPLAIN of the search statement: ERROR if the HNSW index cannot serve it "
        "even with sequential scans off; WARN if the planner does not choose it by "
        f"default on a table of {cfg.planner_warn_rows} rows or more.",
    )
    def index_used(s: CheckScope) -> dg.AssetCheckResult:
        report = quality.check_index_use(
            s.conn,
            spec,
            t.usable_index(s.conn),
            dimension=s.embedder.dimension,
            k=cfg.k,
            ef_search=ef_search,
        )
        default_scan = (
            "a sequential scan" if "Seq Scan" in report.default_outline else report.default_outline
        )
        if report.chosen_by_default:
            planner = f"chosen by the planner at {report.rows} rows"
        else:
            planner = (
                f"the planner prefers {default_scan} at {report.rows} rows "
                f"(normal below ~{cfg.planner_warn_rows})"
            )
        metadata: dict[str, Any] = {
            "index_name": report.index_name or "none",
            "can_serve": report.can_serve,
            "chosen_by_default": report.chosen_by_default,
            "rows": report.rows,
            "planner_warn_rows": cfg.planner_warn_rows,
            "ef_search": report.ef_search,
            "k": report.k,
            "default_plan_outline": report.default_outline,
            "forced_plan_outline": report.forced_outline,
            "default_plan": dg.MetadataValue.json(report.default_plan),
            "forced_plan": dg.MetadataValue.json(report.forced_plan),
        }
        if not report.can_serve:
            builds = quality.index_builds(s.conn, spec)
            metadata["built_by"] = dg.MetadataValue.json(builds)
            return dg.AssetCheckResult(
                passed=False,
                severity=WARN if builds else ERROR,
                metadata=metadata,
                description=(
                    "no usable HNSW index: even with sequential scans off the plan is "
                    f"{report.forced_outline}" + (f"; {'; '.join(builds)}" if builds else "")
                ),
            )
        description = f"index used: yes; {planner}"
        if not report.chosen_by_default and report.rows >= cfg.planner_warn_rows:
            return dg.AssetCheckResult(
                passed=False,
                severity=WARN,
                metadata=metadata,
                description=(
                    f"index usable but not chosen: the planner runs {default_scan} on "
                    f"{report.rows} rows (warns from {cfg.planner_warn_rows})"
                ),
            )
        return dg.AssetCheckResult(
            passed=True, severity=ERROR, metadata=metadata, description=description
        )

    return index_used
