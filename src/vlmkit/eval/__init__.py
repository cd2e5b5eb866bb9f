"""Evaluation: metrics for reading and answering (`metrics.py`), one pure function per score.

OCR-style text is scored with `normalized_edit_distance` (Vary's metric), `character_error_rate`
and `word_f1`; question answering with `anls` (DocVQA), `vqa_accuracy` (VQAv2), `relaxed_accuracy`
(ChartQA) and `exact_match`. `summarize` turns per-sample score dicts into a table of means.
"""
