"""Synthetic Visium cohort: an H&E-like slide plus a Space Ranger ``outs/`` folder per sample.

Why it exists: the pipeline needs an embedded demo and tests need inputs whose ground truth is
known. The tissue is split into cell-type regions that look different on the slide, and spot
expression is a mixture of cell-type gene programs plus a term driven by the nuclei density that
is drawn on the slide, so expression really is predictable from histology.

What is shared and what is per sample:

* gene names, ids, cell-type programs and cell-type looks depend only on the parameters
  (``program_seed`` among them), so every sample of a cohort has the same genes and programs
  and a model trained on one sample transfers to another;
* tissue shape, cell-type layout, nuclei, spot-grid phase, stain jitter and counts depend on
  ``(seed, sample)``.

Geometry: everything is computed in µm; level-0 pixel ``(col, row)`` covers
``[col, col + 1) x [row, row + 1)`` in pixel units, so a point at ``x`` µm has pixel coordinate
``x / mpp``. Positions in ``tissue_positions.csv`` use those continuous pixel coordinates.

Outputs are byte-identical for the same seed, sample and parameters on the same platform and
library versions (floating-point kernels may differ across CPUs).

Modules, by what each makes:

* :mod:`~comtip.demo.params`: :class:`SimulationParams`, cell-type looks, constants, random
  streams, parameter validation;
* :mod:`~comtip.demo.tissue`: slide geometry, smooth random fields, cell types, nuclei;
* :mod:`~comtip.demo.expression`: genes and programs, the spot grid, spot measurement, counts;
* :mod:`~comtip.demo.render`: the H&E renderer and the pyramidal TIFF slide;
* :mod:`~comtip.demo.spaceranger`: the Space Ranger ``outs/`` files and ``truth.h5ad``;
* :mod:`~comtip.demo.simulate`: :func:`simulate_sample` and the ``comtip-simulate`` CLI;
* :mod:`~comtip.demo.visium_hd`: :func:`simulate_visium_hd`, a Visium HD run
  (``outs/binned_outputs/square_008um``, ``square_016um``) on the same tissue and slide.
"""

from comtip.demo.params import SimulationParams
from comtip.demo.simulate import main, simulate_sample
from comtip.demo.visium_hd import simulate_visium_hd

__all__ = ["SimulationParams", "main", "simulate_sample", "simulate_visium_hd"]
