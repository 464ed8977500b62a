"""Evaluation of the predictions on the test slides: ``metrics`` (per gene Pearson, Spearman,
MSE, MAE and the summaries over gene sets), ``run`` (the ``evaluate`` rule's tables),
``figures`` (the report's bar chart, spatial maps and training curves)."""
