"""CoMTIP pipeline: Contrastive Masked Text-Image Pretraining for spatial transcriptomics.

All logic of the Snakemake workflow lives in this package; the rule scripts under
``workflow/scripts/`` are thin adapters around its functions.
"""

__version__ = "0.1.0"
