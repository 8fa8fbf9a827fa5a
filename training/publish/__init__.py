"""The publishing stage: the artifact directory (weights, tokenizer, manifest), its model card and report plots,
and registration in the BentoML model store."""
