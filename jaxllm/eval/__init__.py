"""Evaluation: perplexity, classifier metrics, instruction responses and their judge, a run's final report."""
