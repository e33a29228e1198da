"""Shape: the embedding column has the configured model's dimension and storage type."""

import dagster as dg

from embedding_pipeline.checks.base import (
    ERROR,
    CheckScope,
    CheckTarget,
    EmbeddingCheck,
    declare_check,
    id_list,
)
from embedding_pipeline.lib import quality

DIMENSION = "dimension_matches_model"


def dimension_check(t: CheckTarget) -> EmbeddingCheck:
    spec = t.spec
    cfg = t.cfg
    where = t.where

    @declare_check(
        t,
        DIMENSION,
        blocking=True,
        description=f"{where} is declared with the configured model's dimension and storage "
        "type (EP_VECTOR_TYPE) and stored vectors have it. ERROR: otherwise no query vector "
        "can be compared.",
    )
    def dimension(s: CheckScope) -> dg.AssetCheckResult:
        expected = s.embedder.dimension
        wanted_type = t.settings.embedder.vector_type
        report = quality.check_dimension(
            s.conn,
            spec,
            expected=expected,
            sample_size=cfg.dimension_sample_size,
            sample_ids=cfg.sample_ids,
        )
        if report.column_type is None:
            description = f"{where} does not exist"
        elif report.declared is None and not report.dimensions_found:
            description = f"{where} is {report.column_type}, not a vector of {expected} dimensions"
        else:
            description = (
                f"{report.column_type} vs model {expected}; {report.sampled} stored vectors sampled"
            )
            wrong = {d: n for d, n in report.dimensions_found.items() if d != expected}
            if wrong:
                description += f", {sum(wrong.values())} of another length: ids " + ", ".join(
                    str(i) for i in report.mismatched_ids
                )
        stored_type = (report.column_type or "").partition("(")[0]
        type_ok = stored_type == wanted_type
        if report.column_type is not None and not type_ok:
            description += f"; EP_VECTOR_TYPE is {wanted_type}"
        return dg.AssetCheckResult(
            passed=report.ok and type_ok,
            severity=ERROR,
            description=description,
            metadata={
                "column_type": report.column_type or "missing",
                "declared_dimension": report.declared if report.declared is not None else 0,
                "model_dimension": expected,
                "vector_type": wanted_type,
                "stored_dimensions": dg.MetadataValue.json(
                    {str(d): n for d, n in sorted(report.dimensions_found.items())}
                ),
                "mismatched_ids": id_list(report.mismatched_ids),
                "sampled": f"first {report.sampled} non-NULL vectors "
                f"(limit {cfg.dimension_sample_size})",
            },
        )

    return dimension
