"""The training loop (trainer) and what it leans on: the backends it steps through (backend:
the interface; plain: DDP; zero: DeepSpeed ZeRO-1/2), its checkpoints (checkpointing, over
xpar.persist), starting from other weights (finetune), AdamW and the schedule (optim), the data
a job trains on (inputs), evaluation and early stopping (validation, early_stop), statistics
(stats), tracking (tracking, records, load_plot), and reading first-format checkpoints to
convert them (legacy). Nothing is imported here: import the module you need."""
