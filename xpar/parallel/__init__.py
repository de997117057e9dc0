"""Expert parallelism: process layout, the all-to-all dispatcher, and parallelize()."""
