"""Task heads on the MoE backbone (`task=classify|tag`): the models (models.py), labelled
examples as rows for the LM's data machinery (rows.py), labelled data from the embedded corpus
(synthetic.py) and from `datasets` (hf_labels.py), the metrics (metrics.py) and what the
trainer does per task (runner.py). Nothing is imported here: xpar.data and the trainer import
the modules they need."""
