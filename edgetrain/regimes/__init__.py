"""The training regimes: the `Run` a config builds, resident (e2e, parallel), out-of-core
(sequential, multilap), distributed, and `schedule`, which only dispatches."""
