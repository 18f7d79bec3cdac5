"""The paper's method: stages and prefixes, the split into K modules, auxiliary heads,
the transport term and tau schedules, and the one inner loop (`loop.train_epoch`)."""
