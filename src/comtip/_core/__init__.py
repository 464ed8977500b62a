"""What every stage shares: errors (``errors``), atomic writes (``atomic``), devices
(``devices``), seeds (``seeds``), rule logging and the job environment (``runtime``), run
records (``provenance``), lazy package exports (``lazy``), freed heap given back (``memory``).
Imports nothing from the stages; no module here imports torch at import time."""
