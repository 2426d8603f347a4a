"""Runnable studies: ``python -m experiments.<name>`` (mnist_mlp, bert_absa, benchmark, quickstart)."""
