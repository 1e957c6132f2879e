"""Result bundles: a run's rows as Parquet + a JSON manifest beside its checkpoint, so results travel as files.

``format``   write / read / validate one bundle (no database opened; data, never code)
``journal``  :class:`BundleStore` (``harness run --store-mode bundles``: runs write bundles only) and
             :class:`RecordingStore` (the default: the DuckDB store, each run mirrored into its bundle)
``ingest``   bundles into a store (``harness import``) and out of one (``harness export``)
``sources``  many stores and bundle directories as one store for the board, with each run's origin
"""
from .format import (FORMAT, FORMAT_VERSION, MANIFEST, TABLES, Bundle, BundleError, find_bundles, read_bundle,
                     write_bundle)
from .journal import BUNDLES, BundleStore, RecordingStore, bundle_path

__all__ = ["BUNDLES", "FORMAT", "FORMAT_VERSION", "MANIFEST", "TABLES", "Bundle", "BundleError", "BundleStore",
           "RecordingStore", "bundle_path", "find_bundles", "read_bundle", "write_bundle"]
