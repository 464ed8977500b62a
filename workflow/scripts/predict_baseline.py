"""Rule predict_baseline: thin adapter around comtip.predict.methods.predict_with_method."""

from comtip._core.runtime import rule_logging
from comtip.predict.methods import PredictionContext, predict_with_method

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    context = PredictionContext(
        spots_h5ad=inp.spots,
        test_sentences=inp.test_sentences,
        train_value_files=[inp.train_values],
        train_embedding_files=[f for f in [inp.get("train_embeddings")] if f],
        test_embedding=inp.get("test_embedding"),
        ridge_probe=inp.get("ridge_probe"),
        checkpoint=inp.get("checkpoint"),
        settings=snakemake.params.evaluation,
        sample=snakemake.wildcards.sample,
    )
    predict_with_method(snakemake.wildcards.method, context, snakemake.output.prediction)
