"""Rule predict_baseline: thin adapter around comtip.methods.predict_with_method."""

from comtip.methods import predict_with_method
from comtip.runtime import rule_logging

with rule_logging(snakemake.log[0]):
    inp, cfg = snakemake.input, snakemake.params.evaluation
    predict_with_method(
        snakemake.wildcards.method,
        spots_h5ad=inp.spots,
        test_sentences=inp.test_sentences,
        train_sentences=list(inp.train_sentences),
        train_embeddings=list(inp.get("train_embeddings", [])),
        test_embedding=inp.get("test_embedding"),
        checkpoint=inp.get("checkpoint"),
        out_h5ad=snakemake.output.prediction,
        bleep_k=cfg["bleep_k"],
        mclstexp_k=cfg["mclstexp_k"],
        mclstexp_smooth_query=cfg["mclstexp_smooth_query"],
        ridge_pca_dim=cfg["ridge_pca_dim"],
        zeroshot_grid=cfg["zeroshot_grid"],
        zeroshot_temperature=cfg["zeroshot_temperature"],
        zeroshot_grid_kind=cfg["zeroshot_grid_kind"],
        zeroshot_prior=cfg["zeroshot_prior"],
    )
