"""Step 4, evaluation: generate responses for held-out instructions (generation.py), then score them with
reference metrics (metrics.py), LLM judges (judge/: a 0-100 score each, or pairwise verdicts between two models),
people's votes (arena/) and multiple-choice benchmarks through lm-eval (multiple_choice.py)."""
