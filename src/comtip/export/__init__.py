"""Exports of a sample's results into community formats: ``spatialdata`` (one SpatialData zarr
per sample: the H&E as a multiscale image, the spots or tiles as shapes, the tissue mask as
labels, the counts and every method's predictions as the table; rule ``spatialdata``)."""

from comtip._core.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "write_spatialdata": "comtip.export.spatialdata",
        "DEFAULT_IMAGE_MAX_PX": "comtip.export.spatialdata",
    },
)
