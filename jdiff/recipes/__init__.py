"""Recipes of many training runs: the stage pipeline (pretrain -> posttrain -> tune ->
distill, one lineage; stage_pipeline) and controlled studies over variants and seeds
(studies)."""
