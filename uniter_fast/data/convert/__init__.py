"""Converters from the region-feature and text formats users already have (docs/converters.md).

Region features -> region store (uniter_fast.data.region_store): the original UNITER image DB (`imagedb`),
BUTD / LXMERT TSV (`tsv`), a directory of per-image .npz files (`npz_dir`). The original text DB -> text corpus
file (`txtdb`, uniter_fast.data.text_corpus). The synthetic world -> store, corpora and config (`synthetic`).
The command line is `uniter-fast convert imagedb|tsv|npz|txtdb|synthetic SRC DST`.
"""
from uniter_fast.data.convert.common import ConversionError, ConversionSummary, RegionRule
from uniter_fast.data.convert.imagedb import convert_image_db
from uniter_fast.data.convert.npz_dir import convert_npz_dir
from uniter_fast.data.convert.synthetic import export_synthetic
from uniter_fast.data.convert.tsv import LXMERT_FIELDS, convert_tsv
from uniter_fast.data.convert.txtdb import convert_text_db

__all__ = ["ConversionError", "ConversionSummary", "RegionRule", "convert_image_db", "convert_npz_dir",
           "convert_tsv", "convert_text_db", "export_synthetic", "LXMERT_FIELDS"]
