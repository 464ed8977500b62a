"""Names of the prediction methods, importable without torch: the Snakefile builds its wildcard
constraints from them when it parses the workflow (``comtip.methods`` holds the methods)."""

ENCODERS = ("comtip", "random")
BASELINE_METHODS = ("mean", "ridge_comtip", "ridge_random", "bleep_comtip", "mclstexp_comtip", "zeroshot")
