"""lm-evaluation-harness tasks shipped with inhernet_hf (`inhernet eval` puts this folder on lm-eval's include path)."""
