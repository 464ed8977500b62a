"""The data stages, from Space Ranger output and slide to training inputs: ``ingest``
(``spots.h5ad``), ``tiling`` (tissue mask, tile grid, thumbnail), ``patches`` (one patch per
spot), ``genes`` (gene panel from the training slides, value bins, gene sentences); ``barcodes``
helps name the first row where two barcode lists part. Imports :mod:`comtip.io` and
:mod:`comtip._core` only."""
