"""Evaluation: generation quality (ROUGE-L), and the knowledge and routing metrics."""
